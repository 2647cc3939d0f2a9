"""Bad input to ``python -m fairjax.evaluate``: exit 2, one ``error:`` line naming the problem, no traceback,
every model, LoRA, config and OUT unchanged (issue 23). Every case fails before a model is loaded."""

from __future__ import annotations

import errno
import os

import pytest

from _bad_inputs import held_by_other_process, inject_mkdir_error, linked_copy, readonly_dir, refused
from fairjax import evaluate

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy_world.py")


def argv(m, out, *extra, model=None):
    return ["--model", model or m["model"], "--out", str(out), *extra]


def _nested(m, t, what):
    outer = t / "outer"
    outer.mkdir()
    if what == "config":
        cfg = outer / "eval_config.py"
        cfg.write_text(open(CONFIG).read())
        return argv(m, outer, "--config", str(cfg), "--overwrite")
    if what == "lora":
        lora = outer / "lora.safetensors"
        lora.write_bytes(open(m["lora"], "rb").read())
        return argv(m, outer, "--lora", str(lora), "--overwrite")
    return argv(m, outer, "--overwrite", model=linked_copy(m["model"], str(outer / "model")))


# id -> (argv from (fixture, tmp_path), words the line must hold)
CASES = {
    "out_equals_model": (lambda m, t: argv(m, m["model"], "--overwrite"), ["--out", "equals model 'model'"]),
    "out_equals_base": (lambda m, t: argv(m, m["model"], "--base", m["model"], "--name", "x", "--overwrite"),
                        ["equals --base"]),
    "out_inside_model": (lambda m, t: argv(m, os.path.join(m["model"], "eval"), "--overwrite"), ["is inside model"]),
    "out_contains_model": (lambda m, t: _nested(m, t, "model"), ["contains model"]),
    "out_contains_lora": (lambda m, t: _nested(m, t, "lora"), ["contains LoRA of 'model'"]),
    "out_contains_config": (lambda m, t: _nested(m, t, "config"), ["contains --config"]),
    "out_exists": (lambda m, t: ((t / "out").mkdir(), argv(m, t / "out"))[1], ["already exists", "--overwrite"]),
    "out_is_a_file": (lambda m, t: ((t / "out").write_text("x"), argv(m, t / "out", "--overwrite"))[1],
                      ["is a file, not a folder"]),
    "model_missing": (lambda m, t: argv(m, t / "out", model=str(t / "none")), ["model directory not found"]),
    "lora_missing": (lambda m, t: argv(m, t / "out", "--lora", str(t / "none.safetensors")), ["LoRA file not found"]),
    "name_is_the_base_name": (lambda m, t: argv(m, t / "out", "--base", m["model"], "--name", "base"),
                              ["is also the base's name"]),
    "config_missing": (lambda m, t: argv(m, t / "out", "--config", str(t / "none.py")), ["config file", "not found"]),
    "config_without_eval_section": (lambda m, t: argv(m, t / "out", "--config", CONFIG.replace(
        "toy_world.py", "popalign_mog.py")), ["has no 'sample' section"]),
    "unknown_override_key": (lambda m, t: argv(m, t / "out", "--config.eval.n_nutral=3"), ["unknown config key"]),
    "override_wrong_type": (lambda m, t: argv(m, t / "out", "--config.eval.n_neutral=many"), ["cannot parse 'many'"]),
    "n_neutral_0": (lambda m, t: argv(m, t / "out", "--config.eval.n_neutral=0"),
                    ["config.eval.n_neutral=0 is out of range", "an integer >= 1"]),
    "n_identity_negative": (lambda m, t: argv(m, t / "out", "--config.eval.n_identity=-1"), ["config.eval.n_identity"]),
    "eval_seed_negative": (lambda m, t: argv(m, t / "out", "--config.eval.seed=-1"), ["config.eval.seed=-1",
                                                                                     "2**32 - 1"]),
    "classifier_unknown": (lambda m, t: argv(m, t / "out", "--config.eval.classifier=eyes"),
                           ["config.eval.classifier='eyes'", "one of 'deepface', 'toy'"]),
    "n_resamples_0": (lambda m, t: argv(m, t / "out", "--config.eval.n_resamples=0"), ["config.eval.n_resamples"]),
    "sample_steps_0": (lambda m, t: argv(m, t / "out", "--config.sample.steps=0"), ["config.sample.steps=0"]),
    "sampler_unknown": (lambda m, t: argv(m, t / "out", "--config.sample.sampler=heun"), ["config.sample.sampler"]),
    "sample_batch_size_0": (lambda m, t: argv(m, t / "out", "--config.sample.batch_size=0"),
                            ["config.sample.batch_size=0"]),
    "two_bad_values_in_one_line": (lambda m, t: argv(m, t / "out", "--config.sample.steps=0",
                                                     "--config.eval.n_neutral=0"),
                                   ["config.sample.steps=0", "config.eval.n_neutral=0"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(micro_sdxl, tmp_path, capsys, case):
    make, needles = CASES[case]
    refused(evaluate.main, make(micro_sdxl, tmp_path), capsys, needles, roots=[tmp_path, micro_sdxl["root"]])


def test_out_locked_by_another_run(micro_sdxl, tmp_path, capsys):
    out = str(tmp_path / "out")
    with held_by_other_process(out) as pid:
        refused(evaluate.main, argv(micro_sdxl, out), capsys, ["in use by another run", f"pid {pid}"],
                roots=[tmp_path, micro_sdxl["root"]])


def test_out_on_a_read_only_file_system(micro_sdxl, tmp_path, capsys):
    with readonly_dir(tmp_path / "ro") as ro:
        refused(evaluate.main, argv(micro_sdxl, os.path.join(ro, "out")), capsys, ["cannot write --out"],
                roots=[tmp_path, micro_sdxl["root"]])


def test_out_read_only_injected(micro_sdxl, tmp_path, capsys, monkeypatch):
    inject_mkdir_error(monkeypatch, str(tmp_path), errno.EROFS)
    refused(evaluate.main, argv(micro_sdxl, tmp_path / "out"), capsys, ["read-only file system"],
            roots=[tmp_path, micro_sdxl["root"]])
