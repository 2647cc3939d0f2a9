"""Bad input to ``python -m fairjax.data.build_prefs`` and ``python -m fairjax.analysis.reward_probe``: exit 2,
one ``error:`` line naming the problem, no traceback, every input and OUT unchanged (issue 23). Every case
fails before a model is loaded or a picture generated."""

from __future__ import annotations

import errno
import os

import pytest

from _bad_inputs import held_by_other_process, inject_mkdir_error, linked_copy, readonly_dir, refused
from fairjax.analysis import reward_probe
from fairjax.data import build_prefs

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TOY = os.path.join(CONFIGS, "toy_world.py")


def bp(out, *extra, config=TOY):
    return ["--config", config, "--out", str(out), *extra]


def _nested(m, t, what):
    outer = t / "outer"
    outer.mkdir()
    if what == "config":
        cfg = outer / "prefs_config.py"
        cfg.write_text(open(TOY).read())
        return bp(outer, "--overwrite", config=str(cfg))
    return bp(outer, "--overwrite", f"--config.model.dir={linked_copy(m['model'], str(outer / 'model'))}")


BUILD = {
    "out_equals_model_dir": (lambda m, t: bp(m["model"], "--overwrite", f"--config.model.dir={m['model']}"),
                             ["--out", "equals config.model.dir"]),
    "out_inside_model_dir": (lambda m, t: bp(os.path.join(m["model"], "prefs"), f"--config.model.dir={m['model']}"),
                             ["is inside config.model.dir"]),
    "out_contains_model_dir": (lambda m, t: _nested(m, t, "model"), ["contains config.model.dir"]),
    "out_contains_config": (lambda m, t: _nested(m, t, "config"), ["contains --config"]),
    "out_equals_prefs_lora": (lambda m, t: bp(m["lora"], "--overwrite", f"--config.prefs.lora={m['lora']}"),
                              ["equals config.prefs.lora"]),
    "out_exists": (lambda m, t: ((t / "out").mkdir(), bp(t / "out"))[1], ["already exists", "--overwrite"]),
    "out_is_a_file": (lambda m, t: ((t / "out").write_text("x"), bp(t / "out", "--overwrite"))[1],
                      ["is a file, not a folder"]),
    "config_missing": (lambda m, t: bp(t / "out", config=str(t / "none.py")), ["config file", "not found"]),
    "config_without_prefs": (lambda m, t: bp(t / "out", config=os.path.join(CONFIGS, "popalign_mog.py")),
                             ["has no 'prefs' section"]),
    "unknown_preset": (lambda m, t: bp(t / "out", config=TOY + ":huge"), ["unknown preset 'huge'"]),
    "unknown_key": (lambda m, t: bp(t / "out", "--config.prefs.n_neutrals=3"), ["unknown config key"]),
    "n_neutral_0": (lambda m, t: bp(t / "out", "--config.prefs.n_neutral=0"), ["config.prefs.n_neutral=0",
                                                                             "an integer >= 1"]),
    "n_identity_0": (lambda m, t: bp(t / "out", "--config.prefs.n_identity=0"), ["config.prefs.n_identity=0"]),
    "prefs_seed_too_large": (lambda m, t: bp(t / "out", f"--config.prefs.seed={2**32}"), ["config.prefs.seed"]),
    "classifier_unknown": (lambda m, t: bp(t / "out", "--config.prefs.classifier=eyes"), ["config.prefs.classifier"]),
    "sample_steps_0": (lambda m, t: bp(t / "out", "--config.sample.steps=0"), ["config.sample.steps=0"]),
    "sampler_unknown": (lambda m, t: bp(t / "out", "--config.sample.sampler=heun"), ["config.sample.sampler"]),
    "model_dir_missing": (lambda m, t: bp(t / "out", f"--config.model.dir={t / 'none'}"), ["none"]),
    "neutral_prompt_empty": (lambda m, t: bp(t / "out", "--config.prefs.neutral_prompts=['a doctor', ' ']"),
                             ["prefs.neutral_prompts[1] is empty"]),
    "identity_template_without_prompt": (
        lambda m, t: bp(t / "out", "--config.prefs.identity_template='a photo of a {race} {gender} person'"),
        ["prefs.identity_template=", "lacks {prompt}"]),
    "keywords_not_the_classifier_classes": (lambda m, t: bp(t / "out", "--config.prefs.keywords.genders=['robot']"),
                                            ["differ from the classifier's classes"]),
}


def rp(m, out, *extra):
    return ["--data", m["data"], "--base", m["model"], "--lora", m["lora"], "--out", str(out), *extra]


PROBE = {
    "out_equals_data": (lambda m, t: rp(m, m["data"], "--overwrite"), ["--out", "equals --data"]),
    "out_inside_base": (lambda m, t: rp(m, os.path.join(m["model"], "probe")), ["is inside --base"]),
    "out_equals_lora": (lambda m, t: rp(m, m["lora"], "--overwrite"), ["equals --lora"]),
    "out_exists": (lambda m, t: ((t / "out").mkdir(), rp(m, t / "out"))[1], ["already exists"]),
    "out_is_a_file": (lambda m, t: ((t / "out").write_text("x"), rp(m, t / "out", "--overwrite"))[1],
                      ["is a file, not a folder"]),
    "tuned_and_lora": (lambda m, t: rp(m, t / "out", "--tuned", m["model"]), ["exactly one of --tuned"]),
    "neither_tuned_nor_lora": (lambda m, t: ["--data", m["data"], "--base", m["model"], "--out", str(t / "out")],
                               ["exactly one of --tuned"]),
    "no_base": (lambda m, t: ["--data", m["data"], "--tuned", m["model"], "--out", str(t / "out")], ["pass --base"]),
    "draws_0": (lambda m, t: rp(m, t / "out", "--draws", "0"), ["--draws 0 must be >= 1"]),
    "buckets_0": (lambda m, t: rp(m, t / "out", "--buckets", "0"), ["--buckets 0 must be >= 1"]),
    "batch_size_0": (lambda m, t: rp(m, t / "out", "--batch-size", "0"), ["--batch-size 0"]),
    "max_records_negative": (lambda m, t: rp(m, t / "out", "--max-records", "-1"), ["--max-records -1"]),
    "seed_negative": (lambda m, t: rp(m, t / "out", "--seed", "-1"), ["--seed must be in [0, 2**32)"]),
    "data_missing": (lambda m, t: ["--data", str(t / "none"), "--base", m["model"], "--lora", m["lora"], "--out",
                                   str(t / "out")], ["no preference dataset"]),
    "data_without_labels": (lambda m, t: rp(m, t / "out"), ["has no attribute labels"]),
}


@pytest.mark.parametrize("case", sorted(BUILD))
def test_build_prefs_bad_input(micro_sdxl, tmp_path, capsys, case):
    make, needles = BUILD[case]
    refused(build_prefs.main, make(micro_sdxl, tmp_path), capsys, needles, roots=[tmp_path, micro_sdxl["root"]])


@pytest.mark.parametrize("case", sorted(PROBE))
def test_reward_probe_bad_input(micro_sdxl, tmp_path, capsys, case):
    make, needles = PROBE[case]
    refused(reward_probe.main, make(micro_sdxl, tmp_path), capsys, needles, roots=[tmp_path, micro_sdxl["root"]])


@pytest.mark.parametrize("which", ["build_prefs", "reward_probe"])
def test_out_locked_by_another_run(micro_sdxl, tmp_path, capsys, which):
    out = str(tmp_path / "out")
    main, args = (build_prefs.main, bp(out)) if which == "build_prefs" else (reward_probe.main, rp(micro_sdxl, out))
    with held_by_other_process(out) as pid:
        refused(main, args, capsys, ["in use by another run", f"pid {pid}"], roots=[tmp_path, micro_sdxl["root"]])


@pytest.mark.parametrize("which", ["build_prefs", "reward_probe"])
def test_out_on_a_read_only_file_system(micro_sdxl, tmp_path, capsys, which):
    with readonly_dir(tmp_path / "ro") as ro:
        out = os.path.join(ro, "out")
        main, args = (build_prefs.main, bp(out)) if which == "build_prefs" else (reward_probe.main,
                                                                                rp(micro_sdxl, out))
        refused(main, args, capsys, ["cannot write --out"], roots=[tmp_path, micro_sdxl["root"]])


def test_out_read_only_injected(micro_sdxl, tmp_path, capsys, monkeypatch):
    inject_mkdir_error(monkeypatch, str(tmp_path), errno.EACCES)
    refused(build_prefs.main, bp(tmp_path / "out"), capsys, ["permission denied"], roots=[tmp_path, micro_sdxl["root"]])
