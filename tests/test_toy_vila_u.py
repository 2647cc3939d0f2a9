"""The unified-MLLM toy world: the shipped toy VILA-U (manifest, biased generation), the main job
(``python -m fairjax.toy.vila_u``: quick preset end to end; the default preset's target under the slow
marker) and the locate-then-fix pieces (``fairjax.analysis.locate``: the tokenizer flip rate and the
per-layer linear probe, on inputs whose answer is known)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from fairjax.analysis.locate import linear_probe, tokenizer_flip_rate
from fairjax.errors import UserError
from fairjax.toy import vila_u_model
from fairjax.toy.world import identity_grid


def test_shipped_model_matches_its_manifest():
    man = vila_u_model.check(vila_u_model.ASSET_DIR)
    assert len(man["files"]) >= 10
    assert os.path.isfile(os.path.join(vila_u_model.ASSET_DIR, "vision_tower", "params.safetensors"))
    # the recorded build-time measurement says the generation is biased the way the corpus is
    doc = man["neutral_prompt_shares"]["doctor"]
    assert doc["male"] > 0.7 and man["neutral_prompt_shares"]["teacher"]["male"] < 0.4


def test_check_refuses_a_changed_file(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(vila_u_model.ASSET_DIR, d)
    with open(d / "toy_world.json", "a") as f:
        f.write(" ")
    with pytest.raises(UserError, match="changed \\['toy_world.json'\\]"):
        vila_u_model.check(str(d))


def _toy_images():
    w = vila_u_model.world()
    images = np.stack([w.render(o, g, r) for o in w.occupations for g, r in identity_grid(w)])
    return w, images


def test_flip_rate_is_zero_for_an_identity_tokenizer_and_one_for_a_swapping_one():
    w, images = _toy_images()
    classify = lambda ims: [w.decode(i) for i in ims]  # noqa: E731
    same = tokenizer_flip_rate(images, lambda x: x.copy(), classify, ["gender", "race"])
    assert same["n"] == len(images) == 32
    assert same["flip_rate"] == {"gender": 0.0, "race": 0.0} and same["lost"] == 0.0

    def swap_shirts(x):  # a "tokenizer" that renders every figure with the other gender's shirt
        out = x.copy()
        male, female = np.asarray(w.shirt_colours["male"]), np.asarray(w.shirt_colours["female"])
        is_m = (out == male).all(-1)
        is_f = (out == female).all(-1)
        out[is_m], out[is_f] = female, male
        return out

    swapped = tokenizer_flip_rate(images, swap_shirts, classify, ["gender", "race"])
    assert swapped["flip_rate"] == {"gender": 1.0, "race": 0.0}
    assert swapped["moves"] == {"female->male": 16, "male->female": 16}


def test_probe_finds_a_planted_attribute_direction():
    rng = np.random.default_rng(0)
    n, layers, h = 400, 5, 24
    labels = rng.choice(["male", "female"], n)
    feats = rng.standard_normal((n, layers, h))
    direction = rng.standard_normal(h)
    direction /= np.linalg.norm(direction)
    feats[:, 3] += 1.5 * np.where(labels == "male", 1.0, -1.0)[:, None] * direction
    res = linear_probe(feats, list(labels), seed=1)
    acc = res["accuracy"]
    assert acc[3] > 0.9, acc
    assert max(acc[:3] + acc[4:]) < 0.65, acc
    assert 0.4 < res["chance"] < 0.6


def _check_quick_outputs(wd):
    """What the quick main job (with its locate-then-fix analysis) writes: the four models' metrics, the shares
    of the base's neutral images, the report, and each locate page."""
    with open(os.path.join(wd, "result.json")) as f:
        saved = json.load(f)
    assert saved["metrics"].keys() == {"base", "sft", "bpo", "dpo"}
    for m in saved["metrics"].values():
        assert set(m["discrepancy"]) >= {"gender", "race"} and 0 <= m["recall"]["both"] <= 1
    assert set(saved["shares"]["base"]) == {"doctor", "chef", "pilot", "teacher"}
    assert os.path.isfile(saved["html"])
    for name in ("base", "bpo"):
        with open(os.path.join(wd, "locate", name, "locate.json")) as f:
            loc = json.load(f)
        for key in ("tokenizer_flip_rate", "understanding_accuracy", "generation_discrepancy", "probe_accuracy"):
            assert key in loc
        assert os.path.isfile(os.path.join(wd, "locate", name, "index.html"))
    assert set(saved["locate_moved"]["generation_discrepancy"]) == {"gender", "race"}
    assert saved["locate_moved"]["tokenizer_flip_rate"] == {"gender": 0.0, "race": 0.0}  # BPO leaves it alone
    page = open(saved["locate_compare_html"]).read()
    assert "base vs bpo" in page and 'src="base/shares.png"' in page and 'src="bpo/shares.png"' in page
    # the base's generation is biased (the recorded shares of its neutral images)
    assert saved["shares"]["base"]["doctor"]["male"] > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_main_job_bpo_halves_both_discrepancies_and_keeps_recall(tmp_path, seed):
    from fairjax.toy.vila_u import run

    res = run(str(tmp_path / "w"), None, seed=seed, locate=False)
    t = res["target"]
    assert t["gender_ratio"] <= 0.5 and t["race_ratio"] <= 0.5, t
    assert t["recall_ratio"] >= 0.95, t


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from fairjax.locate_bias import main as locate_main
    from fairjax.toy.vila_u import main as job_main

    assert job_main(["--workdir", str(tmp_path / "w"), "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert locate_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert locate_main(["--model", vila_u_model.ASSET_DIR, "--lora", str(tmp_path / "x.safetensors"),
                        "--out", str(tmp_path / "o")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_locate_bias_stops_on_sigint_with_one_line_and_writes_nothing(tmp_path, capsys):
    """Ctrl-C during ``python -m fairjax.locate_bias`` (the job's guard caught it): it stops at its next
    generation batch with one line and 130, and writes nothing (it had no guard: a traceback)."""
    import signal

    from fairjax.checkpoint import PreemptionGuard
    from fairjax.locate_bias import main as locate_main

    with PreemptionGuard():
        os.kill(os.getpid(), signal.SIGINT)
        assert locate_main(["--model", vila_u_model.ASSET_DIR, "--out", str(tmp_path / "o"), "--n", "2"]) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("fairjax: attention auto")]
    assert len(err) == 1 and err[0].startswith("stopped by SIGINT while generating images (0 of "), err
    assert os.listdir(tmp_path) == []


def test_side_by_side_locate_page_shows_each_model_and_the_change(tmp_path):
    from fairjax.analysis.locate import compare_html
    from fairjax.errors import UserError

    for name, disc in (("base", 0.30), ("bpo", 0.05)):
        d = tmp_path / name
        d.mkdir()
        (d / "locate.json").write_text(json.dumps({"summary": {
            "tokenizer_flip_rate": {"gender": 0.0}, "generation_discrepancy": {"gender": disc}}}))
        (d / "shares.png").write_bytes(b"png")
    page = open(compare_html({"base": str(tmp_path / "base"), "bpo": str(tmp_path / "bpo")}, str(tmp_path))).read()
    assert "<th>bpo - base</th>" in page and "gender: 0.300" in page and "gender: 0.050" in page
    assert "gender: -0.250" in page and "gender: +0.000" in page  # 0.05 - 0.30; the flip rate unchanged
    assert 'src="base/shares.png"' in page and 'src="bpo/shares.png"' in page
    with pytest.raises(UserError, match="no locate result to compare"):
        compare_html({"base": str(tmp_path / "base"), "x": str(tmp_path / "missing")}, str(tmp_path / "o"))


def test_config_overrides_reach_every_stage_or_one_and_unknown_keys_lose_nothing(tmp_path, capsys):
    from fairjax.toy.vila_u import STAGES, apply_stage_overrides, main as job_main, make_config

    cfgs = {s: make_config(None, s) for s in STAGES}
    betas = {s: cfgs[s].get("beta") for s in STAGES}
    apply_stage_overrides(cfgs, {"optimizer.lr": "0.01", "bpo.beta": "0.25", "prefs.n_neutral": "7"})
    assert all(cfgs[s].optimizer.lr == 0.01 and cfgs[s].prefs.n_neutral == 7 for s in STAGES)
    assert cfgs["bpo"].beta == 0.25 and cfgs["dpo"].beta == betas["dpo"] != 0.25
    assert job_main(["--workdir", str(tmp_path / "w"), "--config.optimizer.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optimizer.lrr'" in err and len(err.strip().splitlines()) == 1, err
    assert job_main(["--workdir", str(tmp_path / "w"), "--config.dpo.nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.rebuild
def test_rebuild_reproduces_the_shipped_files(tmp_path):
    """``python -m fairjax.toy.vila_u_model --out DIR`` (about 5 minutes on 2 cores) writes the shipped files bit
    for bit, as a command on one CPU device (``pytest -m rebuild``: outside the default run, since XLA's CPU
    code and so the bits differ between ISAs, e.g. AVX2 and AVX-512) (the test session's 8 virtual devices change XLA's CPU numerics, so
    the build runs in a subprocess without them; the same jax / flax / optax / tokenizers versions as the
    manifest records)."""
    import subprocess
    import sys

    man = vila_u_model.check(vila_u_model.ASSET_DIR)
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    out = str(tmp_path / "m")
    subprocess.run([sys.executable, "-m", "fairjax.toy.vila_u_model", "--out", out, "--measure-n", "20"], env=env,
                   check=True, capture_output=True)
    assert vila_u_model.file_digests(out) == man["files"]


def test_sigterm_stops_after_a_saved_stage_and_a_rerun_resumes(tmp_path):
    """The quick main job from the command line, with SIGTERM during stage-2 training: exit 143 with a
    checkpoint; the same command reuses the pairs and stage 1, resumes stage 2 from the checkpoint and writes
    everything the quick main job writes (the report and the locate-then-fix pages)."""
    import signal
    import subprocess
    import sys

    wd = str(tmp_path / "w")
    cmd = [sys.executable, "-m", "fairjax.toy.vila_u", "--workdir", wd, "--preset", "quick"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("train step ready") and any(x.startswith("train: bpo") for x in lines):
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "run the same command again to resume" in rest
    import re

    stage = re.search(r"checkpoint saved in (\S+)/checkpoints/", rest).group(1)  # bpo, or dpo on a slow machine
    assert not os.path.exists(os.path.join(stage, "lora.safetensors"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "pairs: reusing" in again.stdout and "train: reusing" in again.stdout
    assert "resumed from" in again.stdout + again.stderr
    _check_quick_outputs(wd)
