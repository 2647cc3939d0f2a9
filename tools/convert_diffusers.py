#!/usr/bin/env python
"""Convert a diffusers checkpoint folder into a fairjax model directory (no torch needed).

    python tools/convert_diffusers.py SRC OUT [--dtype float32|bfloat16|float16] [--variant fp16] [--overwrite]

SRC is either one component folder (e.g. a diffusers ``unet/`` with
``config.json`` + ``diffusion_pytorch_model*.safetensors``, single or sharded,
fp32/fp16/bf16, plain or ``.fp16`` variant) or a whole pipeline folder with
``model_index.json`` (SDXL: ``unet/ vae/ text_encoder/ text_encoder_2/``
converted, ``tokenizer/ tokenizer_2/ scheduler/`` and ``model_index.json``
copied verbatim; SD 1.x folders work the same way); a part with no converter
and no weight-free class (a safety checker, say) is skipped and listed. A part
named in model_index.json whose folder or weights are missing is an error.
OUT becomes a fairjax model dir (``OUT/<component>/{config.json,
params.safetensors}`` + the copied folders + ``OUT/fairjax.json``), written to
a temp dir and renamed at the end: after a failure OUT does not exist (or is
untouched). ``fairjax.diffusion.pipeline.load_pipeline(OUT)`` loads an SDXL one.
An OUT that equals, contains or is inside SRC is refused (also with ``--overwrite``: it would
delete the source); OUT is locked while it is written; an integer tensor where a weight is
expected, or a corrupt safetensors header, is an error before anything is written.

To add a component, register a function
``convert(src_folder, out_folder, *, dtype, variant) -> dict`` in ``CONVERTERS``
under its pipeline subfolder name (and, for single-folder SRC, its
diffusers/transformers class name in ``CLASS_TO_COMPONENT``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

from fairjax.convert import pipeline as pipe_convert
from fairjax.convert import unet as unet_convert
from fairjax.errors import UserError
from fairjax.io import fs
from fairjax.io.model_dir import atomic_output_dir, read_json, write_index

#: pipeline subfolder name -> converter(src, out, *, dtype, variant) -> summary dict
CONVERTERS: dict[str, Callable[..., dict]] = {
    "unet": unet_convert.convert_component,
    "vae": pipe_convert.convert_vae,
    "text_encoder": pipe_convert.convert_clip_text,
    "text_encoder_2": pipe_convert.convert_clip_text,
}
#: pipeline subfolder name -> weight file stem, to check every part's files before converting any
WEIGHTS_PREFIX: dict[str, str] = {
    "unet": unet_convert.WEIGHTS_NAME,
    "vae": pipe_convert.VAE.weights_prefix,
    "text_encoder": pipe_convert.CLIP_TEXT.weights_prefix,
    "text_encoder_2": pipe_convert.CLIP_TEXT.weights_prefix,
}
#: ``_class_name`` in a component's config.json -> pipeline subfolder name
CLASS_TO_COMPONENT: dict[str, str] = {
    "UNet2DConditionModel": "unet",
}
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def plan_pipeline(src: str, variant: str | None = None) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """``([(component, folder)] to convert, [folders to copy], [skipped])`` for a pipeline folder SRC.

    Every part model_index.json names that is converted or copied must be there (one-line error
    naming the first that is not), with its config.json and its weight files' headers; no tensor is read.
    """
    entries = pipe_convert.index_entries(src)
    todo = [(n, os.path.join(src, n)) for n in entries if n in CONVERTERS]
    copied = [n for n, (_, c) in entries.items() if n not in CONVERTERS and pipe_convert.is_copied_class(c)]
    skipped = [n for n in entries if n not in CONVERTERS and n not in copied]
    if not todo:
        raise UserError(f"{src}: none of its components ({', '.join(entries) or 'none'}) can be converted yet "
                        f"(supported: {', '.join(CONVERTERS)})")
    for name, folder in todo:
        if not os.path.isdir(folder):
            raise UserError(f"{src}: model_index.json names {name} ({entries[name][1]}) but there is no {name}/ "
                            f"folder; copy it from the original pipeline")
        pipe_convert.check_weights(folder, WEIGHTS_PREFIX[name], variant)
    for name in copied:
        pipe_convert.check_copied(src, name, entries[name][1])
    return todo, copied, skipped


def plan_sources(src: str, variant: str | None = None) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """``([(component, its source folder)], [copied folders], [unsupported components])`` for SRC."""
    if not os.path.isdir(src):
        raise UserError(f"{src}: not a folder; pass a diffusers pipeline folder or its unet/ folder")
    if os.path.isfile(os.path.join(src, pipe_convert.MODEL_INDEX)):
        return plan_pipeline(src, variant)
    cfg = os.path.join(src, "config.json")
    if not os.path.isfile(cfg):
        raise UserError(f"{src}: neither model_index.json nor config.json; pass a diffusers pipeline folder or "
                        f"a component folder such as unet/")
    cls = read_json(cfg).get("_class_name")
    name = CLASS_TO_COMPONENT.get(cls)
    if name is None:
        supported = ", ".join(f"{c} ({n}/)" for c, n in CLASS_TO_COMPONENT.items())
        raise UserError(f"{src}: config.json is for {cls or 'an unnamed class'}, which has no converter "
                        f"(supported: {supported})")
    return [(name, src)], [], []


def convert(src: str, out: str, *, dtype: str | None = "float32", variant: str | None = None,
            overwrite: bool = False, log=print) -> dict:
    """Convert SRC into the fairjax model dir OUT (atomic). Returns ``{component: summary}``."""
    fs.check_output(out, what="OUT", overwrite=overwrite, inputs={"SRC": src})
    with fs.locked(out, what="OUT"):  # a second run on OUT is refused before anything is read
        todo, copied, skipped = plan_sources(src, variant)
        np_dtype = DTYPES[dtype] if dtype else None
        done = {}
        with atomic_output_dir(out, overwrite) as tmp:
            for name, folder in todo:
                t0 = time.time()
                done[name] = CONVERTERS[name](folder, os.path.join(tmp, name), dtype=np_dtype, variant=variant)
                log(f"{name}: {done[name]} in {time.time() - t0:.1f}s")
            for name in copied:
                pipe_convert.copy_part(src, tmp, name)
            if copied:
                log(f"copied: {', '.join(copied)}")
            index = os.path.join(src, pipe_convert.MODEL_INDEX)
            if os.path.isfile(index):
                shutil.copyfile(index, os.path.join(tmp, pipe_convert.MODEL_INDEX))
            write_index(tmp, [n for n, _ in todo], source=os.path.abspath(src), dtype=dtype or "as stored",
                        copied=copied, not_converted=skipped)
        if skipped:
            log(f"not yet supported, skipped: {', '.join(skipped)}")
        log(f"wrote {out}")
        return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="diffusers pipeline folder (model_index.json) or a component folder (unet/)")
    p.add_argument("out", help="fairjax model directory to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="param dtype to store (default float32 masters)")
    p.add_argument("--variant", default=None, help="weight file variant, e.g. fp16 (default: plain, else fp16, else bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.out, dtype=args.dtype, variant=args.variant, overwrite=args.overwrite)
    except (UserError, OSError) as e:
        line = fs.error_line(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
