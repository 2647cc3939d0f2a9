"""Bad input to ``tools/export_diffusers.py``: exit 2, one ``error:`` line naming the problem, no traceback,
MODEL_DIR, the LoRA and OUT unchanged (issue 23). MODEL_DIR is the micro SDXL model dir."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from _bad_inputs import (held_by_other_process, inject_mkdir_error, linked_copy, os_error, readonly_dir, refused,
                         replace_file, small_fs, tool)

export = tool("export_diffusers")


def _damaged(m, t, rel, text):
    bad = linked_copy(m["model"], str(t / "bad_model"), real=(rel,))
    replace_file(os.path.join(bad, rel), text)
    return bad


def _int_params(m, t):
    from fairjax.io.safetensors import SafetensorsReader, write_safetensors

    bad = linked_copy(m["model"], str(t / "bad_model"), real=("vae/params.safetensors",))
    path = os.path.join(bad, "vae", "params.safetensors")
    with SafetensorsReader(path) as r:
        items = [(k, np.asarray(r[k]).view(np.int32)) for k in r.keys()]
    write_safetensors(path, items)
    return [bad, t / "out"]


def _nested(m, t, what):
    outer = t / "outer"
    outer.mkdir()
    if what == "lora":
        lora = outer / "lora.safetensors"
        lora.write_bytes(open(m["lora"], "rb").read())
        return [m["model"], outer, "--lora", lora, "--merge", "--overwrite"]
    return [linked_copy(m["model"], str(outer / "model")), outer, "--overwrite"]


# id -> (argv from (fixture, tmp_path), words the line must hold)
CASES = {
    "out_equals_model_dir": (lambda m, t: [m["model"], m["model"], "--overwrite"], ["OUT", "equals MODEL_DIR"]),
    "out_inside_model_dir": (lambda m, t: [m["model"], os.path.join(m["model"], "unet", "x"), "--overwrite"],
                             ["is inside MODEL_DIR"]),
    "out_contains_model_dir": (lambda m, t: _nested(m, t, "model"), ["contains MODEL_DIR"]),
    "out_contains_lora": (lambda m, t: _nested(m, t, "lora"), ["contains --lora"]),
    "lora_file_out_equals_lora": (lambda m, t: [m["model"], m["lora"], "--lora", m["lora"], "--overwrite"],
                                  ["equals --lora"]),
    "out_exists": (lambda m, t: ((t / "out").mkdir(), [m["model"], t / "out"])[1], ["already exists", "--overwrite"]),
    "out_is_a_file": (lambda m, t: ((t / "out").write_text("x"), [m["model"], t / "out", "--overwrite"])[1],
                      ["is a file, not a folder"]),
    "lora_file_out_exists": (lambda m, t: ((t / "o.safetensors").write_text("x"),
                                           [m["model"], t / "o.safetensors", "--lora", m["lora"]])[1],
                             ["already exists"]),
    "lora_file_out_is_a_folder": (lambda m, t: ((t / "o.safetensors").mkdir(),
                                                [m["model"], t / "o.safetensors", "--lora", m["lora"], "--overwrite"])[1],
                                  ["is a folder; pass a file path"]),
    "lora_file_out_parent_missing": (lambda m, t: [m["model"], t / "no" / "o.safetensors", "--lora", m["lora"]],
                                     ["does not exist"]),
    "merge_without_lora": (lambda m, t: [m["model"], t / "out", "--merge"], ["--merge needs --lora"]),
    "merge_lora_wrong_shapes": (lambda m, t: [m["model"], t / "out", "--lora", m["lora_bad"], "--merge"],
                                ["does not fit", "needs a("]),
    "lora_wrong_shapes": (lambda m, t: [m["model"], t / "out.safetensors", "--lora", m["lora_bad"]],
                          ["do not fit the kernel"]),
    "lora_missing": (lambda m, t: [m["model"], t / "out", "--lora", t / "none.safetensors", "--merge"],
                     ["LoRA file not found"]),
    "lora_is_a_folder": (lambda m, t: ((t / "d").mkdir(), [m["model"], t / "out", "--lora", t / "d", "--merge"])[1],
                         ["is a folder"]),
    "lora_not_a_lora_file": (lambda m, t: [m["model"], t / "out", "--merge", "--lora",
                                           os.path.join(m["model"], "unet", "params.safetensors")],
                             ["is not a fairjax LoRA file"]),
    "model_dir_missing": (lambda m, t: [t / "none", t / "out"], ["model directory not found"]),
    "unet_config_not_an_object": (lambda m, t: [_damaged(m, t, "unet/config.json", "[]"), t / "out"],
                                  ["unet/config.json", "expected a JSON object"]),
    "model_index_not_an_object": (lambda m, t: [_damaged(m, t, "model_index.json", "3"), t / "out"],
                                  ["model_index.json", "expected a JSON object"]),
    "params_truncated": (lambda m, t: [_damaged(m, t, "vae/params.safetensors", "\x10"), t / "out"],
                         ["truncated safetensors file"]),
    "params_integer_dtype": (_int_params, ["not floating point", "(I32)"]),
    "scheduler_config_invalid_json": (lambda m, t: [_damaged(m, t, "scheduler/scheduler_config.json", "{"), t / "out"],
                                      ["scheduler/scheduler_config.json", "not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(micro_sdxl, tmp_path, capsys, case):
    make, needles = CASES[case]
    refused(export.main, make(micro_sdxl, tmp_path), capsys, needles, roots=[tmp_path, micro_sdxl["root"]])


def test_out_locked_by_another_run(micro_sdxl, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    with held_by_other_process(out) as pid:
        refused(export.main, [micro_sdxl["model"], out, "--lora", micro_sdxl["lora"]], capsys,
                ["in use by another run", f"pid {pid}"], roots=[tmp_path, micro_sdxl["root"]])


@pytest.mark.parametrize("target", ["folder", "lora_file"])
def test_out_on_a_read_only_file_system(micro_sdxl, tmp_path, capsys, target):
    with readonly_dir(tmp_path / "ro") as ro:
        extra = ["--lora", micro_sdxl["lora"]] if target == "lora_file" else []
        out = os.path.join(ro, "out.safetensors" if target == "lora_file" else "out")
        refused(export.main, [micro_sdxl["model"], out, *extra], capsys, ["cannot write OUT"],
                roots=[tmp_path, micro_sdxl["root"]])


def test_out_read_only_injected(micro_sdxl, tmp_path, capsys, monkeypatch):
    inject_mkdir_error(monkeypatch, str(tmp_path))
    refused(export.main, [micro_sdxl["model"], tmp_path / "out"], capsys, ["read-only file system"],
            roots=[tmp_path, micro_sdxl["root"]])


def test_disk_full_injected_lora_file(micro_sdxl, tmp_path, capsys, monkeypatch):
    """ENOSPC while the LoRA file is written: its temp file is removed, the line gives its size."""
    from fairjax.io import safetensors

    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, b):
            raise os_error(errno.ENOSPC, self.f.name)

    monkeypatch.setattr(safetensors, "open", lambda p, mode="r", *a: Full(real_open(p, mode, *a)) if "w" in mode
                        else real_open(p, mode, *a), raising=False)
    out = tmp_path / "o.safetensors"
    refused(export.main, [micro_sdxl["model"], out, "--lora", micro_sdxl["lora"]], capsys,
            ["disk full writing", str(out), "needs at least"], roots=[tmp_path, micro_sdxl["root"]])


def test_disk_full_on_a_small_file_system(micro_sdxl, tmp_path, capsys):
    """A real full disk (a 64 KiB tmpfs, root only): the exported pipeline (~600 KiB) does not fit."""
    with small_fs(tmp_path / "small", "64k") as small:
        refused(export.main, [micro_sdxl["model"], os.path.join(small, "out")], capsys,
                ["disk full writing", "needs at least"], roots=[tmp_path, micro_sdxl["root"]])
        assert os.listdir(small) == []
