"""SIGTERM / SIGINT in the entry points (issue 19): a signal stops the job at a safe point with one
line and exit status 128 + the signal number, and nothing partial is left that a later run would
take as done. In-process: the job's guard (``PreemptionGuard``) is entered first and the signal
delivered to this process, as a scheduler would; the entry point nests its own guard inside.
The multi-process flag, the trainer's save-and-stop and the main job's resume are tested with
real signals to subprocesses in test_checkpoint.py, test_trainer.py and test_toy_pipeline.py."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from fairjax.checkpoint import PreemptionGuard, raise_if_stopped, stop_requested
from fairjax.errors import Interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_guards_nest_and_share_the_flag():
    before = signal.getsignal(signal.SIGTERM)
    raise_if_stopped("anything")  # no guard: a no-op
    with PreemptionGuard() as outer:
        handler = signal.getsignal(signal.SIGTERM)
        with PreemptionGuard() as inner:
            assert signal.getsignal(signal.SIGTERM) is handler  # the inner guard installs nothing
            os.kill(os.getpid(), signal.SIGINT)
            assert inner.requested and inner.signal_name == "SIGINT" and outer.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGTERM) is handler and stop_requested() == "SIGINT"
        with pytest.raises(Interrupted) as e:
            raise_if_stopped("while testing: nothing written")
        assert str(e.value) == "stopped by SIGINT while testing: nothing written" and e.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is before and stop_requested() is None
    assert Interrupted("x", "SIGTERM").exit_code == 143


def test_generator_stops_between_batches():
    """The signal arrives while batch 1 is sampled: batch 1 is delivered, batch 2 never starts."""
    from fairjax.diffusion.generator import Generator

    class FakeT2I:
        batch_size = 2
        calls = 0

        def __call__(self, prompts, p, i, seed):
            self.calls += 1
            os.kill(os.getpid(), signal.SIGTERM)
            n = len(prompts)
            return np.zeros((n, 4, 4, 3), np.uint8), np.zeros((n, 3, 4, 4), np.float32)

    gen = Generator.__new__(Generator)
    gen.t2i = FakeT2I()
    got = []
    with PreemptionGuard():
        with pytest.raises(Interrupted, match="stopped by SIGTERM while generating images \\(2 of 6 done\\)"):
            for item in gen.run(["a", "b"], [3, 3], seed=0):
                got.append(item[:2])
    assert got == [(0, 0), (0, 1)] and gen.t2i.calls == 1


@pytest.mark.parametrize("tool", ["build_prefs", "evaluate"])
def test_pipeline_tools_stop_with_143_and_write_nothing(tool, tmp_path, capsys):
    """A SIGTERM received before the first generation batch (the job's guard caught it): the tool
    stops at that batch, prints one line, returns 143 and leaves neither OUT nor its temp folder."""
    out = tmp_path / "out"
    if tool == "build_prefs":
        from fairjax.data.build_prefs import main

        argv = ["--config", os.path.join(ROOT, "configs", "toy_world.py:smoke"), "--out", str(out)]
    else:
        from fairjax.evaluate import main
        from fairjax.toy.model import default_model_dir

        argv = ["--model", default_model_dir(), "--out", str(out), "--config",
                os.path.join(ROOT, "configs", "toy_world.py:smoke")]
    with PreemptionGuard():
        os.kill(os.getpid(), signal.SIGTERM)
        assert main(argv) == 143
    # the process's one-time "attention auto -> ..." note appears when this test is the first to build a model
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("fairjax: attention auto")]
    assert len(err) == 1 and err[0].startswith("stopped by SIGTERM while generating images (0 of "), err
    assert os.listdir(tmp_path) == []


def _tool_case(which, tmp_path, micro_sdxl, micro_diffusers_unet, tiny_vila_u):
    """(main, argv, roots) of one conversion / export tool writing ``tmp_path/out``."""
    from _bad_inputs import tool

    out = str(tmp_path / "out")
    if which == "convert_diffusers":
        return tool(which).main, [micro_diffusers_unet, out], [micro_sdxl["root"]]
    if which == "export_diffusers":
        return tool(which).main, [micro_sdxl["model"], out], [micro_sdxl["root"]]
    if which == "export_diffusers_lora":
        return tool("export_diffusers").main, [micro_sdxl["model"], out, "--lora", micro_sdxl["lora"]], \
            [micro_sdxl["root"]]
    if which == "export_vila_u":
        return tool(which).main, [tiny_vila_u["model"], out], [tiny_vila_u["root"]]
    return tool(which).main, [tiny_vila_u["src"], out, "--siglip-config", tiny_vila_u["siglip"]], \
        [tiny_vila_u["root"]]


@pytest.mark.parametrize("which", ["convert_diffusers", "export_diffusers", "export_diffusers_lora", "export_vila_u",
                                   "convert_vila_u"])
def test_conversion_tools_stop_on_ctrl_c_with_one_line_and_130(which, tmp_path, capsys, monkeypatch, micro_sdxl,
                                                              micro_diffusers_unet, tiny_vila_u):
    """Ctrl-C while a tool writes OUT (these tools have no guard: Python raises ``KeyboardInterrupt`` where
    the tool is): one line, exit 130, no traceback, and neither OUT nor its temp folder left. Ctrl-C lands
    just before the written temp folder would become OUT, or, for convert_vila_u (whose tiny source has no
    vision weights to finish with), as it opens the first weights inside the temp folder."""
    from _bad_inputs import tree_digest

    main, argv, roots = _tool_case(which, tmp_path, micro_sdxl, micro_diffusers_unet, tiny_vila_u)
    out, seen = argv[1], []
    if which == "convert_vila_u":
        import fairjax.convert.vila_u as vila_u_convert

        def reader(*a, **k):
            seen.append(os.listdir(tmp_path))
            raise KeyboardInterrupt

        monkeypatch.setattr(vila_u_convert, "ShardedReader", reader)
    else:
        real = os.replace

        def replace(src, dst, *a, **k):
            if os.path.abspath(dst) == out:
                seen.append(os.listdir(src))
                raise KeyboardInterrupt
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
    before = tree_digest(*roots)
    capsys.readouterr()
    assert main(argv) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "\r" not in ln]
    assert err == ["stopped by SIGINT (Ctrl-C) before the output was complete; nothing partial was kept"], err
    assert seen and seen[0], "Ctrl-C did not land while OUT's temp folder held something"
    assert os.listdir(tmp_path) == [] and tree_digest(*roots) == before


def test_train_cli_exits_130_after_saving_on_sigint(tmp_path, capsys):
    """``python -m fairjax.train`` on the 1-D mixture, Ctrl-C during the run: it finishes the step,
    saves, prints one line and returns 130; no output says the run finished; the same command resumes."""
    import json

    from fairjax import train
    from fairjax.tasks import mog

    real, fired = mog.MogTask.batch, []

    def batch(self, step, i, n):  # Ctrl-C while step 3's batch is read, once
        if step == 3 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, step, i, n)

    argv = ["--config", os.path.join(ROOT, "configs", "popalign_mog.py"), "--workdir", str(tmp_path),
            "--config.total_steps=6", "--config.progress_bar=False"]
    mog.MogTask.batch = batch
    try:
        assert train.main(argv) == 130
        out, err = capsys.readouterr()
        assert err.strip().splitlines() == [f"stopped by SIGINT at step 4: checkpoint saved in {tmp_path}/checkpoints/4; "
                                            "run the same command again to resume"]
        assert json.loads(out[out.index("{"):])["preempted"] and not (tmp_path / "mixture.json").exists()
        assert train.main(argv) == 0
    finally:
        mog.MogTask.batch = real
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path}/checkpoints/4" in out and (tmp_path / "mixture.json").is_file()


@pytest.mark.parametrize("again", [["--overwrite"], []])
def test_a_stopped_overwrite_pass_goes_on(again, tmp_path, monkeypatch):
    """``python -m fairjax.toy.run --overwrite`` stopped while PopAlign trains (stages faked): the command
    again, with or without --overwrite, goes on with the pass -- the preference set it rebuilt is reused,
    PopAlign resumes from its checkpoint -- instead of starting over (a scheduler that re-runs the same
    command would never finish), and no output of the run before the pass (its SFT) is taken as done."""
    from pathlib import Path

    from fairjax import evaluate as ev
    from fairjax.data import build_prefs as bp
    from fairjax.toy import run as toy_run

    wd, gen, calls = tmp_path / "toy", [1], []

    def build(base, out, overwrite=False, log=print):
        assert overwrite or not os.path.exists(out)
        calls.append("build_prefs")
        os.makedirs(out, exist_ok=True)
        (wd / "prefs" / "made").write_text(str(gen[0]))

    def train_one(cfg, d):
        calls.append(f"train {cfg.loss}")
        ckpt = Path(d) / "ckpt"
        if gen[0] == 2 and cfg.loss == "popalign" and not ckpt.exists():  # SIGTERM: saved, not finished
            os.makedirs(d, exist_ok=True)
            ckpt.write_text(str(gen[0]))
            raise Interrupted(f"stopped by SIGTERM at step 1: checkpoint saved in {d}; run the same command "
                              "again to resume", "SIGTERM")
        if ckpt.exists():
            calls.append(f"resumed {cfg.loss} from gen {ckpt.read_text()}")
        out = Path(toy_run.tuned_model(cfg, d)[1] or os.path.join(d, "model", "made"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(str(gen[0]))
        return {"loss": 0.0}

    def evaluate(base, models, out, **kw):
        made = {m: Path(lora or os.path.join(d, "made")).read_text() for m, (d, lora) in models.items() if m != "base"}
        made["prefs"] = (wd / "prefs" / "made").read_text()
        return {"html": "", "models": list(models), "results": {m: {"discrepancy": made} for m in models}}

    monkeypatch.setattr(bp, "build_prefs", build)
    monkeypatch.setattr(bp, "read_summary", lambda path: {})
    monkeypatch.setattr(ev, "evaluate", evaluate)
    monkeypatch.setattr(ev, "summary_lines", lambda report: [])
    monkeypatch.setattr(toy_run, "train_one", train_one)
    monkeypatch.setattr(toy_run, "calibrated_beta", lambda *a: {"exact": 1.0, "exact_per_attribute": {}, "scale": 1.0,
                                                                "beta": 1.0})
    monkeypatch.setattr(toy_run, "_latent_shape", lambda prefs: (3, 8, 8))
    monkeypatch.setattr(toy_run, "_check_prompts", lambda prefs, anchor: None)
    run = lambda *flags: toy_run.run(str(wd), "smoke", overwrite="--overwrite" in flags)

    run()  # the run before the pass: every output is generation 1
    gen[0], calls[:] = 2, []
    with pytest.raises(Interrupted):
        run("--overwrite")
    assert calls == ["build_prefs", "train popalign"] and not (wd / "result.json").exists()
    calls[:] = []
    result = run(*again)
    assert calls == ["train popalign", "resumed popalign from gen 2", "train sft"], calls  # prefs reused
    assert result["metrics"]["sft"]["discrepancy"] == {"popalign": "2", "sft": "2", "prefs": "2"}
    assert not (wd / ".overwrite.json").exists()
    calls[:] = []
    run()  # the pass finished: nothing is redone
    assert calls == []


_FIRST_JAX_IMPORT = """
import importlib.abc, os, signal, sys

class AtJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "jax":  # the first import of jax: is the job's guard (not Python's default) handling SIGINT?
            print("guarded" if signal.getsignal(signal.SIGINT) is not signal.default_int_handler else "default")
            sys.stdout.flush()
            os._exit(0)

sys.meta_path.insert(0, AtJax())
import runpy
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)  # python -m MODULE ARGS
finally:
    print("jax never imported")
"""


@pytest.mark.parametrize("module, args", [
    ("fairjax.train", ["--config", "configs/popalign_mog.py", "--workdir", "{tmp}/w"]),
    ("fairjax.toy.run", ["--workdir", "{tmp}/w", "--preset", "smoke"]),
    ("fairjax.toy.vila_u", ["--workdir", "{tmp}/w", "--preset", "quick"]),
    ("fairjax.data.build_prefs", ["--config", "configs/toy_world.py:smoke", "--out", "{tmp}/o"]),
    ("fairjax.evaluate", ["--model", "fairjax/assets/toy", "--out", "{tmp}/o", "--config", "configs/toy_world.py:smoke"]),
    ("fairjax.generate", ["--model", "fairjax/assets/toy_vila_u", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/o"]),
    ("fairjax.locate_bias", ["--model", "fairjax/assets/toy_vila_u", "--out", "{tmp}/o"]),
    ("fairjax.analysis.reward_probe", ["--data", "{tmp}/prefs", "--lora", "{tmp}/p.txt", "--base", "fairjax/assets/toy",
                                       "--out", "{tmp}/o"]),
])
def test_the_guard_is_in_place_before_jax_is_imported(module, args, tmp_path):
    """Ctrl-C while an entry point imports jax (its first second or so): with Python's default handler the
    KeyboardInterrupt went off inside jax's garbage-collection callback, where Python only prints it
    ("Exception ignored in: <function _xla_gc_callback ...>"), and the job ran to the end with exit 0. Every
    entry point now holds its guard (a flag, fairjax.io.preemption) before anything imports jax; fairjax.train and
    fairjax.toy.run also while they re-execute with the malloc tunables (fairjax.io.host), whose new process
    imports jax first."""
    import subprocess
    import sys

    (tmp_path / "p.txt").write_text("a doctor\n")
    argv = [a.format(tmp=tmp_path) for a in args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _FIRST_JAX_IMPORT, module, *argv], capture_output=True, text=True,
                       cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), timeout=120)
    assert r.stdout.strip().splitlines()[-1:] == ["guarded"], (r.stdout[-2000:], r.stderr[-2000:])
