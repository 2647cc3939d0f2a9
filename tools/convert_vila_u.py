#!/usr/bin/env python
"""Convert a vila-u checkpoint folder (e.g. vila-u-7b-256) into a fairjax model directory (no torch needed).

    python tools/convert_vila_u.py SRC OUT [--dtype float32|bfloat16|float16|as-stored]
                                           [--siglip-config siglip/config.json] [--overwrite]

SRC holds ``llm/``, ``vision_tower/`` and ``mm_projector/`` as vila-u saves them.
OUT gets ``llm/``, ``mm_projector/``, ``depth_transformer/``, ``vision_tower/``
(each ``config.json`` + ``params.safetensors``) and ``fairjax.json``; ``OUT/llm/`` also gets SRC's
tokenizer files and, when SRC's ``llm/`` has only the sentencepiece ``tokenizer.model`` (as vila-u-7b-256),
a ``tokenizer.json`` converted from it (needs transformers + sentencepiece: ``pip install 'fairjax[torch]'``),
so generation reads the same ids vila-u's slow tokenizer gives. OUT is written
to a temp dir and renamed at the end, so after a failure OUT does not exist (or
is untouched). Every key and shape of every part is checked before any tensor is
read. The SigLIP encoder's config is looked up from ``rqvaesiglip.pretrained_model``
(siglip-large-patch16-256, siglip-so400m-patch14-384 are built in); for another
one pass its ``config.json`` with ``--siglip-config``. An OUT that equals, contains or is inside
SRC or the ``--siglip-config`` file is refused (also with ``--overwrite``); OUT is locked while it is
written.
"""

from __future__ import annotations

import argparse
import sys

from fairjax.convert import vila_u as vila_u_convert
from fairjax.io import fs
from fairjax.io.model_dir import read_json

DTYPES = ("float32", "bfloat16", "float16", "as-stored")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="vila-u checkpoint folder (llm/, vision_tower/, mm_projector/)")
    p.add_argument("out", help="fairjax model directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="param dtype to store (default float32)")
    p.add_argument("--siglip-config", default=None,
                   help="config.json of the SigLIP model named in rqvaesiglip.pretrained_model, if not built in")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)

    def body():  # Ctrl-C: one line, 130; nothing partial is kept
        fs.check_output(args.out, what="OUT", overwrite=args.overwrite,
                        inputs={"SRC": args.src, "--siglip-config": args.siglip_config})
        with fs.locked(args.out, what="OUT"):  # a second run on OUT is refused before anything is read
            sig = read_json(args.siglip_config) if args.siglip_config else None
            vila_u_convert.convert_vila_u(args.src, args.out, dtype=None if args.dtype == "as-stored" else args.dtype,
                                          siglip_config=sig, overwrite=args.overwrite)

    return fs.run_entry(body, guard=False)


if __name__ == "__main__":
    sys.exit(main())
