"""Bad input to ``tools/convert_diffusers.py``: exit 2, one ``error:`` line naming the problem, no traceback,
SRC and OUT unchanged (issue 23). SRC is the micro UNet exported to a diffusers ``unet/`` folder; the
damaged copies link every file but the one a case breaks. The safetensors cases are the header checks of
``fairjax.io.safetensors.check_header`` and the shard index rules, as a user meets them."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from _bad_inputs import (held_by_other_process, inject_mkdir_error, linked_copy, os_error, readonly_dir, refused,
                         replace_file, small_fs, tool, write_raw_safetensors)

import fairjax.convert.pipeline as pipeline

convert = tool("convert_diffusers")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _header(src: str) -> tuple[dict, bytes]:
    with open(os.path.join(src, WEIGHTS), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), f.read()


def _bad_weights(src, t, edit):
    """A copy of SRC whose weights file has the header ``edit(header, data)`` returns (header, data)."""
    bad = linked_copy(src, str(t / "bad_src"), real=(WEIGHTS,))
    header, data = edit(*_header(src))
    write_raw_safetensors(os.path.join(bad, WEIGHTS), header, data)
    return [bad, t / "out"]


def _first(header) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _set(header, key, **entry):
    header[key] = dict(header[key], **entry)
    return header


def _negative_offsets(h, d):  # the case: header bytes would have been read as conv_in.bias
    return _set(h, "conv_in.bias", data_offsets=[-128, 0]), d


def _overlap(h, d):
    k = _first(h)
    nxt = min((x for x in h if x not in (k, "__metadata__")), key=lambda x: h[x]["data_offsets"][0])
    b, e = h[nxt]["data_offsets"]
    return _set(h, nxt, data_offsets=[b - 4, e - 4]), d


def _past_end(h, d):
    return h, d[:-16]


def _trailing_bytes(h, d):
    return h, d + b"\0" * 16


def _shape_mismatch(h, d):
    k = _first(h)
    return _set(h, k, shape=[int(np.prod(h[k]["shape"])) + 1]), d


def _unknown_dtype(h, d):
    return _set(h, _first(h), dtype="F33"), d


def _int_dtype(h, d):
    return {k: (dict(v, dtype="I32") if k != "__metadata__" else v) for k, v in h.items()}, d


def _not_an_object(h, d):
    return [1, 2, 3], d


def _duplicate_key(h, d):
    k = _first(h)
    text = json.dumps(h)
    dup = json.dumps({k: h[k]})[1:-1]
    return (text[:-1] + ", " + dup + "}").encode(), d


def _sharded(src, t, index):
    bad = linked_copy(src, str(t / "bad_src"))
    os.remove(os.path.join(bad, WEIGHTS))
    with open(os.path.join(bad, WEIGHTS + ".index.json"), "w") as f:
        f.write(index if isinstance(index, str) else json.dumps(index))
    return [bad, t / "out"]


def _outside_index(src, t):
    """An index naming ``../../outside.safetensors``, a valid file that must never be read."""
    header, data = _header(src)
    outside = t / "outside.safetensors"
    write_raw_safetensors(str(outside), header, data)
    return _sharded(src, t, {"weight_map": {k: "../../outside.safetensors" for k in header if k != "__metadata__"}})


def _nested(src, t):
    outer = t / "outer"
    outer.mkdir()
    return [linked_copy(src, str(outer / "unet")), outer, "--overwrite"]


def _config(src, t, text):
    bad = linked_copy(src, str(t / "bad_src"), real=("config.json",))
    replace_file(os.path.join(bad, "config.json"), text)
    return [bad, t / "out"]


def _pipeline_index(src, t, text):
    pipe = t / "pipe"
    pipe.mkdir()
    linked_copy(src, str(pipe / "unet"))
    (pipe / "model_index.json").write_text(text)
    return [pipe, t / "out"]


def _pipeline_copied_part(src, t, part, cls, files):
    """A pipeline of SRC's UNet and a weight-free ``part`` (``cls``) folder holding ``files`` ({name: text})."""
    pipe = t / "pipe"
    pipe.mkdir()
    linked_copy(src, str(pipe / "unet"))
    (pipe / part).mkdir()
    for name, text in files.items():
        (pipe / part / name).write_text(text)
    (pipe / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"],
                                                       part: ["transformers" if "Token" in cls else "diffusers", cls]}))
    return [pipe, t / "out"]


# id -> (argv from (SRC, tmp_path), words the line must hold)
CASES = {
    "out_equals_src": (lambda s, t: [s, s, "--overwrite"], ["OUT", "equals SRC"]),
    "out_inside_src": (lambda s, t: [s, os.path.join(s, "fj"), "--overwrite"], ["is inside SRC"]),
    "out_contains_src": (_nested, ["contains SRC"]),
    "out_is_link_to_src": (lambda s, t: (os.symlink(s, t / "link"), [s, t / "link", "--overwrite"])[1],
                           ["equals SRC"]),
    "out_exists": (lambda s, t: ((t / "out").mkdir(), [s, t / "out"])[1], ["already exists", "--overwrite"]),
    "out_is_a_file": (lambda s, t: ((t / "out").write_text("x"), [s, t / "out", "--overwrite"])[1],
                      ["is a file, not a folder"]),
    "src_missing": (lambda s, t: [t / "none", t / "out"], ["not a folder"]),
    "src_is_a_file": (lambda s, t: [os.path.join(s, "config.json"), t / "out"], ["not a folder"]),
    "config_not_an_object": (lambda s, t: _config(s, t, "[1, 2]"), ["config.json", "expected a JSON object"]),
    "config_invalid_json": (lambda s, t: _config(s, t, "{nope"), ["config.json", "not valid JSON"]),
    "config_other_class": (lambda s, t: _config(s, t, '{"_class_name": "ControlNetModel"}'),
                           ["ControlNetModel", "has no converter"]),
    "model_index_not_an_object": (lambda s, t: _pipeline_index(s, t, "[]"), ["model_index.json",
                                                                           "expected a JSON object"]),
    "weights_negative_offsets": (lambda s, t: _bad_weights(s, t, _negative_offsets),
                                 ["conv_in.bias", "data_offsets [-128, 0]"]),
    "weights_overlapping_tensors": (lambda s, t: _bad_weights(s, t, _overlap), ["overlap"]),
    "weights_truncated": (lambda s, t: _bad_weights(s, t, _past_end), ["truncated safetensors file"]),
    "weights_bytes_of_no_tensor": (lambda s, t: _bad_weights(s, t, _trailing_bytes), ["belong to no tensor"]),
    "weights_shape_disagrees": (lambda s, t: _bad_weights(s, t, _shape_mismatch), ["needs"]),
    "weights_unknown_dtype": (lambda s, t: _bad_weights(s, t, _unknown_dtype), ["unknown dtype 'F33'"]),
    "weights_integer_dtype": (lambda s, t: _bad_weights(s, t, _int_dtype), ["not floating point", "(I32)"]),
    "weights_header_not_an_object": (lambda s, t: _bad_weights(s, t, _not_an_object), ["not an object"]),
    "weights_duplicate_key": (lambda s, t: _bad_weights(s, t, _duplicate_key), ["duplicate key"]),
    "index_names_file_outside": (_outside_index, ["outside", "only name files in its own folder"]),
    # weight-free folders are copied verbatim: a corrupt JSON file there was copied into a model that failed later
    "scheduler_config_invalid_json": (lambda s, t: _pipeline_copied_part(s, t, "scheduler", "EulerDiscreteScheduler",
                                                                         {"scheduler_config.json": "{"}),
                                      ["scheduler/scheduler_config.json", "not valid JSON", "copy scheduler/"]),
    "tokenizer_vocab_invalid_json": (lambda s, t: _pipeline_copied_part(s, t, "tokenizer", "CLIPTokenizer",
                                                                        {"vocab.json": "garbage", "merges.txt": ""}),
                                     ["tokenizer/vocab.json", "not valid JSON"]),
    "index_invalid_json": (lambda s, t: _sharded(s, t, "{nope"), ["corrupt shard index"]),
    "index_weight_map_not_a_map": (lambda s, t: _sharded(s, t, {"weight_map": ["a"]}), ["corrupt shard index"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(micro_diffusers_unet, tmp_path, capsys, case):
    make, needles = CASES[case]
    args = make(micro_diffusers_unet, tmp_path)
    refused(convert.main, args, capsys, needles, roots=[tmp_path, os.path.dirname(micro_diffusers_unet)])


def test_out_locked_by_another_run(micro_diffusers_unet, tmp_path, capsys):
    out = str(tmp_path / "out")
    with held_by_other_process(out) as pid:
        refused(convert.main, [micro_diffusers_unet, out], capsys, ["in use by another run", f"pid {pid}"],
                roots=[tmp_path, micro_diffusers_unet])


def test_out_on_a_read_only_file_system(micro_diffusers_unet, tmp_path, capsys):
    with readonly_dir(tmp_path / "ro") as ro:
        refused(convert.main, [micro_diffusers_unet, os.path.join(ro, "out")], capsys, ["cannot write OUT"],
                roots=[tmp_path, micro_diffusers_unet])


def test_out_read_only_injected(micro_diffusers_unet, tmp_path, capsys, monkeypatch):
    inject_mkdir_error(monkeypatch, str(tmp_path), errno.EACCES)
    refused(convert.main, [micro_diffusers_unet, tmp_path / "a" / "out"], capsys,
            ["cannot write OUT", "permission denied"], roots=[tmp_path, micro_diffusers_unet])


def test_disk_full_injected(micro_diffusers_unet, tmp_path, capsys, monkeypatch):
    """ENOSPC after the UNet's params were written: one line with what had been written; no temp left."""
    def write_index(*a, **k):
        raise os_error(errno.ENOSPC, os.path.join(a[0], "fairjax.json"))

    monkeypatch.setattr(pipeline, "write_index", write_index)  # convert_folder writes its index there
    line = refused(convert.main, [micro_diffusers_unet, tmp_path / "out"], capsys,
                   ["disk full writing", "needs at least", "written before the disk filled"],
                   roots=[tmp_path, micro_diffusers_unet])
    assert "KiB" in line  # the params file had been written


def test_disk_full_on_a_small_file_system(micro_diffusers_unet, tmp_path, capsys):
    """A real full disk (a 64 KiB tmpfs, root only): the UNet's params (~200 KiB) do not fit; the line says
    how large the file that did not fit is, and the tmpfs is left empty."""
    size = os.path.getsize(os.path.join(micro_diffusers_unet, WEIGHTS))
    with small_fs(tmp_path / "small", "64k") as small:
        line = refused(convert.main, [micro_diffusers_unet, os.path.join(small, "out")], capsys,
                       ["disk full writing", "needs at least", "params.safetensors"],
                       roots=[tmp_path, micro_diffusers_unet])
        assert os.listdir(small) == []
    assert size > 64 * 1024 and "KiB for" in line
