"""python -m fairjax.evaluate on the shipped toy model: prompts, model resolution, the report files."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fairjax import evaluate as ev
from fairjax.errors import UserError
from fairjax.toy.config import make_config
from fairjax.toy.model import ASSET_DIR


def _small_config():
    cfg = make_config()
    cfg.eval.occupations = ["doctor", "teacher"]
    cfg.eval.n_neutral = 3
    cfg.eval.n_identity = 1
    cfg.eval.n_resamples = 50
    cfg.eval.grid_images = 4
    cfg.sample.steps = 10
    cfg.sample.batch_size = 32
    return cfg


def test_eval_jobs():
    cfg = _small_config()
    jobs = ev.eval_jobs(cfg.eval)
    assert jobs[:2] == [("a doctor", None, 3), ("a teacher", None, 3)]
    assert len(jobs) == 2 + 2 * 8
    assert ("a violet female teacher", {"gender": "female", "race": "violet"}, 1) in jobs
    sdxl = ev.default_config().eval
    first = ev.eval_jobs(sdxl)[0]
    assert first[0].startswith("best quality, a realistic photo of a") and first[1] is None


def test_unet_only_model_gets_the_base_components(tmp_path):
    from fairjax.io.model_dir import write_index
    from fairjax.diffusion.generator import load_any_pipeline

    tuned = tmp_path / "tuned"
    shutil.copytree(os.path.join(ASSET_DIR, "unet"), tuned / "unet")
    with pytest.raises(UserError, match="names no base model"):
        ev.complete_model_dir(str(tuned), None, str(tmp_path))
    write_index(str(tuned), ["unet"], base_model=ASSET_DIR)  # what the trainer writes
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = ev.complete_model_dir(str(tuned), None, str(scratch))
    assert os.path.realpath(os.path.join(path, "unet")) == os.path.realpath(tuned / "unet")
    assert os.path.realpath(os.path.join(path, "text_encoder")) == os.path.realpath(os.path.join(ASSET_DIR, "text_encoder"))
    pipe = load_any_pipeline(path)
    assert pipe.unet.config["in_channels"] == 3


def _lora_file(path):
    """A random LoRA on the shipped UNet's attention (non-zero b, so the model changes)."""
    from fairjax import lora
    from fairjax.models import unet

    _, params = unet.load(ASSET_DIR)
    lo = lora.init(params, r"attn2/to_(k|v)/kernel$", 2, 2.0, jax.random.key(0))
    lo = {k: {"a": v["a"], "b": 0.5 * jax.random.normal(jax.random.key(1), v["b"].shape)} for k, v in lo.items()}
    lora.save(path, lo, alpha=2.0)
    return path


def test_evaluate_writes_the_report(tmp_path, capsys):
    lora_path = _lora_file(str(tmp_path / "l.safetensors"))
    cfg_over = ["--config.eval.occupations=['doctor', 'teacher']", "--config.eval.n_neutral=3",
                "--config.eval.n_identity=1", "--config.eval.n_resamples=50", "--config.eval.grid_images=4",
                "--config.sample.steps=10", "--config.sample.batch_size=32"]
    out = tmp_path / "eval"
    rc = ev.main(["--model", ASSET_DIR, "--lora", lora_path, "--base", ASSET_DIR, "--out", str(out), *cfg_over])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"report: {out}/report/index.html" in printed and "discrepancy (gender): base" in printed
    rep = out / "report"
    for name in ("index.html", "report.json", "frequencies_gender.png", "frequencies_race.png",
                 "per_prompt_delta.csv", "recall_base.csv", "recall_tuned.csv"):
        assert (rep / name).is_file(), name
    assert any((rep / "grids" / "base").iterdir()) and any((rep / "grids" / "tuned").iterdir())
    report = json.loads((rep / "report.json").read_text())
    assert report["models"] == ["base", "tuned"]
    assert set(report["results"]["base"]["discrepancy"]) == {"gender", "race"}
    assert report["classes"]["race"] == ["amber", "cobalt", "jade", "violet"]
    for m in ("base", "tuned"):
        lines = (out / f"records_{m}.jsonl").read_text().splitlines()
        assert len(lines) == 2 * 3 + 16 * 1
        recs = [json.loads(x) for x in lines]
        assert all(os.path.isfile(r["image"]) and r["image"].startswith(str(out)) for r in recs)
        assert sum(r["identity"] is not None for r in recs) == 16
    base_imgs = sorted(os.listdir(out / "images" / "base"))
    assert base_imgs == sorted(os.listdir(out / "images" / "tuned"))
    # the same seeds: the base's images do not depend on what is evaluated beside it
    alone = tmp_path / "alone"
    assert ev.main(["--model", ASSET_DIR, "--out", str(alone), *cfg_over]) == 0
    a = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(alone / "images" / "model" / base_imgs[0]))
    b = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "images" / "base" / base_imgs[0]))
    assert np.array_equal(a, b)
    capsys.readouterr()
    assert ev.main(["--model", ASSET_DIR, "--out", str(alone), *cfg_over]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert ev.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--config",
                    "configs/toy_world.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not found" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    assert ev.main(["--model", ASSET_DIR, "--out", str(tmp_path / "o"), "--config.eval.n_neutral=0"]) == 2
    assert "n_neutral" in capsys.readouterr().err
