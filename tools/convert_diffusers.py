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

SRC may also be a single VAE or CLIP text encoder folder (``AutoencoderKL``,
``CLIPTextModel``, ``CLIPTextModelWithProjection``). Every command that takes a
model (``--model``, ``model.dir``) also accepts SRC itself or a Hugging Face repo
id and converts it once into the model cache (``fairjax.convert.resolve``); this
tool is for writing the model dir somewhere of your choosing.

To add a component, register a function
``convert(src_folder, out_folder, *, dtype, variant) -> dict`` in
``fairjax.convert.pipeline.CONVERTERS`` under its pipeline subfolder name (and,
for single-folder SRC, its class name in ``CLASS_TO_COMPONENT``).
"""

from __future__ import annotations

import argparse
import sys

from fairjax.convert.pipeline import (  # noqa: F401  (CONVERTERS, plan_sources: this tool's documented surface)
    CLASS_TO_COMPONENT,
    CONVERTERS,
    DTYPES,
    WEIGHTS_PREFIX,
    convert_folder,
    plan_pipeline,
    plan_sources,
)
from fairjax.io import fs


def convert(src: str, out: str, *, dtype: str | None = "float32", variant: str | None = None,
            overwrite: bool = False, log=print) -> dict:
    """Convert SRC into the fairjax model dir OUT (atomic). Returns ``{component: summary}``."""
    fs.check_output(out, what="OUT", overwrite=overwrite, inputs={"SRC": src})
    with fs.locked(out, what="OUT"):  # a second run on OUT is refused before anything is read
        return convert_folder(src, out, dtype=dtype, variant=variant, overwrite=overwrite, log=log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="diffusers pipeline folder (model_index.json) or a component folder (unet/)")
    p.add_argument("out", help="fairjax model directory to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="param dtype to store (default float32 masters)")
    p.add_argument("--variant", default=None, help="weight file variant, e.g. fp16 (default: plain, else fp16, else bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)

    def body():  # Ctrl-C: one line, 130; nothing partial is kept
        convert(args.src, args.out, dtype=args.dtype, variant=args.variant, overwrite=args.overwrite)

    return fs.run_entry(body, guard=False)


if __name__ == "__main__":
    sys.exit(main())
