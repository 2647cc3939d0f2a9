#!/usr/bin/env python
"""Export a fairjax model directory back to diffusers (PyTorch) format.

    python tools/export_diffusers.py MODEL_DIR OUT [--dtype float32|float16|bfloat16] [--overwrite]
    python tools/export_diffusers.py MODEL_DIR OUT --lora LORA.safetensors --merge
    python tools/export_diffusers.py MODEL_DIR OUT --lora LORA.safetensors [--lora-prefix unet|none]

Without ``--lora`` (or with ``--merge``): OUT becomes a folder with ``unet/``
(``config.json`` + ``diffusion_pytorch_model.safetensors``) that
``UNet2DConditionModel.from_pretrained(OUT, subfolder="unet")`` loads with no
missing or unexpected keys; ``--merge`` adds the LoRA into the kernels first.

With ``--lora`` and no ``--merge``: writes the LoRA alone in diffusers / PEFT key
format (``<module>.lora_A.weight`` / ``.lora_B.weight``, alpha/r folded into
``lora_B``). OUT is the file if it ends in ``.safetensors``, else a folder that
gets ``pytorch_lora_weights.safetensors``. With the default ``--lora-prefix unet``
keys start with ``unet.`` (``pipe.load_lora_weights(OUT)``,
``unet.load_lora_adapter(path, prefix="unet")``); ``--lora-prefix none`` writes
bare module keys (``unet.load_lora_adapter(state_dict, prefix=None)``).

Everything is written to a temp path and renamed at the end; an existing OUT is
refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import ml_dtypes
import numpy as np

from fairjax.convert import unet as unet_convert
from fairjax.convert.model_dir import atomic_output_dir, component_dir
from fairjax.convert.safetensors_io import CheckpointError
from fairjax.errors import UserError

#: component name -> exporter(fairjax component folder, diffusers out folder, *, dtype, lora, alpha) -> summary
EXPORTERS: dict[str, Callable[..., dict]] = {
    "unet": unet_convert.export_component,
}
LORA_FILE = "pytorch_lora_weights.safetensors"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _components(model_dir: str) -> list[tuple[str, str]]:
    found = []
    for name in EXPORTERS:
        try:
            found.append((name, component_dir(model_dir, name)))
        except CheckpointError:
            pass
    if not found:
        raise UserError(f"{model_dir}: no exportable fairjax component ({', '.join(EXPORTERS)}); "
                        f"is it a fairjax model dir made by tools/convert_diffusers.py?")
    return found


def _load_lora(path: str):
    from fairjax import lora as lora_lib

    lora, meta = lora_lib.load(path)
    if "alpha" not in meta:
        raise UserError(f"{path}: LoRA file has no alpha in its metadata; save it with fairjax.lora.save(alpha=...)")
    return lora, float(meta["alpha"]), meta


def export_model(model_dir: str, out: str, *, dtype: str | None = None, lora_path: str | None = None,
                 overwrite: bool = False, log=print) -> dict:
    """Write every exportable component of ``model_dir`` under OUT/<component>/ (LoRA merged if given)."""
    comps = _components(model_dir)
    lora, alpha = (None, None)
    if lora_path:
        lora, alpha, _ = _load_lora(lora_path)
    done = {}
    with atomic_output_dir(out, overwrite) as tmp:
        for name, folder in comps:
            kw = {"lora": lora, "alpha": alpha} if name == "unet" else {}
            done[name] = EXPORTERS[name](folder, os.path.join(tmp, name), dtype=DTYPES[dtype] if dtype else None, **kw)
            log(f"{name}: {done[name]}")
    log(f"wrote {out}")
    return done


def export_lora_file(model_dir: str, lora_path: str, out: str, *, prefix: str | None = "unet",
                     dtype: str | None = None, overwrite: bool = False, log=print) -> str:
    """Write the LoRA at ``lora_path`` (for the UNet of ``model_dir``) in diffusers/PEFT format; returns the file."""
    unet_dir = component_dir(model_dir, "unet")
    lora, alpha, meta = _load_lora(lora_path)
    np_dtype = DTYPES[dtype] if dtype else np.float32
    extra = {k: json.dumps(v) for k, v in meta.items() if k not in ("alpha", "rank")}
    if out.endswith(".safetensors"):
        if os.path.exists(out) and not overwrite:
            raise FileExistsError(f"{out} already exists; choose another path or pass --overwrite")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise UserError(f"cannot write {out}: folder {parent} does not exist")
        info = unet_convert.export_lora(unet_dir, lora, alpha, out, prefix=prefix, dtype=np_dtype, meta=extra)
        target = out
    else:
        with atomic_output_dir(out, overwrite) as tmp:
            info = unet_convert.export_lora(unet_dir, lora, alpha, os.path.join(tmp, LORA_FILE), prefix=prefix,
                                            dtype=np_dtype, meta=extra)
        target = os.path.join(out, LORA_FILE)
    log(f"LoRA {info} (alpha {alpha:g} folded into lora_B) -> {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="fairjax model directory (or its unet/ folder)")
    p.add_argument("out", help="output folder (or .safetensors file for a LoRA)")
    p.add_argument("--lora", help="fairjax LoRA file (fairjax.lora.save)")
    p.add_argument("--merge", action="store_true", help="merge --lora into the exported weights")
    p.add_argument("--lora-prefix", default="unet", choices=["unet", "none"],
                   help="key prefix of an exported LoRA (default unet: the pipeline format)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype to write (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        if args.merge and not args.lora:
            raise UserError("--merge needs --lora FILE")
        if args.lora and not args.merge:
            export_lora_file(args.model_dir, args.lora, args.out, dtype=args.dtype, overwrite=args.overwrite,
                             prefix=None if args.lora_prefix == "none" else args.lora_prefix)
        else:
            export_model(args.model_dir, args.out, dtype=args.dtype, lora_path=args.lora, overwrite=args.overwrite)
    except (UserError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
