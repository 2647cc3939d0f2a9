"""Bad input to ``python -m fairjax.train``: exit 2, one ``error:`` line naming the problem (for a config value:
the key, the value and its range), no traceback, nothing built, no ``config.json`` or workdir left behind,
every input unchanged (issue 23). ``test_two_runs_one_workdir`` races two real processes on one workdir."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _bad_inputs import (ROOT, held_by_other_process, inject_mkdir_error, linked_copy, readonly_dir, refused,
                         tree_digest)
from fairjax import train

MOG = os.path.join(ROOT, "configs", "popalign_mog.py")
SDXL = os.path.join(ROOT, "configs", "popalign_sdxl.py") + ":tiny"
VILA_U = os.path.join(ROOT, "configs", "bpo_vila_u.py") + ":tiny"


def mog(wd, *over):
    return ["--config", MOG, "--workdir", str(wd), *over]


def sdxl(m, wd, *over):
    return ["--config", SDXL, "--workdir", str(wd), f"--config.model.dir={m['model']}",
            f"--config.data.path={m['data']}", *over]


def _nested(m, t, what):
    outer = t / "outer"
    outer.mkdir()
    if what == "config":
        cfg = outer / "cfg.py"
        cfg.write_text(open(MOG).read())
        return ["--config", str(cfg), "--workdir", str(outer)]
    data = linked_copy(m["data"], str(outer / "data"))
    return ["--config", SDXL, "--workdir", str(outer), f"--config.model.dir={m['model']}",
            f"--config.data.path={data}"]


def _nan_config(t):
    cfg = t / "nan.py"
    cfg.write_text(f"import runpy\n\ndef get_config():\n    c = runpy.run_path({MOG!r})['get_config']()\n"
                   "    c.optimizer.lr = float('nan')\n    return c\n")
    return ["--config", str(cfg), "--workdir", str(t / "wd")]


# id -> (argv from (fixture, tmp_path), words the line must hold)
CASES = {
    # the workdir
    "workdir_equals_model_dir": (lambda m, t: sdxl(m, m["model"]), ["--workdir", "equals config.model.dir"]),
    "workdir_inside_model_dir": (lambda m, t: sdxl(m, os.path.join(m["model"], "run")),
                                 ["is inside config.model.dir"]),
    "workdir_inside_data": (lambda m, t: sdxl(m, os.path.join(m["data"], "run")), ["is inside config.data.path"]),
    "workdir_contains_data": (lambda m, t: _nested(m, t, "data"), ["contains config.data.path"]),
    "workdir_contains_config": (lambda m, t: _nested(m, t, "config"), ["contains --config"]),
    "workdir_is_a_file": (lambda m, t: ((t / "wd").write_text("x"), mog(t / "wd"))[1], ["is a file, not a folder"]),
    # the trainer's keys (fairjax.trainer.TRAIN_RANGES)
    "log_every_steps_0": (lambda m, t: mog(t / "wd", "--config.log_every_steps=0"),
                          ["config.log_every_steps=0 is out of range", "an integer >= 1"]),
    "seed_negative": (lambda m, t: mog(t / "wd", "--config.seed=-1"), ["config.seed=-1", "[0, 2**32 - 1]"]),
    "checkpoint_keep_negative": (lambda m, t: mog(t / "wd", "--config.checkpoint.keep=-1"),
                                 ["config.checkpoint.keep=-1", ">= 0"]),
    "checkpoint_every_negative": (lambda m, t: mog(t / "wd", "--config.checkpoint.every_steps=-5"),
                                  ["config.checkpoint.every_steps=-5"]),
    "total_steps_0": (lambda m, t: mog(t / "wd", "--config.total_steps=0"), ["config.total_steps=0", ">= 1"]),
    "total_steps_negative": (lambda m, t: mog(t / "wd", "--config.total_steps=-3"), ["config.total_steps=-3"]),
    "lr_negative": (lambda m, t: mog(t / "wd", "--config.optimizer.lr=-0.1"), ["config.optimizer.lr=-0.1", "> 0"]),
    "lr_nan_from_config_file": (lambda m, t: _nan_config(t), ["config.optimizer.lr=nan"]),
    "optimizer_unknown": (lambda m, t: mog(t / "wd", "--config.optimizer.name=lion"), ["config.optimizer.name='lion'",
                                                                                    "one of 'adamw', 'adam', 'sgd'"]),
    "schedule_unknown": (lambda m, t: mog(t / "wd", "--config.optimizer.schedule=linear"),
                         ["config.optimizer.schedule"]),
    "warmup_negative": (lambda m, t: mog(t / "wd", "--config.optimizer.warmup_steps=-1"),
                        ["config.optimizer.warmup_steps"]),
    "b1_one": (lambda m, t: mog(t / "wd", "--config.optimizer.b1=1.0"), ["config.optimizer.b1=1.0", "[0, 1)"]),
    "grad_clip_negative": (lambda m, t: mog(t / "wd", "--config.optimizer.grad_clip=-1.0"),
                           ["config.optimizer.grad_clip"]),
    "weight_decay_negative": (lambda m, t: mog(t / "wd", "--config.optimizer.weight_decay=-0.1"),
                              ["config.optimizer.weight_decay"]),
    "batch_size_0": (lambda m, t: mog(t / "wd", "--config.batch_size=0"), ["config.batch_size=0"]),
    "grad_accum_0": (lambda m, t: mog(t / "wd", "--config.grad_accum_steps=0"), ["config.grad_accum_steps=0"]),
    "mesh_axis_0": (lambda m, t: mog(t / "wd", "--config.mesh.data=0"), ["config.mesh.data=0", "-1 or"]),
    # the mesh and the batch against the devices (8 here): refused before the task is built or config.json written
    "mesh_larger_than_devices": (lambda m, t: mog(t / "wd", "--config.mesh.data=16"), ["needs 16 devices"]),
    "batch_does_not_divide_over_mesh": (lambda m, t: mog(t / "wd", "--config.batch_size=12"),
                                        ["global batch 12 does not divide", "a multiple of 8"]),
    "batch_does_not_divide_over_grad_accum": (lambda m, t: mog(t / "wd", "--config.batch_size=8",
                                                               "--config.grad_accum_steps=3"),
                                              ["x 3 gradient-accumulation micro-batches = 24"]),
    "three_bad_values_in_one_line": (lambda m, t: mog(t / "wd", "--config.seed=-1", "--config.total_steps=0",
                                                      "--config.log_every_steps=0"),
                                     ["config.seed=-1", "config.total_steps=0", "config.log_every_steps=0"]),
    # a task's keys (its RANGES)
    "beta_negative": (lambda m, t: mog(t / "wd", "--config.beta=-1.0"), ["config.beta=-1.0", "> 0"]),
    "mog_alpha_above_1": (lambda m, t: mog(t / "wd", "--config.alpha=1.5"), ["config.alpha=1.5", "[0, 1]"]),
    # the mixture itself (before: an IndexError traceback, or a NaN loss that left config.json behind)
    "mog_means_fewer_than_components": (lambda m, t: mog(t / "wd", "--config.mog.means=(1.0, 2.0)"),
                                        ["config.mog.ref_logits, means and sigmas", "3 ref_logits, 2 means"]),
    "mog_sigma_negative": (lambda m, t: mog(t / "wd", "--config.mog.sigmas=(1.0, -1.0, 1.0)"),
                           ["config.mog.sigmas=(1.0, -1.0, 1.0)", "> 0"]),
    "mog_winner_component_out_of_range": (lambda m, t: mog(t / "wd", "--config.mog.winner_components=(0, 5)"),
                                          ["config.mog.winner_components=(0, 5)", "[0, 3)"]),
    "caption_dropout_above_1": (lambda m, t: sdxl(m, t / "wd", "--config.data.caption_dropout=1.5"),
                                ["config.data.caption_dropout=1.5", "[0, 1]"]),
    "caption_dropout_negative": (lambda m, t: sdxl(m, t / "wd", "--config.data.caption_dropout=-0.1"),
                                 ["config.data.caption_dropout=-0.1"]),
    "lora_rank_negative": (lambda m, t: sdxl(m, t / "wd", "--config.lora.rank=-4"), ["config.lora.rank=-4"]),
    "sdxl_lora_dropout": (lambda m, t: sdxl(m, t / "wd", "--config.lora.dropout=0.1"),
                          ["config.lora.dropout=0.1", "merged into the kernels"]),
    "noise_draws_0": (lambda m, t: sdxl(m, t / "wd", "--config.noise_draws=0"), ["config.noise_draws=0"]),
    "anchor_weight_negative": (lambda m, t: sdxl(m, t / "wd", "--config.anchor_weight=-1.0"),
                               ["config.anchor_weight=-1.0"]),
    "t_min_negative": (lambda m, t: sdxl(m, t / "wd", "--config.t_min=-1"), ["config.t_min=-1"]),
    # config.text_embeds.path: never written over unless it is a cache, and no advice to delete an input
    "text_embeds_path_is_a_folder": (lambda m, t: sdxl(m, t / "wd", "--config.tiny=", f"--config.text_embeds.path={t}"),
                                     ["config.text_embeds.path=", "is a folder"]),
    "text_embeds_path_is_the_unet_params": (
        lambda m, t: sdxl(m, t / "wd", "--config.tiny=",
                          f"--config.text_embeds.path={os.path.join(m['model'], 'unet', 'params.safetensors')}"),
        ["is not a fairjax text-embedding cache", "left as it is"]),
    # the :tiny preset with both model.dir and data.path given builds nothing in the workdir before a refusal
    "sdxl_tiny_data_split_unknown": (lambda m, t: sdxl(m, t / "wd", "--config.data.split=test"),
                                     ["has no split 'test'"]),
    "model_dtype_unknown": (lambda m, t: sdxl(m, t / "wd", "--config.model.dtype=int8"), ["config.model.dtype='int8'"]),
    "vila_u_warmup_ratio": (lambda m, t: ["--config", VILA_U, "--workdir", str(t / "wd"),
                                          "--config.warmup_ratio=1.5"], ["config.warmup_ratio=1.5", "[0, 1)"]),
    "vila_u_lora_dropout_1": (lambda m, t: ["--config", VILA_U, "--workdir", str(t / "wd"), "--config.lora.dropout=1.0"],
                              ["config.lora.dropout=1.0"]),
    "vila_u_epochs_0": (lambda m, t: ["--config", VILA_U, "--workdir", str(t / "wd"), "--config.epochs=0.0"],
                        ["config.epochs=0.0"]),
    # the config file and overrides
    "config_missing": (lambda m, t: ["--config", str(t / "none.py"), "--workdir", str(t / "wd")], ["not found"]),
    "unknown_preset": (lambda m, t: ["--config", MOG + ":fast", "--workdir", str(t / "wd")], ["unknown preset"]),
    "unknown_key": (lambda m, t: mog(t / "wd", "--config.bta=2.0"), ["unknown config key 'bta'"]),
    "renamed_key": (lambda m, t: sdxl(m, t / "wd", "--config.model_dir=x"), ["renamed to 'model.dir'"]),
    "wrong_type": (lambda m, t: mog(t / "wd", "--config.total_steps=many"), ["cannot parse 'many'"]),
    "unknown_task": (lambda m, t: mog(t / "wd", "--config.task=gan"), ["unknown task 'gan'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(micro_sdxl, tmp_path, capsys, case):
    make, needles = CASES[case]
    refused(train.main, make(micro_sdxl, tmp_path), capsys, needles, roots=[tmp_path, micro_sdxl["root"]])


def test_workdir_locked_by_another_run(tmp_path, capsys):
    wd = str(tmp_path / "wd")
    with held_by_other_process(wd, inside=True) as pid:
        refused(train.main, mog(wd), capsys, ["--workdir", "in use by another run", f"pid {pid}"], roots=[tmp_path])


def test_workdir_on_a_read_only_file_system(tmp_path, capsys):
    with readonly_dir(tmp_path / "ro") as ro:
        refused(train.main, mog(os.path.join(ro, "wd")), capsys, ["cannot write --workdir"], roots=[tmp_path])


def test_existing_workdir_on_a_read_only_file_system(tmp_path, capsys):
    """Resuming in a workdir that became read-only: refused before the lock or config.json is written."""
    with readonly_dir(tmp_path / "wd") as wd:
        refused(train.main, mog(wd), capsys, ["cannot write --workdir"], roots=[tmp_path])


def test_workdir_read_only_injected(tmp_path, capsys, monkeypatch):
    inject_mkdir_error(monkeypatch, str(tmp_path), errno.EROFS)
    refused(train.main, mog(tmp_path / "runs" / "wd"), capsys, ["cannot write --workdir", "read-only file system"],
            roots=[tmp_path])


@pytest.mark.parametrize("config_json", ["kept", "deleted"])
def test_workdir_holding_another_models_checkpoints(tmp_path, capsys, config_json):
    """A workdir whose checkpoints another model saved (4 mixture components asked, 3 stored; its config.json
    deleted, or the change allowed): one line naming the key and both shapes, not "unreadable, delete the broken
    step directories"; the checkpoints and config files stay as they were (no config.json of this run)."""
    wd = tmp_path / "wd"
    assert train.main(mog(wd, "--config.total_steps=2", "--config.checkpoint.every_steps=1",
                          "--config.progress_bar=false")) == 0
    if config_json == "deleted":
        os.remove(wd / "config.json")
    four = ["--config.mog.ref_logits=(1.0, 0.0, -1.0, 0.5)", "--config.mog.means=(-7.0, 0.0, 7.0, 3.0)",
            "--config.mog.sigmas=(1.0, 1.0, 1.0, 1.0)", "--config.total_steps=3"]
    needles = [f"checkpoint {wd}/checkpoints/2 was saved by a run of another model",
               "trainable.means has shape (3,) there but (4,) in this config", "new --workdir"]
    if config_json == "deleted":
        assert "delete" not in refused(train.main, mog(wd, *four), capsys, needles, roots=[tmp_path])
        return
    capsys.readouterr()  # the change allowed: the "note: resuming ... with a changed config" line comes first
    before = tree_digest(tmp_path)
    assert train.main(mog(wd, *four, "--allow-config-change")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "\r" not in ln]
    assert len(err) == 2 and err[0].startswith("note: resuming") and err[1].startswith("error: "), err
    assert all(n in err[1] for n in needles) and "delete" not in err[1]
    assert tree_digest(tmp_path) == before  # no config.resumed.json of the refused run


def test_resume_on_a_dataset_rebuilt_in_place(micro_sdxl, tmp_path, capsys):
    """The preference set at config.data.path rewritten with other records between two runs in one workdir:
    the resume is refused in one line (nothing written), and goes on with --allow-config-change, which
    records the new dataset's fingerprint."""
    import shutil

    from fairjax.diffusion import tiny

    data, wd = tmp_path / "data", tmp_path / "wd"
    shutil.copytree(micro_sdxl["data"], data)
    common = ["--config.progress_bar=false", "--config.checkpoint.every_steps=1"]
    run = sdxl(dict(micro_sdxl, data=str(data)), wd, *common, "--config.total_steps=2")
    assert train.main(run) == 0
    first = json.load(open(wd / "data_fingerprint.json"))
    assert first["data_path"] == str(data)
    assert train.main(run) == 0  # the same data: resumes (nothing left to do)
    _, other = tiny.ensure(str(tmp_path / "other"), "micro", seed=1)
    shutil.rmtree(data)
    shutil.copytree(other, data)
    more = sdxl(dict(micro_sdxl, data=str(data)), wd, *common, "--config.total_steps=3")
    refused(train.main, more, capsys, [f"the dataset of the run in {wd} changed since it started",
                                       "--allow-config-change"], roots=[tmp_path])
    assert train.main(more + ["--allow-config-change"]) == 0
    err = capsys.readouterr().err
    assert "note: resuming" in err and "dataset that changed" in err
    assert json.load(open(wd / "data_fingerprint.json"))["fingerprint"] != first["fingerprint"]
    assert train.has_checkpoint(str(wd)) and (wd / "checkpoints" / "3").is_dir()


def test_a_run_that_saved_no_checkpoint_takes_the_new_config(tmp_path):
    """A config.json left by a run that never reached a checkpoint does not block the corrected re-run."""
    import ml_collections

    from fairjax import config as config_lib

    old = ml_collections.ConfigDict({"seed": 1, "lr": 0.1})
    assert config_lib.check_or_save(old, str(tmp_path)) == []
    new = ml_collections.ConfigDict({"seed": 2, "lr": 0.1})
    with pytest.raises(config_lib.ConfigError, match="differs in: seed"):
        config_lib.check_or_save(new, str(tmp_path), resumable=True)
    assert config_lib.check_or_save(new, str(tmp_path), resumable=False) == []
    assert json.load(open(tmp_path / "config.json"))["seed"] == 2
    assert not train.has_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    assert train.has_checkpoint(str(tmp_path))


@pytest.mark.slow
def test_two_runs_one_workdir(tmp_path):
    """Two real ``fairjax.train`` processes on one workdir (issue 23: steps logged twice, orbax crashed): the
    second is refused in one line naming the first's pid and leaves no trace; the first trains on, stops on
    SIGTERM after its save, releases the lock, and metrics.jsonl has every step once. ~20 s: two JAX processes."""
    wd = tmp_path / "wd"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "fairjax.train", "--config", MOG, "--workdir", str(wd), "--config.total_steps=1000000",
           "--config.log_every_steps=50", "--config.checkpoint.every_steps=0", "--config.progress_bar=false"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (wd / "metrics.jsonl").exists() or not (wd / "metrics.jsonl").read_text():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first run never logged a step"
            time.sleep(0.2)
        lock = json.loads((wd / ".lock").read_text())
        assert lock["pid"] == first.pid
        before = sorted(os.listdir(wd))
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        err = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert second.returncode == 2 and len(err) == 1, second.stderr
        assert err[0].startswith("error: --workdir") and "in use by another run" in err[0] and f"pid {first.pid}" in err[0]
        assert "Traceback" not in second.stderr and sorted(os.listdir(wd)) == before
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=240)
    assert first.returncode in (0, 143), err  # 143 once issue 19 makes a preempted run exit non-zero
    assert "Traceback" not in err
    assert not (wd / ".lock").exists()  # released on exit
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert steps and len(steps) == len(set(steps)) and steps == sorted(steps)
    assert train.has_checkpoint(str(wd))  # the save on SIGTERM
