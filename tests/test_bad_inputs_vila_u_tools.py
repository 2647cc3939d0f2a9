"""Bad input to ``tools/convert_vila_u.py`` and ``tools/export_vila_u.py``: exit 2, one ``error:`` line
naming the problem, no traceback, every input and OUT unchanged (issue 23). The source folder has the
tiny model's real configs and its LLM exported to transformers layout, and no vision weights: every
convert case here fails before the vision tower would be read."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from _bad_inputs import (held_by_other_process, inject_mkdir_error, linked_copy, readonly_dir, refused, replace_file,
                         tool, write_raw_safetensors)

convert = tool("convert_vila_u")
export = tool("export_vila_u")


def _src_with(v, t, rel, text=None, header=None):
    bad = linked_copy(v["src"], str(t / "bad_src"), real=(rel,))
    if header is not None:
        os.remove(os.path.join(bad, rel))
        write_raw_safetensors(os.path.join(bad, rel), header)
    else:
        replace_file(os.path.join(bad, rel), text)
    return bad


def _no_part(v, t, part):
    bad = linked_copy(v["src"], str(t / "bad_src"))
    os.remove(os.path.join(bad, part))
    return bad


def c(v, src, out, *extra):
    return [src, out, "--siglip-config", v["siglip"], *extra]


def _nested_src(v, t):
    outer = t / "outer"
    outer.mkdir()
    return c(v, linked_copy(v["src"], str(outer / "src")), outer, "--overwrite")


CONVERT = {
    "out_equals_src": (lambda v, t: c(v, v["src"], v["src"], "--overwrite"), ["OUT", "equals SRC"]),
    "out_inside_src": (lambda v, t: c(v, v["src"], os.path.join(v["src"], "llm", "x"), "--overwrite"),
                       ["is inside SRC"]),
    "out_contains_src": (_nested_src, ["contains SRC"]),
    "out_equals_siglip_config": (lambda v, t: c(v, v["src"], v["siglip"], "--overwrite"),
                                 ["equals --siglip-config"]),
    "out_exists": (lambda v, t: ((t / "out").mkdir(), c(v, v["src"], t / "out"))[1], ["already exists"]),
    "out_is_a_file": (lambda v, t: ((t / "out").write_text("x"), c(v, v["src"], t / "out", "--overwrite"))[1],
                      ["is a file, not a folder"]),
    "src_missing": (lambda v, t: c(v, t / "none", t / "out"), ["not a folder"]),
    "src_without_mm_projector": (lambda v, t: c(v, _no_part(v, t, "mm_projector"), t / "out"),
                                 ["missing mm_projector/"]),
    "llm_config_not_an_object": (lambda v, t: c(v, _src_with(v, t, "llm/config.json", '["llama"]'), t / "out"),
                                 ["llm/config.json", "expected a JSON object"]),
    "siglip_config_not_an_object": (lambda v, t: ((t / "s.json").write_text("null"),
                                                  [v["src"], t / "out", "--siglip-config", t / "s.json"])[1],
                                    ["s.json", "expected a JSON object"]),
    "siglip_config_missing": (lambda v, t: [v["src"], t / "out", "--siglip-config", t / "none.json"],
                              ["none.json: file not found"]),
    "llm_weights_header_not_an_object": (lambda v, t: c(v, _src_with(v, t, "llm/model.safetensors", header="x"),
                                                        t / "out"),
                                         ["llm/", "not an object"]),
    "no_vision_weights": (lambda v, t: c(v, v["src"], t / "out"), ["vision_tower/", "no model.safetensors"]),
}


def _nested_model(v, t):
    outer = t / "outer"
    outer.mkdir()
    return [linked_copy(v["model"], str(outer / "model")), outer, "--overwrite"]


def _int_lora(v, t):
    from fairjax.io.safetensors import SafetensorsReader, write_safetensors

    path = str(t / "int_lora.safetensors")
    with SafetensorsReader(v["lora"]) as r:
        items, meta = [(k, np.asarray(r[k]).view(np.int32)) for k in r.keys()], r.metadata
    write_safetensors(path, items, meta)
    return [v["model"], t / "out", "--lora", path]


EXPORT = {
    "out_equals_model_dir": (lambda v, t: [v["model"], v["model"], "--overwrite"], ["OUT", "equals MODEL_DIR"]),
    "out_inside_model_dir": (lambda v, t: [v["model"], os.path.join(v["model"], "llm", "x"), "--overwrite"],
                             ["is inside MODEL_DIR"]),
    "out_contains_model_dir": (_nested_model, ["contains MODEL_DIR"]),
    "out_equals_lora": (lambda v, t: [v["model"], v["lora"], "--lora", v["lora"], "--overwrite"], ["equals --lora"]),
    "out_exists": (lambda v, t: ((t / "out").mkdir(), [v["model"], t / "out"])[1], ["already exists"]),
    "out_is_a_file": (lambda v, t: ((t / "out").write_text("x"), [v["model"], t / "out", "--overwrite"])[1],
                      ["is a file, not a folder"]),
    "merge_without_lora": (lambda v, t: [v["model"], t / "out", "--merge"], ["--merge needs --lora"]),
    "merge_lora_wrong_shapes": (lambda v, t: [v["model"], t / "out", "--lora", v["lora_bad"], "--merge"],
                                ["does not fit", "needs a("]),
    "adapter_lora_wrong_shapes": (lambda v, t: [v["model"], t / "out", "--lora", v["lora_bad"]],
                                  ["do not fit the kernel"]),
    "lora_missing": (lambda v, t: [v["model"], t / "out", "--lora", t / "none.safetensors"], ["LoRA file not found"]),
    "lora_is_a_folder": (lambda v, t: ((t / "d").mkdir(), [v["model"], t / "out", "--lora", t / "d"])[1],
                         ["is a folder"]),
    "lora_integer_dtype": (_int_lora, ["not floating point", "(I32)"]),
    "model_dir_missing": (lambda v, t: [t / "none", t / "out"], ["model directory not found"]),
    "llm_config_not_an_object": (lambda v, t: [(lambda b: (replace_file(os.path.join(b, "llm", "config.json"), "[]"),
                                                           b)[1])(linked_copy(v["model"], str(t / "bad"),
                                                                              real=("llm/config.json",))),
                                               t / "out"], ["config.json", "expected a JSON object"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT))
def test_convert_bad_input(tiny_vila_u, tmp_path, capsys, case):
    make, needles = CONVERT[case]
    refused(convert.main, make(tiny_vila_u, tmp_path), capsys, needles, roots=[tmp_path, tiny_vila_u["root"]])


@pytest.mark.parametrize("case", sorted(EXPORT))
def test_export_bad_input(tiny_vila_u, tmp_path, capsys, case):
    make, needles = EXPORT[case]
    refused(export.main, make(tiny_vila_u, tmp_path), capsys, needles, roots=[tmp_path, tiny_vila_u["root"]])


@pytest.mark.parametrize("which", ["convert", "export"])
def test_out_locked_by_another_run(tiny_vila_u, tmp_path, capsys, which):
    out = str(tmp_path / "out")
    main, args = (convert.main, c(tiny_vila_u, tiny_vila_u["src"], out)) if which == "convert" else \
        (export.main, [tiny_vila_u["model"], out, "--lora", tiny_vila_u["lora"]])
    with held_by_other_process(out) as pid:
        refused(main, args, capsys, ["in use by another run", f"pid {pid}"], roots=[tmp_path, tiny_vila_u["root"]])


@pytest.mark.parametrize("which", ["convert", "export"])
def test_out_on_a_read_only_file_system(tiny_vila_u, tmp_path, capsys, which):
    with readonly_dir(tmp_path / "ro") as ro:
        out = os.path.join(ro, "out")
        main, args = (convert.main, c(tiny_vila_u, tiny_vila_u["src"], out)) if which == "convert" else \
            (export.main, [tiny_vila_u["model"], out])
        refused(main, args, capsys, ["cannot write OUT"], roots=[tmp_path, tiny_vila_u["root"]])


def test_out_read_only_injected(tiny_vila_u, tmp_path, capsys, monkeypatch):
    inject_mkdir_error(monkeypatch, str(tmp_path), errno.EPERM)
    refused(export.main, [tiny_vila_u["model"], tmp_path / "out", "--lora", tiny_vila_u["lora"]], capsys,
            ["cannot write OUT", "operation not permitted"], roots=[tmp_path, tiny_vila_u["root"]])
