#!/usr/bin/env python
"""Export the LLM of a fairjax VILA-U model dir (and a LoRA trained on it) back to PyTorch (no torch needed).

    python tools/export_vila_u.py MODEL_DIR OUT --lora LORA.safetensors              # PEFT adapter folder
    python tools/export_vila_u.py MODEL_DIR OUT [--lora LORA.safetensors --merge]    # transformers LLaMA folder
        [--dtype float32|float16|bfloat16] [--overwrite]

MODEL_DIR is a ``tools/convert_vila_u.py`` output (or its ``llm/`` folder); LORA a fairjax LoRA over the
LLM params (``model/layers_N/self_attn/q_proj/kernel`` ..., what ``fairjax.tasks.vila_u_pref`` writes).

``--lora`` alone: OUT gets ``adapter_model.safetensors`` + ``adapter_config.json`` that
``peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(<vila-u>/llm), OUT)`` loads as is:
keys ``base_model.model.<module>.lora_A.weight`` (r, in) = ``a^T`` and ``.lora_B.weight`` (out, r) =
``b^T``; ``lora_alpha`` is the LoRA's alpha (PEFT's scale ``lora_alpha / r`` is fairjax's ``alpha / r``),
per-module ranks other than the common one go in ``rank_pattern``; ``target_modules`` names the
projection types when every layer has them, else the exact module names (a full-match regex).
Default dtype float32.

Otherwise: OUT is a transformers LLaMA folder (``config.json`` + ``model*.safetensors``, sharded above
5 GB) with the LoRA merged into the weights if given (``W + (alpha/r) a b``) and the tokenizer files of
``MODEL_DIR/llm`` copied: it replaces vila-u's ``llm/`` folder (``LlamaForCausalLM.from_pretrained(OUT)``
loads it with no missing or unexpected keys). Default dtype: as stored.

OUT is written to a temporary path and renamed at the end; an existing OUT is refused unless ``--overwrite``,
an OUT that equals, contains or is inside MODEL_DIR or the LoRA file always (it would overwrite an input),
and OUT is locked while it is written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Mapping

import numpy as np

from fairjax.convert.core import flax_to_torch_key
from fairjax.convert.resolve import add_model_args, resolve_args
from fairjax.errors import UserError
from fairjax.io import fs
from fairjax.io.model_dir import (
    CONFIG_FILE,
    INDEX_FILE,
    PARAMS_FILE,
    atomic_output_dir,
    component_dir,
    load_params,
    read_json,
    write_json,
)
from fairjax.io.safetensors import SafetensorsReader, write_safetensors

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
DTYPES = ("float32", "float16", "bfloat16")
#: copied next to a merged LLM (as tools/convert_vila_u.py copies them into the model dir)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def _np_dtype(name: str | None):
    from fairjax.convert.llama import _np_dtype

    return _np_dtype(name)


def module_name(kernel_path: str) -> str:
    """Flax kernel path -> torch module (``model/layers_3/mlp/up_proj/kernel`` -> ``model.layers.3.mlp.up_proj``)."""
    return flax_to_torch_key(tuple(kernel_path.split("/"))).rsplit(".", 1)[0]


def load_lora(path: str):
    """``(lora, alpha, meta)`` of a fairjax LoRA file."""
    from fairjax import lora as lora_lib

    if not os.path.isfile(path):
        raise UserError(f"{path}: LoRA file not found" if not os.path.isdir(path) else
                        f"--lora {path} is a folder; pass a fairjax LoRA .safetensors file")
    lora, meta = lora_lib.load(path)
    if "alpha" not in meta:
        raise UserError(f"{path}: LoRA file has no alpha in its metadata; save it with fairjax.lora.save(alpha=...)")
    return lora, float(meta["alpha"]), meta


def llm_kernel_shapes(llm_dir: str) -> dict[str, tuple[int, ...]]:
    """``{flax path: shape}`` of the 2-D kernels in ``llm_dir/params.safetensors`` (header only)."""
    with SafetensorsReader(os.path.join(llm_dir, PARAMS_FILE)) as r:
        return {k: tuple(r.shape(k)) for k in r.keys() if k.endswith("/kernel") and len(r.shape(k)) == 2}


# ----------------------------------------------------------------------------- PEFT adapter

def peft_state(lora: Mapping, kernel_shapes: Mapping[str, tuple[int, ...]], *, dtype=np.float32):
    """Yield ``(key, array)``: ``base_model.model.<module>.lora_A.weight = a^T`` (r, in) and
    ``.lora_B.weight = b^T`` (out, r) for each LoRA entry (no scale folded in)."""
    for path in sorted(lora):
        if path not in kernel_shapes:
            raise UserError(f"LoRA entry {path!r} is not a linear kernel of this LLM; was the LoRA trained on another "
                            f"model (or on other params than the LLM's)?")
        a, b = np.asarray(lora[path]["a"], np.float32), np.asarray(lora[path]["b"], np.float32)
        fan_in, out = kernel_shapes[path]
        r = a.shape[-1]
        if a.shape != (fan_in, r) or b.shape != (r, out):
            raise UserError(f"LoRA entry {path!r}: a {a.shape} / b {b.shape} do not fit the kernel ({fan_in}, {out})")
        mod = PEFT_PREFIX + module_name(path)
        yield f"{mod}.lora_A.weight", np.ascontiguousarray(a.T, dtype=dtype)
        yield f"{mod}.lora_B.weight", np.ascontiguousarray(b.T, dtype=dtype)


def peft_config(lora: Mapping, alpha: float, kernel_shapes: Mapping[str, tuple[int, ...]], *,
                base_model: str | None = None) -> dict:
    """``adapter_config.json`` (peft ``LoraConfig``) for ``lora``: ``r`` = the most common rank (others in
    ``rank_pattern``), ``lora_alpha = alpha``; ``target_modules`` = the projection names when the LoRA covers
    every module of those names, else a full-match regex of the exact module names."""
    names = {p: module_name(p) for p in lora}
    ranks = {p: int(np.shape(e["a"])[-1]) for p, e in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    chosen = set(names.values())
    leaves = {n.rsplit(".", 1)[-1] for n in chosen}
    every = {module_name(p) for p in kernel_shapes if module_name(p).rsplit(".", 1)[-1] in leaves}
    targets = sorted(leaves) if every == chosen else "^(?:" + "|".join(re.escape(n) for n in sorted(chosen)) + ")$"
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": targets, "rank_pattern": {re.escape(names[p]): k for p, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False,
    }


def _source_llm(model_dir: str) -> str | None:
    index = os.path.join(model_dir, INDEX_FILE)
    src = read_json(index).get("source") if os.path.isfile(index) else None
    return os.path.join(src, "llm") if src else None


def export_lora(model_dir: str, lora_path: str, out: str, *, dtype: str | None = None, overwrite: bool = False,
                log=print) -> str:
    """Write the LoRA at ``lora_path`` (over ``model_dir``'s LLM) as a PEFT adapter folder ``out``."""
    fs.check_output(out, what="OUT", overwrite=overwrite, inputs={"MODEL_DIR": model_dir, "--lora": lora_path})
    with fs.locked(out, what="OUT"):  # a second run on OUT is refused before anything is read
        llm_dir = component_dir(model_dir, "llm")
        lora, alpha, meta = load_lora(lora_path)
        shapes = llm_kernel_shapes(llm_dir)
        items = list(peft_state(lora, shapes, dtype=_np_dtype(dtype or "float32")))  # checks before writing
        config = peft_config(lora, alpha, shapes, base_model=_source_llm(model_dir) or meta.get("base_model"))
        with atomic_output_dir(out, overwrite) as tmp:
            write_safetensors(os.path.join(tmp, ADAPTER_FILE), items, {"format": "pt"})
            write_json(os.path.join(tmp, ADAPTER_CONFIG), config)
        log(f"PEFT adapter: {len(lora)} modules, r {config['r']}, lora_alpha {alpha:g} -> {out}")
        return out


# ----------------------------------------------------------------------------- merged LLM

def export_llm(model_dir: str, out: str, *, lora_path: str | None = None, dtype: str | None = None,
               overwrite: bool = False, log=print) -> str:
    """Write ``model_dir``'s LLM (LoRA merged if given) as a transformers LLaMA folder ``out`` + tokenizer files."""
    from fairjax import lora as lora_lib
    from fairjax.convert.llama import export_hf_llama
    from fairjax.models import llama

    fs.check_output(out, what="OUT", overwrite=overwrite, inputs={"MODEL_DIR": model_dir, "--lora": lora_path})
    with fs.locked(out, what="OUT"):  # a second run on OUT is refused before anything is read
        llm_dir = component_dir(model_dir, "llm")
        config = read_json(os.path.join(llm_dir, CONFIG_FILE))
        lora = alpha = None
        if lora_path:
            lora, alpha, _ = load_lora(lora_path)
            try:
                lora_lib.check_fits(lora, llm_kernel_shapes(llm_dir))  # before reading the weights
            except UserError as e:
                raise UserError(f"--lora {lora_path} does not fit {model_dir}'s LLM: {e}") from None
        params = load_params(os.path.join(llm_dir, PARAMS_FILE), llama.param_shapes(llama.from_config(config)))
        if lora:
            params = lora_lib.merge(params, lora, alpha)
        with atomic_output_dir(out, overwrite) as tmp:
            export_hf_llama(params, config, tmp, dtype=dtype, overwrite=True)
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(llm_dir, name)):
                    shutil.copyfile(os.path.join(llm_dir, name), os.path.join(tmp, name))
        log(f"LLaMA{' + LoRA merged' if lora else ''} -> {out}")
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="fairjax VILA-U model dir (tools/convert_vila_u.py output) or its llm/ folder, a "
                                     "vila-u checkpoint folder or a Hugging Face repo id")
    p.add_argument("out", help="output folder")
    p.add_argument("--lora", help="fairjax LoRA file over the LLM (fairjax.lora.save)")
    p.add_argument("--merge", action="store_true", help="merge --lora into a full LLaMA folder instead")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype to write (default: float32 for an adapter, as stored for the LLM)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_model_args(p)
    args = p.parse_args(argv)

    def body():  # Ctrl-C: one line, 130; nothing partial is kept
        args.model_dir = resolve_args(args.model_dir, args)  # a vila-u checkpoint or repo id: converted once
        if args.merge and not args.lora:
            raise UserError("--merge needs --lora FILE")
        if args.lora and not args.merge:
            export_lora(args.model_dir, args.lora, args.out, dtype=args.dtype, overwrite=args.overwrite)
        else:
            export_llm(args.model_dir, args.out, lora_path=args.lora, dtype=args.dtype, overwrite=args.overwrite)

    return fs.run_entry(body, guard=False)


if __name__ == "__main__":
    sys.exit(main())
