"""Bad input to ``tools/convert_vila_u.py``, ``tools/export_vila_u.py`` and ``python -m fairjax.locate_bias``:
exit 2, one ``error:`` line naming the problem, no traceback, every input and OUT unchanged (issue 23). The
source folder has the tiny model's real configs and its LLM exported to transformers layout, and no vision
weights: every convert case here fails before the vision tower would be read."""

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


def loc(v, out, *extra, model=None):
    return ["--model", model or v["model"], "--out", str(out), "--n", "2", *extra]


def _nested_locate(v, t, what):
    outer = t / "outer"
    outer.mkdir()
    if what == "lora":
        lora = outer / "lora.safetensors"
        lora.write_bytes(open(v["lora"], "rb").read())
        return loc(v, outer, "--lora", lora, "--overwrite")
    return loc(v, outer, "--overwrite", model=linked_copy(v["model"], str(outer / "model")))


# every case fails before the model is loaded (before, an OUT that is a file was a traceback after the whole
# analysis, and an OUT equal to --model got locate.json, the plots and index.html written into the model dir)
LOCATE = {
    "out_equals_model": (lambda v, t: loc(v, v["model"], "--overwrite"), ["--out", "equals --model"]),
    "out_inside_model": (lambda v, t: loc(v, os.path.join(v["model"], "llm", "loc")), ["is inside --model"]),
    "out_contains_model": (lambda v, t: _nested_locate(v, t, "model"), ["contains --model"]),
    "out_contains_lora": (lambda v, t: _nested_locate(v, t, "lora"), ["contains --lora"]),
    "out_inside_images": (lambda v, t: ((t / "imgs").mkdir(), loc(v, t / "imgs" / "loc", "--images", t / "imgs",
                                                                   "--prompts", "a doctor"))[1],
                          ["is inside --images"]),
    "out_exists": (lambda v, t: ((t / "out").mkdir(), loc(v, t / "out"))[1], ["already exists", "--overwrite"]),
    "out_is_a_file": (lambda v, t: ((t / "out").write_text("x"), loc(v, t / "out", "--overwrite"))[1],
                      ["is a file, not a folder"]),
    "seed_negative": (lambda v, t: loc(v, t / "out", "--seed", "-1"), ["--seed must be in [0, 2**32)"]),
    "fix_steps_negative": (lambda v, t: loc(v, t / "out", "--fix-steps", "-1"), ["--fix-steps -1 must be >= 0"]),
}


@pytest.mark.parametrize("case", sorted(LOCATE))
def test_locate_bias_bad_input(tiny_vila_u, tmp_path, capsys, case):
    from fairjax.analysis import locate

    make, needles = LOCATE[case]
    refused(locate.main, make(tiny_vila_u, tmp_path), capsys, needles, roots=[tmp_path, tiny_vila_u["root"]])


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
