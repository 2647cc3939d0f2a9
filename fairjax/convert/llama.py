"""Conversion of the VILA-U language side: a transformers LLaMA folder <-> Flax params,
and the generation head pieces of a vila-u checkpoint (mm_projector, rqtransformer, codebook).

LLaMA: ``config.json`` + ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``), the layout ``save_pretrained`` writes and
vila-u's ``llm/`` folder has. Keys map by the generic rules of
:mod:`fairjax.convert.core` (``model.layers.3.mlp.up_proj.weight`` ->
``model/layers_3/mlp/up_proj/kernel``); rotary ``inv_freq`` buffers that old
checkpoints carry are ignored, as is ``lm_head.weight`` when the embeddings are
tied. :func:`export_hf_llama` writes the inverse, loadable by
``LlamaForCausalLM.from_pretrained`` with no missing or unexpected keys.

vila-u (``vila-u-7b-256/``): ``vision_tower/`` holds ``rqtransformer.*`` (depth
transformer; keys minus the prefix follow the generic rules) and
``rqvaesiglip.quantizer.codebooks.N.weight`` (one shared table, stored under
one or more indices); ``mm_projector/`` holds ``layers.0.*``, ``layers.2.*``. Whole VILA-U models
are loaded by :func:`fairjax.convert.vila_u.load` (either a converted dir or the checkpoint folder).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fairjax.convert.core import convert_checkpoint, export_state
from fairjax.errors import CheckpointError
from fairjax.io.model_dir import atomic_output_dir, read_json, write_json
from fairjax.io.safetensors import ShardedReader, write_safetensors
from fairjax.io.tree import flatten, shapes_of, unflatten
from fairjax.models import llama, vila_u

LLAMA_IGNORE = (r"(^|\.)rotary_emb\.inv_freq$",)
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _np_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return np.dtype(dtype).type


def _dtype_name(dtype) -> str:
    return {np.dtype(v): k for k, v in _DTYPES.items()}[np.dtype(dtype)]


# ----------------------------------------------------------------------------- LLaMA

def load_hf_llama(hf_dir: str, *, dtype=None) -> tuple[dict, dict]:
    """transformers LLaMA folder -> ``(config dict, Flax params)`` (numpy; ``dtype=None`` keeps the file's).

    Every key and shape is checked against the config before any tensor is
    read; a missing shard or a key that does not fit is one
    :class:`CheckpointError` naming it.
    """
    cfg = read_json(os.path.join(hf_dir, "config.json"))
    model = llama.from_config(cfg)
    ignore = list(LLAMA_IGNORE)
    if model.config.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")
    with ShardedReader(hf_dir, "model") as r:
        params = convert_checkpoint(r, llama.param_shapes(model), dtype=_np_dtype(dtype), ignore=ignore)
    return cfg, params


def export_hf_llama(params: Mapping, config: Mapping[str, Any], out_dir: str, *, dtype=None,
                    max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> str:
    """Flax params -> a transformers LLaMA folder (``config.json`` + safetensors, sharded above
    ``max_shard_bytes`` with a ``model.safetensors.index.json``). Written to a temp folder, then renamed.

    ``dtype`` (``'float32'``, ``'float16'``, ``'bfloat16'`` or a numpy dtype)
    casts every tensor and is recorded in the config; None keeps the params'. ``scan_layers`` params
    (``model/layers`` stacked) are written unrolled, like any other.
    """
    llama.LlamaConfig.from_dict(config)  # reject configs the params cannot belong to
    np_dtype = _np_dtype(dtype)
    flat = flatten(llama.unstack_params(params))
    itemsize = {p: np.dtype(np_dtype or np.asarray(v).dtype).itemsize for p, v in flat.items()}
    sizes = [int(np.prod(v.shape)) * itemsize[p] for p, v in flat.items()]
    groups: list[list[int]] = [[]]
    acc = 0
    for i, n in enumerate(sizes):
        if groups[-1] and acc + n > max_shard_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += n
    paths = list(flat)
    cfg = dict(config)
    if np_dtype is not None:
        cfg["torch_dtype" if "torch_dtype" in cfg or "dtype" not in cfg else "dtype"] = _dtype_name(np_dtype)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        weight_map = {}
        for gi, group in enumerate(groups):
            name = ("model.safetensors" if len(groups) == 1
                    else f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors")
            sub = {paths[i]: flat[paths[i]] for i in group}
            items = list(export_state(unflatten(sub), dtype=np_dtype))
            write_safetensors(os.path.join(tmp, name), items, {"format": "pt"})
            weight_map.update({k: name for k, _ in items})
        if len(groups) > 1:
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map})
        write_json(os.path.join(tmp, "config.json"), cfg)
    return out_dir


# ----------------------------------------------------------------------------- vila-u head pieces

def _shapes(module, *args) -> dict:
    return shapes_of(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args).get("params", {}))


def rqtransformer_shapes(module: vila_u.RQTransformer) -> dict:
    c = module.config
    return _shapes(module, jax.ShapeDtypeStruct((1, 1, c.input_embed_dim_2), jnp.float32),
                   jax.ShapeDtypeStruct((1, 1, c.depth, c.input_embed_dim_1), jnp.float32))


def codebook_shapes(module: vila_u.RQCodebook) -> dict:
    return _shapes(module, jax.ShapeDtypeStruct((1, module.config.depth), jnp.int32))


def projector_shapes(module: vila_u.MultimodalProjector) -> dict:
    return _shapes(module, jax.ShapeDtypeStruct((1, module.config.mm_hidden_size), jnp.float32))


def convert_rqtransformer(reader, module: vila_u.RQTransformer, *, dtype=None) -> dict:
    """``rqtransformer.*`` keys of a vision-tower reader -> depth-transformer params."""
    prefix = "rqtransformer."
    return convert_checkpoint(reader, rqtransformer_shapes(module), dtype=_np_dtype(dtype),
                              ignore=[r"^(?!rqtransformer\.)"], rename=lambda k: k[len(prefix):])


def convert_codebook(reader, module: vila_u.RQCodebook, *, dtype=None) -> dict:
    """``rqvaesiglip.quantizer.codebooks.N.weight`` -> codebook params.

    A shared codebook is one table that torch lists under every depth index;
    the lowest index present is read and the others are ignored.
    """
    pat = re.compile(r"^rqvaesiglip\.quantizer\.codebooks\.(\d+)\.weight$")
    present = sorted(int(m.group(1)) for k in reader.keys() if (m := pat.match(k)))
    if not present:
        raise CheckpointError("vision tower checkpoint has no rqvaesiglip.quantizer.codebooks.N.weight; "
                              "point at vila-u's vision_tower/ folder")
    keep = {present[0]} if module.config.shared_codebook else set(range(module.config.depth))
    ignore = [r"^(?!rqvaesiglip\.quantizer\.codebooks\.\d+\.weight$)"]
    ignore += [rf"^rqvaesiglip\.quantizer\.codebooks\.{i}\.weight$" for i in present if i not in keep]
    rename = (lambda k: "codebooks.0.weight") if module.config.shared_codebook else \
        (lambda k: k[len("rqvaesiglip.quantizer."):])
    return convert_checkpoint(reader, codebook_shapes(module), dtype=_np_dtype(dtype), ignore=ignore, rename=rename)


def convert_projector(reader, module: vila_u.MultimodalProjector, *, dtype=None) -> dict:
    """mm_projector ``layers.*`` keys -> projector params."""
    return convert_checkpoint(reader, projector_shapes(module), dtype=_np_dtype(dtype))
