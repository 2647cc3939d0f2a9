#!/usr/bin/env python
"""Export a fairjax model directory back to diffusers (PyTorch) format.

    python tools/export_diffusers.py MODEL_DIR OUT [--dtype float32|float16|bfloat16] [--overwrite]
    python tools/export_diffusers.py MODEL_DIR OUT --lora LORA.safetensors --merge
    python tools/export_diffusers.py MODEL_DIR OUT --lora LORA.safetensors [--lora-prefix unet|none]
    python tools/export_diffusers.py MODEL_DIR OUT --lora LORA.safetensors --format kohya

Without ``--lora`` (or with ``--merge``): every fairjax component of MODEL_DIR
(``unet/ vae/ text_encoder/ text_encoder_2/``) is written in diffusers /
transformers format, the weight-free folders (``tokenizer/ tokenizer_2/
scheduler/``) are copied verbatim and ``model_index.json`` is written back, so
``StableDiffusionXLPipeline.from_pretrained(OUT)`` loads a converted SDXL
pipeline with no missing or unexpected keys (parts that were skipped at
conversion become ``[null, null]`` in model_index.json). A UNet-only model dir
gives ``OUT/unet/`` for ``UNet2DConditionModel.from_pretrained(OUT,
subfolder="unet")``. ``--merge`` adds the LoRA into the UNet kernels first.

With ``--lora`` and no ``--merge``: writes the LoRA alone in diffusers / PEFT key
format (``<module>.lora_A.weight`` / ``.lora_B.weight``, alpha/r folded into
``lora_B``). OUT is the file if it ends in ``.safetensors``, else a folder that
gets ``pytorch_lora_weights.safetensors``. With the default ``--lora-prefix unet``
keys start with ``unet.`` (``pipe.load_lora_weights(OUT)``,
``unet.load_lora_adapter(path, prefix="unet")``); ``--lora-prefix none`` writes
bare module keys (``unet.load_lora_adapter(state_dict, prefix=None)``).
``--format kohya`` writes the format A1111, ComfyUI and diffusers' ``load_lora_weights`` read:
``lora_unet_<module path with '.' -> '_'>.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight``
(out, r[, 1, 1]) and ``.alpha`` (the LoRA's alpha; loaders scale by alpha / r); SDXL's
``add_embedding.linear_1/2`` are written under their original names ``label_emb_0_0/2``, which every
loader maps (``fairjax.convert.unet.lora_state_kohya``).

MODEL_DIR may also be a diffusers folder or a Hugging Face repo id (converted once into the model
cache, ``fairjax.convert.resolve``; ``--variant``, ``--no-cache``): the LoRA needs only its UNet's shapes.

Everything is written to a temp path and renamed at the end; an existing OUT is
refused unless ``--overwrite``, an OUT that equals, contains or is inside MODEL_DIR or
the LoRA file always (it would overwrite an input), and OUT is locked while it is
written. A LoRA whose shapes do not fit the UNet is refused before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import ml_dtypes
import numpy as np

from fairjax.convert import pipeline as pipe_convert
from fairjax.convert import unet as unet_convert
from fairjax.convert.resolve import add_model_args, resolve_args
from fairjax.errors import UserError
from fairjax.io import fs
from fairjax.io.model_dir import CONFIG_FILE, atomic_output_dir, component_dir, has_params, open_params, read_json

#: component name -> exporter(fairjax component folder, diffusers out folder, *, dtype, lora, alpha) -> summary
EXPORTERS: dict[str, Callable[..., dict]] = {
    "unet": unet_convert.export_component,
    "vae": pipe_convert.export_vae,
    "text_encoder": pipe_convert.export_clip_text,
    "text_encoder_2": pipe_convert.export_clip_text,
}
#: class of a bare component folder's config (``_class_name`` / ``architectures``) -> component name
CLASS_TO_COMPONENT: dict[str, str] = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}
LORA_FILE = "pytorch_lora_weights.safetensors"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _is_component(folder: str) -> bool:
    """A bare fairjax component folder (config.json + params.safetensors) rather than a model dir."""
    return os.path.isfile(os.path.join(folder, CONFIG_FILE)) and has_params(folder)


def _bare_component(folder: str) -> tuple[str, str]:
    """A single fairjax component folder: ``(component name, folder)`` from its config's class."""
    config = read_json(os.path.join(folder, CONFIG_FILE))
    cls = config.get("_class_name") or (config.get("architectures") or ["UNet2DConditionModel"])[0]
    if cls not in CLASS_TO_COMPONENT:
        raise UserError(f"{folder}: a {cls} component has no exporter (supported: {', '.join(CLASS_TO_COMPONENT)})")
    return CLASS_TO_COMPONENT[cls], folder


def _components(model_dir: str) -> list[tuple[str, str]]:
    """``[(component, fairjax folder)]`` to export; every one model_index.json names must be there."""
    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: model directory not found")
    if _is_component(model_dir):
        return [_bare_component(model_dir)]
    wanted = set()
    if os.path.isfile(os.path.join(model_dir, pipe_convert.MODEL_INDEX)):
        wanted = {n for n in pipe_convert.index_entries(model_dir) if n in EXPORTERS}
    found = [(n, component_dir(model_dir, n)) for n in EXPORTERS
             if n in wanted or os.path.isdir(os.path.join(model_dir, n))]
    if not found:
        raise UserError(f"{model_dir}: no exportable fairjax component ({', '.join(EXPORTERS)}); "
                        f"is it a fairjax model dir made by tools/convert_diffusers.py?")
    return found


def _copied_parts(model_dir: str) -> dict[str, str | None]:
    """The weight-free folders to copy verbatim (checked: present, with the files their class needs)."""
    if _is_component(model_dir):
        return {}
    copied = pipe_convert.copied_parts(model_dir)
    for name, cls in copied.items():
        pipe_convert.check_copied(model_dir, name, cls)
    return copied


def _copy_parts(model_dir: str, out: str, copied: dict, exported: list[str], log) -> None:
    """Copy the weight-free folders and write model_index.json back (when MODEL_DIR has one)."""
    for name in copied:
        pipe_convert.copy_part(model_dir, out, name)
    if copied:
        log(f"copied: {', '.join(copied)}")
    if not _is_component(model_dir) and os.path.isfile(os.path.join(model_dir, pipe_convert.MODEL_INDEX)):
        dropped = pipe_convert.write_export_index(model_dir, out, set(exported) | set(copied))
        if dropped:
            log(f"model_index.json: {', '.join(dropped)} not in the model dir, written as [null, null]")


def _load_lora(path: str):
    from fairjax import lora as lora_lib

    if not os.path.isfile(path):
        raise UserError(f"{path}: LoRA file not found" if not os.path.isdir(path) else
                        f"--lora {path} is a folder; pass a fairjax LoRA .safetensors file")
    lora, meta = lora_lib.load(path)
    if "alpha" not in meta:
        raise UserError(f"{path}: LoRA file has no alpha in its metadata; save it with fairjax.lora.save(alpha=...)")
    return lora, float(meta["alpha"]), meta


def export_model(model_dir: str, out: str, *, dtype: str | None = None, lora_path: str | None = None,
                 overwrite: bool = False, log=print) -> dict:
    """Write every exportable component of ``model_dir`` under OUT/<component>/ (LoRA merged into the
    UNet if given), copy its weight-free folders and write its model_index.json back."""
    fs.check_output(out, what="OUT", overwrite=overwrite, inputs={"MODEL_DIR": model_dir, "--lora": lora_path})
    with fs.locked(out, what="OUT"):  # a second run on OUT is refused before anything is read
        comps = _components(model_dir)
        copied = _copied_parts(model_dir)
        lora, alpha = (None, None)
        if lora_path:
            if "unet" not in dict(comps):
                raise UserError(f"{model_dir}: no unet to merge --lora {lora_path} into")
            lora, alpha, _ = _load_lora(lora_path)
            from fairjax import lora as lora_lib

            with open_params(dict(comps)["unet"]) as r:
                try:
                    lora_lib.check_fits(lora, {k: r.shape(k) for k in r.keys()})
                except UserError as e:
                    raise UserError(f"--lora {lora_path} does not fit {model_dir}'s UNet: {e}") from None
        done = {}
        with atomic_output_dir(out, overwrite) as tmp:
            for name, folder in comps:
                kw = {"lora": lora, "alpha": alpha} if name == "unet" else {}
                done[name] = EXPORTERS[name](folder, os.path.join(tmp, name), dtype=DTYPES[dtype] if dtype else None,
                                             **kw)
                log(f"{name}: {done[name]}")
            _copy_parts(model_dir, tmp, copied, list(done), log)
        log(f"wrote {out}")
        return done


def export_lora_file(model_dir: str, lora_path: str, out: str, *, prefix: str | None = "unet",
                     dtype: str | None = None, overwrite: bool = False, log=print, format: str = "peft") -> str:
    """Write the LoRA at ``lora_path`` (for the UNet of ``model_dir``) in diffusers/PEFT (``format='peft'``) or
    kohya (``'kohya'``) format; returns the file."""
    is_file = out.endswith(".safetensors")
    fs.check_output(out, what="OUT", kind="file" if is_file else "dir", overwrite=overwrite,
                    inputs={"MODEL_DIR": model_dir, "--lora": lora_path})
    parent = os.path.dirname(os.path.abspath(out))
    if is_file and not os.path.isdir(parent):
        raise UserError(f"cannot write {out}: folder {parent} does not exist")
    with fs.locked(out, what="OUT"):  # a second run on OUT is refused before anything is read
        unet_dir = component_dir(model_dir, "unet")
        lora, alpha, meta = _load_lora(lora_path)
        np_dtype = DTYPES[dtype] if dtype else np.float32
        extra = {k: json.dumps(v) for k, v in meta.items() if k not in ("alpha", "rank")}
        if is_file:
            fs.remove_stale_temps(out)
            info = unet_convert.export_lora(unet_dir, lora, alpha, out, prefix=prefix, dtype=np_dtype, meta=extra,
                                            format=format)
            target = out
        else:
            with atomic_output_dir(out, overwrite) as tmp:
                info = unet_convert.export_lora(unet_dir, lora, alpha, os.path.join(tmp, LORA_FILE), prefix=prefix,
                                                dtype=np_dtype, meta=extra, format=format)
            target = os.path.join(out, LORA_FILE)
        how = "alpha in each module's .alpha" if format == "kohya" else "alpha/r folded into lora_B"
        log(f"LoRA {info} (alpha {alpha:g}, {how}) -> {target}")
        return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="fairjax model directory (or its unet/ folder), a diffusers folder or a "
                                     "Hugging Face repo id")
    p.add_argument("out", help="output folder (or .safetensors file for a LoRA)")
    p.add_argument("--lora", help="fairjax LoRA file (fairjax.lora.save)")
    p.add_argument("--merge", action="store_true", help="merge --lora into the exported weights")
    p.add_argument("--lora-prefix", default="unet", choices=["unet", "none"],
                   help="key prefix of a PEFT-format LoRA (default unet: the pipeline format)")
    p.add_argument("--format", default="peft", choices=list(unet_convert.LORA_FORMATS),
                   help="LoRA file format: peft (diffusers / PEFT keys, default) or kohya (A1111, ComfyUI, diffusers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype to write (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_model_args(p)
    args = p.parse_args(argv)

    def body():  # Ctrl-C: one line, 130; nothing partial is kept
        if args.merge and not args.lora:
            raise UserError("--merge needs --lora FILE")
        if args.format != "peft" and (args.merge or not args.lora):
            raise UserError(f"--format {args.format} is for a LoRA file: pass --lora FILE without --merge")
        args.model_dir = resolve_args(args.model_dir, args)  # a diffusers folder or repo id: converted once
        if args.lora and not args.merge:
            export_lora_file(args.model_dir, args.lora, args.out, dtype=args.dtype, overwrite=args.overwrite,
                             prefix=None if args.lora_prefix == "none" else args.lora_prefix, format=args.format)
        else:
            export_model(args.model_dir, args.out, dtype=args.dtype, lora_path=args.lora, overwrite=args.overwrite)

    return fs.run_entry(body, guard=False)


if __name__ == "__main__":
    sys.exit(main())
