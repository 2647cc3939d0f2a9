"""Bad input to ``python -m fairjax.generate``: exit 2, one ``error:`` line naming the problem, no traceback,
every input and output tree unchanged (issue 23; helpers in tests/_bad_inputs.py)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from _bad_inputs import (held_by_other_process, inject_mkdir_error, linked_copy, os_error, readonly_dir, refused,
                         replace_file, small_fs, write_raw_safetensors)
from fairjax import generate


def argv(m, out, *extra, model=None, prompts=None):
    return ["--model", model or m["model"], "--prompts", prompts or m["prompts"], "--out", str(out), "--steps", "1",
            *extra]


def _damaged(m, t, rel, text):
    """A linked copy of the micro model with the file ``rel`` replaced by ``text``."""
    bad = linked_copy(m["model"], str(t / "bad_model"), real=(rel,))
    replace_file(os.path.join(bad, rel), text)
    return bad


def _int_params(m, t):
    """The UNet's params.safetensors with every tensor relabelled I32 (same bytes, same shapes)."""
    from fairjax.io.safetensors import SafetensorsReader, write_safetensors

    bad = linked_copy(m["model"], str(t / "bad_model"), real=("unet/params.safetensors",))
    path = os.path.join(bad, "unet", "params.safetensors")
    with SafetensorsReader(path) as r:
        items = [(k, np.asarray(r[k]).view(np.int32)) for k in r.keys()]
    write_safetensors(path, items)
    return bad


def _corrupt_params(m, t):
    bad = linked_copy(m["model"], str(t / "bad_model"), real=("unet/params.safetensors",))
    write_raw_safetensors(os.path.join(bad, "unet", "params.safetensors"),
                          {"conv_in/bias": {"dtype": "F32", "shape": [32], "data_offsets": [-128, 0]}})
    return bad


def _nested(m, t, what):
    outer = t / "outer"
    outer.mkdir()
    if what == "prompts":
        p = outer / "prompts.txt"
        p.write_text("a cat\n")
        return argv(m, outer, "--overwrite", prompts=str(p))
    return argv(m, outer, "--overwrite", model=linked_copy(m["model"], str(outer / "model")))


# id -> (argv from (fixture, tmp_path), words the line must hold)
CASES = {
    "out_equals_model": (lambda m, t: argv(m, m["model"], "--overwrite"), ["--out", "equals --model"]),
    "out_inside_model": (lambda m, t: argv(m, os.path.join(m["model"], "unet", "imgs"), "--overwrite"),
                         ["is inside --model"]),
    "out_contains_model": (lambda m, t: _nested(m, t, "model"), ["contains --model"]),
    "out_contains_prompts": (lambda m, t: _nested(m, t, "prompts"), ["contains --prompts"]),
    "out_is_link_to_model": (lambda m, t: (os.symlink(m["model"], t / "link"),
                                           argv(m, t / "link", "--overwrite"))[1], ["equals --model"]),
    "out_inside_lora": (lambda m, t: argv(m, os.path.join(m["lora"], "x"), "--overwrite", "--lora", m["lora"]),
                        ["is inside --lora"]),
    "out_exists": (lambda m, t: ((t / "out").mkdir(), argv(m, t / "out"))[1], ["already exists", "--overwrite"]),
    "out_is_a_file": (lambda m, t: ((t / "out").write_text("x"), argv(m, t / "out", "--overwrite"))[1],
                      ["is a file, not a folder"]),
    "prompts_is_a_folder": (lambda m, t: argv(m, t / "out", prompts=str(t)), ["is a folder", "one prompt per line"]),
    "prompts_missing": (lambda m, t: argv(m, t / "out", prompts=str(t / "none.txt")), ["prompt file not found"]),
    "prompts_empty": (lambda m, t: ((t / "p.txt").write_text("# nothing\n\n"),
                                    argv(m, t / "out", prompts=str(t / "p.txt")))[1], ["no prompts"]),
    "prompts_not_utf8": (lambda m, t: ((t / "p.txt").write_bytes(b"a \xff cat\n"),
                                       argv(m, t / "out", prompts=str(t / "p.txt")))[1], ["not UTF-8"]),
    "cfg_nan": (lambda m, t: argv(m, t / "out", "--cfg", "nan"), ["--cfg must be a finite number"]),
    "cfg_inf": (lambda m, t: argv(m, t / "out", "--cfg", "inf"), ["--cfg must be a finite number"]),
    "num_per_prompt_0": (lambda m, t: argv(m, t / "out", "--num-per-prompt", "0"), ["--num-per-prompt must be >= 1"]),
    "steps_0": (lambda m, t: argv(m, t / "out")[:-1] + ["0"], ["--steps must be >= 1"]),
    "batch_size_0": (lambda m, t: argv(m, t / "out", "--batch-size", "0"), ["--batch-size must be >= 1"]),
    "seed_negative": (lambda m, t: argv(m, t / "out", "--seed", "-1"), ["--seed must be in [0, 2**32)"]),
    "height_negative": (lambda m, t: argv(m, t / "out", "--height", "-8"), ["--height must be >= 1"]),
    "guidance_rescale_2": (lambda m, t: argv(m, t / "out", "--guidance-rescale", "2"), ["--guidance-rescale", "[0, 1]"]),
    "lora_missing": (lambda m, t: argv(m, t / "out", "--lora", str(t / "none.safetensors")), ["LoRA file not found"]),
    "lora_is_a_folder": (lambda m, t: argv(m, t / "out", "--lora", str(t)), ["is a folder"]),
    "model_missing": (lambda m, t: argv(m, t / "out", model=str(t / "none")), ["model directory not found"]),
    "unet_config_not_an_object": (lambda m, t: argv(m, t / "out", model=_damaged(m, t, "unet/config.json", "[1, 2]")),
                                  ["unet/config.json", "expected a JSON object"]),
    "unet_config_invalid_json": (lambda m, t: argv(m, t / "out", model=_damaged(m, t, "unet/config.json", "{oops")),
                                 ["unet/config.json", "not valid JSON"]),
    "model_index_not_an_object": (lambda m, t: argv(m, t / "out", model=_damaged(m, t, "model_index.json", '"sdxl"')),
                                  ["model_index.json", "expected a JSON object"]),
    "params_negative_offsets": (lambda m, t: argv(m, t / "out", model=_corrupt_params(m, t)),
                                ["params.safetensors", "data_offsets [-128, 0]"]),
    "params_integer_dtype": (lambda m, t: argv(m, t / "out", model=_int_params(m, t)),
                             ["not floating point", "(I32)"]),
    "lora_wrong_shapes": (lambda m, t: argv(m, t / "out", "--lora", m["lora_bad"]), ["LoRA entry", "needs a("]),
    "lora_not_a_lora_file": (lambda m, t: argv(m, t / "out", "--lora", os.path.join(m["model"], "unet",
                                                                                   "params.safetensors")),
                             ["is not a fairjax LoRA file"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(micro_sdxl, tmp_path, capsys, case):
    make, needles = CASES[case]
    args = make(micro_sdxl, tmp_path)
    refused(generate.main, args, capsys, needles, roots=[tmp_path, micro_sdxl["root"]])


def test_out_locked_by_another_run(micro_sdxl, tmp_path, capsys):
    out = str(tmp_path / "out")
    with held_by_other_process(out) as pid:
        refused(generate.main, argv(micro_sdxl, out), capsys, ["in use by another run", f"pid {pid}"],
                roots=[tmp_path, micro_sdxl["root"]])


def test_out_on_a_read_only_file_system(micro_sdxl, tmp_path, capsys):
    with readonly_dir(tmp_path / "ro") as ro:
        refused(generate.main, argv(micro_sdxl, os.path.join(ro, "out")), capsys, ["cannot write --out"],
                roots=[tmp_path, micro_sdxl["root"]])


def test_out_read_only_injected(micro_sdxl, tmp_path, capsys, monkeypatch):
    inject_mkdir_error(monkeypatch, str(tmp_path))
    refused(generate.main, argv(micro_sdxl, tmp_path / "a" / "out"), capsys, ["cannot write --out",
                                                                              "read-only file system"],
            roots=[tmp_path, micro_sdxl["root"]])


class _Stub:
    """``load_pipeline`` / ``generate`` stand-ins: the output path is under test here, not the model
    (tests/test_generate.py checks the images against diffusers)."""

    def __init__(self, size):
        self.size = size

    def load(self, *a, **k):
        return None

    def generate(self, pipe, prompts, *, num_per_prompt, **k):
        rng = np.random.default_rng(0)
        for p in range(len(prompts)):
            jobs = [(p, i) for i in range(num_per_prompt)]
            images = rng.integers(0, 255, (len(jobs), self.size, self.size, 3), dtype=np.uint8)
            yield jobs, images, np.zeros((len(jobs), 4, 2, 2), np.float32)


def _stub_model(monkeypatch, size):
    from fairjax.diffusion import pipeline as pl

    stub = _Stub(size)
    monkeypatch.setattr(pl, "load_pipeline", stub.load)
    monkeypatch.setattr(pl, "generate", stub.generate)


def test_disk_full_injected(micro_sdxl, tmp_path, capsys, monkeypatch):
    """ENOSPC on the second PNG: one line with the size written so far; the temp folder is gone."""
    _stub_model(monkeypatch, 16)
    from fairjax.io import images

    real, calls = images.write_png, []

    def write_png(path, image):
        calls.append(path)
        if len(calls) == 2:
            raise os_error(errno.ENOSPC, path)
        real(path, image)

    monkeypatch.setattr(generate, "write_png", write_png)
    refused(generate.main, argv(micro_sdxl, tmp_path / "out"), capsys,
            ["disk full writing", "needs at least", "written before the disk filled", "the partial output was removed"],
            roots=[tmp_path, micro_sdxl["root"]])


def test_disk_full_on_a_small_file_system(micro_sdxl, tmp_path, capsys, monkeypatch):
    """A real full disk (a 64 KiB tmpfs, root only): 128x128 noise PNGs (49 KiB each) do not fit."""
    _stub_model(monkeypatch, 128)
    with small_fs(tmp_path / "small", "64k") as small:
        refused(generate.main, argv(micro_sdxl, os.path.join(small, "out"), "--num-per-prompt", "2"), capsys,
                ["disk full writing", "needs at least"], roots=[tmp_path, micro_sdxl["root"]])
        assert os.listdir(small) == []


def test_prompt_lines_are_taken_literally(micro_sdxl, tmp_path, capsys, monkeypatch):
    """``a cat | a dog`` is generated (and recorded) as that whole text, not as "a dog" (issue 23, point 6)."""
    import json

    _stub_model(monkeypatch, 8)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat | a dog\n")
    assert generate.main(argv(micro_sdxl, tmp_path / "out", prompts=str(prompts))) == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "images.jsonl")]
    assert [r["prompt"] for r in rows] == ["a cat | a dog"]
