"""A vila-u checkpoint folder (``vila-u-7b-256/``) -> one fairjax model directory, and :func:`load`, the one
loader of a VILA-U model, for either layout (the converted dir, or the checkpoint folder converted in memory).

Source layout (what vila-u's ``save_pretrained`` writes; no hub access is needed)::

    llm/            config.json + model*.safetensors       transformers LLaMA (fairjax.convert.llama)
    vision_tower/   config.json + model*.safetensors       rqvaesiglip.* (SigLIP encoder, quantizer, decoder)
                                                            rqtransformer.* (depth transformer)
    mm_projector/   config.json + model*.safetensors       layers.0.*, layers.2.*

Output (:mod:`fairjax.io.model_dir` format, ``fairjax.json`` with ``model_type: vila_u``)::

    llm/                config.json (as is)                     params: LlamaForCausalLM
                        + the tokenizer files of llm/ as they are (:data:`TOKENIZER_FILES`), and a
                        ``tokenizer.json`` written from the sentencepiece ``tokenizer.model`` when llm/
                        has none (:func:`sentencepiece_tokenizer_json`; vila-u-7b-256 ships only the .model)
    mm_projector/       config.json (as is, or {})              params: MultimodalProjector
    depth_transformer/  config.json = the 'rqtransformer' dict  params: RQTransformer
    vision_tower/       config.json = vision_tower/config.json + 'siglip_vision_config'
                        params: RQVAESiglip (vision_model/, quantizer/codebooks_0/, post_quant_conv/, decoder/)

The SigLIP config is not in the checkpoint (vila-u loads it by name from
``rqvaesiglip.pretrained_model``); the known ones are written here
(:data:`SIGLIP_VISION_CONFIGS`), others are passed explicitly.

Vision-tower key rules (on top of :mod:`fairjax.convert.core`), all checked in one pass:

* ``rqvaesiglip.siglip_model.vision_model.X`` -> ``rqvaesiglip/vision_model/X``;
* taming's ``nin_shortcut`` -> ``conv_shortcut`` (:class:`~fairjax.models.layers.ResnetBlock2D`);
* a shared codebook is stored under one or more indices: the lowest is read;
* not used by VILA-U, hence ignored: the SigLIP text model, ``logit_scale/bias``, the
  last SigLIP layer, ``post_layernorm``, the pooling ``head``, ``position_ids``
  buffers and the codebooks' EMA buffers (``cluster_size_ema``, ``embed_ema``).
  Anything else that does not fit is reported (missing / unexpected / shape) in one error.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from fairjax.convert import llama as llama_convert
from fairjax.convert.core import convert_checkpoint, plan_conversion
from fairjax.errors import CheckpointError
from fairjax.io import fs
from fairjax.io.model_dir import (
    CONFIG_FILE,
    INDEX_FILE,
    PARAMS_FILE,
    atomic_output_dir,
    component_dir,
    load_params,
    read_json,
    save_component,
    write_index,
)
from fairjax.io.safetensors import ShardedReader
from fairjax.models import llama, rqvae, vila_u
from fairjax.models.vila_u_tokenizer import load_tokenizer, sentencepiece_tokenizer_json

WEIGHTS_PREFIX = "model"
SOURCE_PARTS = ("llm", "vision_tower", "mm_projector")
COMPONENTS = ("llm", "mm_projector", "depth_transformer", "vision_tower")
SIGLIP_KEY = "siglip_vision_config"
#: copied from the source ``llm/`` when present (image generation reads ``tokenizer.json``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")

#: ``SiglipVisionConfig`` of the SigLIP checkpoints vila-u builds on (from their hub config.json files).
SIGLIP_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "siglip-large-patch16-256": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, num_channels=3, image_size=256, patch_size=16,
                                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "siglip-so400m-patch14-384": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                      num_attention_heads=16, num_channels=3, image_size=384, patch_size=14,
                                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
_VISION = "rqvaesiglip.siglip_model.vision_model."
_CODEBOOK = re.compile(r"^rqvaesiglip\.quantizer\.codebooks\.(\d+)\.weight$")


# ----------------------------------------------------------------------------- configs

def siglip_vision_config(rqvaesiglip_config: Mapping[str, Any], override: Mapping[str, Any] | None = None) -> dict:
    """The ``SiglipVisionConfig`` dict for ``rqvaesiglip.pretrained_model`` (``override`` wins: a
    ``SiglipConfig`` or ``SiglipVisionConfig`` dict)."""
    if override is not None:
        return dict(override.get("vision_config", override))
    name = str(rqvaesiglip_config.get("pretrained_model") or "google/siglip-large-patch16-256")
    key = os.path.basename(name.rstrip("/"))
    if key not in SIGLIP_VISION_CONFIGS:
        raise CheckpointError(f"vision_tower config: rqvaesiglip.pretrained_model is {name!r}, whose SigLIP config "
                              f"is not known here (known: {', '.join(SIGLIP_VISION_CONFIGS)}); pass that model's "
                              f"config.json with --siglip-config")
    return dict(SIGLIP_VISION_CONFIGS[key])


def _vision_tower_config(vt_cfg: Mapping[str, Any]) -> dict:
    for k in ("rqvaesiglip", "rqtransformer"):
        if not isinstance(vt_cfg.get(k), Mapping):
            raise CheckpointError(f"vision_tower/config.json: no '{k}' dict; expected vila-u's "
                                  f"RQVAESIGLIPTransformerConfig")
    return dict(vt_cfg)


def build_vision_tower(vt_cfg: Mapping[str, Any], siglip_cfg: Mapping[str, Any], **kw) -> rqvae.RQVAESiglip:
    """:class:`~fairjax.models.rqvae.RQVAESiglip` for a vila-u ``vision_tower/config.json`` dict."""
    return rqvae.from_config(_vision_tower_config(vt_cfg)["rqvaesiglip"], siglip_cfg, **kw)


# ----------------------------------------------------------------------------- vision tower

def vision_tower_rules(reader_keys, model: rqvae.RQVAESiglip) -> tuple[list[str], Callable[[str], str]]:
    """``(ignore regexes, rename)`` for a vila-u vision-tower checkpoint (see the module docstring)."""
    c = model.config
    last = c.siglip.num_hidden_layers - 1
    present = sorted(int(m.group(1)) for k in reader_keys if (m := _CODEBOOK.match(k)))
    ignore = [
        r"^rqvaesiglip\.siglip_model\.text_model\.",
        r"^rqvaesiglip\.(siglip_model\.)?logit_(scale|bias)$",
        r"^rqvaesiglip\.siglip_model\.vision_model\.(post_layernorm|head)\.",
        rf"^rqvaesiglip\.siglip_model\.vision_model\.encoder\.layers\.{last}\.",
        r"\.position_ids$",
        r"^rqvaesiglip\.quantizer\.codebooks\.\d+\.(cluster_size_ema|embed_ema)$",
    ]
    if c.codebook.shared_codebook and present:
        ignore += [rf"^rqvaesiglip\.quantizer\.codebooks\.{i}\.weight$" for i in present[1:]]

    return ignore, lambda key: rename_vision_tower_key(key, c.codebook.shared_codebook)


def rename_vision_tower_key(key: str, shared_codebook: bool) -> str:
    """vila-u vision-tower key -> the key whose generic Flax path is ours::

        rqvaesiglip.siglip_model.vision_model.X          -> rqvaesiglip.vision_model.X
        rqvaesiglip.quantizer.codebooks.N.weight (shared) -> rqvaesiglip.quantizer.codebooks.0.weight
        rqvaesiglip.decoder.*.nin_shortcut.*              -> rqvaesiglip.decoder.*.conv_shortcut.*
    """
    if key.startswith(_VISION):
        return "rqvaesiglip.vision_model." + key[len(_VISION):]
    if shared_codebook and _CODEBOOK.match(key):
        return "rqvaesiglip.quantizer.codebooks.0.weight"
    if key.startswith("rqvaesiglip.decoder."):
        return key.replace(".nin_shortcut.", ".conv_shortcut.")
    return key


def _tower_targets(model: rqvae.RQVAESiglip, depth: vila_u.RQTransformer) -> dict:
    t = {("rqvaesiglip",) + p: s for p, s in rqvae.param_shapes(model).items()}
    t.update({("rqtransformer",) + p: s for p, s in llama_convert.rqtransformer_shapes(depth).items()})
    return t


def convert_vision_tower_reader(reader, model: rqvae.RQVAESiglip, depth: vila_u.RQTransformer, *,
                                dtype=None) -> tuple[dict, dict]:
    """All keys of a vision-tower reader -> ``(RQVAESiglip params, RQTransformer params)`` in one checked pass."""
    ignore, rename = vision_tower_rules(reader.keys(), model)
    p = convert_checkpoint(reader, _tower_targets(model, depth), dtype=llama_convert._np_dtype(dtype),
                           ignore=ignore, rename=rename)
    return p["rqvaesiglip"], p["rqtransformer"]


# ----------------------------------------------------------------------------- tokenizer

def check_tokenizer(llm_dir: str, vocab_size: int, log=print) -> str | None:
    """Validate ``llm_dir``'s tokenizer for text-to-image generation; returns the ``tokenizer.json`` text to
    write when llm/ has only ``tokenizer.model`` (else None). A tokenizer without vila-u's ``<im_start>``,
    or with more tokens than the LLM's ``vocab_size``, is a :class:`~fairjax.errors.UserError`; a folder with
    no tokenizer at all is logged (the weights convert; generation will ask for ``llm/tokenizer.json``)."""

    has_json = os.path.isfile(os.path.join(llm_dir, "tokenizer.json"))
    if not has_json and not os.path.isfile(os.path.join(llm_dir, "tokenizer.model")):
        log(f"note: {llm_dir} has no tokenizer.json or tokenizer.model; copy vila-u's llm/ tokenizer files into the "
            f"output's llm/ before generating")
        return None
    text = None if has_json else sentencepiece_tokenizer_json(llm_dir)
    tok = load_tokenizer(llm_dir, tokenizer_json=text)
    n = tok.tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise CheckpointError(f"{tok.path} has {n} tokens, more than the LLM's vocab_size {vocab_size}; it belongs to "
                              f"another model")
    return text


# ----------------------------------------------------------------------------- whole folder

def _source_dirs(src: str) -> dict[str, str]:
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a folder; pass a vila-u checkpoint folder (llm/, vision_tower/, "
                              f"mm_projector/)")
    sub = {n: os.path.join(src, n) for n in SOURCE_PARTS}
    missing = [n + "/" for n, p in sub.items() if not os.path.isdir(p)]
    if missing:
        raise CheckpointError(f"{src}: missing {', '.join(missing)}; expected a vila-u checkpoint folder "
                              f"(llm/, vision_tower/, mm_projector/)")
    return sub


def _read_configs(sub: Mapping[str, str]) -> dict[str, dict]:
    pj = os.path.join(sub["mm_projector"], CONFIG_FILE)
    return {"llm": read_json(os.path.join(sub["llm"], CONFIG_FILE)),
            "vision_tower": _vision_tower_config(read_json(os.path.join(sub["vision_tower"], CONFIG_FILE))),
            "mm_projector": read_json(pj) if os.path.isfile(pj) else {}}


def _llm_ignore(model: llama.LlamaForCausalLM) -> list[str]:
    ignore = list(llama_convert.LLAMA_IGNORE)
    if model.config.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")
    return ignore


def _plan_tower(reader, tower: rqvae.RQVAESiglip, depth: vila_u.RQTransformer) -> dict:
    ignore, rename = vision_tower_rules(reader.keys(), tower)
    return plan_conversion({k: reader.shape(k) for k in reader.keys()}, _tower_targets(tower, depth),
                           ignore=ignore, rename=rename)


def check_vila_u(src: str, *, siglip_config: Mapping[str, Any] | None = None):
    """Validate a vila-u folder from configs and safetensors headers only (no tensor is read).

    Returns ``(configs, VilaU, RQVAESiglip)``; raises one :class:`CheckpointError`
    naming every problem of every part (``llm/: ... | vision_tower/: ...``).
    """
    sub = _source_dirs(src)
    cfgs = _read_configs(sub)
    vu = vila_u.build(cfgs["llm"], cfgs["vision_tower"], cfgs["mm_projector"])
    cfgs["siglip_vision"] = siglip_vision_config(cfgs["vision_tower"]["rqvaesiglip"], siglip_config)
    tower = build_vision_tower(cfgs["vision_tower"], cfgs["siglip_vision"])
    problems = []
    checks = {
        "llm": lambda r: plan_conversion({k: r.shape(k) for k in r.keys()}, llama.param_shapes(vu.llm),
                                         ignore=_llm_ignore(vu.llm)),
        "vision_tower": lambda r: _plan_tower(r, tower, vu.rqtransformer),
        "mm_projector": lambda r: plan_conversion({k: r.shape(k) for k in r.keys()},
                                                  llama_convert.projector_shapes(vu.mm_projector)),
    }
    if vu.mm_projector.config.mlp_depth == 0:
        del checks["mm_projector"]  # 'identity' has no weights (vila-u may save none)
    for name, check in checks.items():
        try:
            with ShardedReader(sub[name], WEIGHTS_PREFIX) as r:
                check(r)
        except CheckpointError as e:
            problems.append(f"{name}/: {e}")
    if problems:
        raise CheckpointError(" | ".join(problems))
    return cfgs, vu, tower


def convert_vila_u(src: str, out: str, *, dtype=None, siglip_config: Mapping[str, Any] | None = None,
                   overwrite: bool = False, log=print, **index_extra) -> dict:
    """Convert the vila-u folder ``src`` into the fairjax model dir ``out`` (atomic; see module docstring).

    Everything is validated first (:func:`check_vila_u`); then each part is
    streamed from safetensors and written. ``dtype`` (``'float32'``, ``'bfloat16'``,
    ``'float16'``, a numpy dtype, or None = as stored); ``index_extra`` goes into ``fairjax.json``.
    Returns ``{component: n params}``.
    """
    fs.check_disjoint({"OUT": out}, {"SRC": src})
    cfgs, vu, tower = check_vila_u(src, siglip_config=siglip_config)
    sub = _source_dirs(src)
    tokenizer_json = check_tokenizer(sub["llm"], vu.llm.config.vocab_size, log=log)
    summary = {}
    with atomic_output_dir(out, overwrite) as tmp:
        t0 = time.time()
        with ShardedReader(sub["vision_tower"], WEIGHTS_PREFIX) as r:
            vis, depth = convert_vision_tower_reader(r, tower, vu.rqtransformer, dtype=dtype)
        vt_cfg = dict(cfgs["vision_tower"], **{SIGLIP_KEY: cfgs["siglip_vision"]})
        save_component(os.path.join(tmp, "vision_tower"), vt_cfg, vis)
        save_component(os.path.join(tmp, "depth_transformer"), cfgs["vision_tower"]["rqtransformer"], depth)
        summary["vision_tower"], summary["depth_transformer"] = _count(vis), _count(depth)
        del vis, depth
        pj = {}
        if vu.mm_projector.config.mlp_depth:
            with ShardedReader(sub["mm_projector"], WEIGHTS_PREFIX) as r:
                pj = llama_convert.convert_projector(r, vu.mm_projector, dtype=dtype)
        save_component(os.path.join(tmp, "mm_projector"), cfgs["mm_projector"], pj)
        summary["mm_projector"] = _count(pj)
        log(f"vision_tower, depth_transformer, mm_projector: {time.time() - t0:.1f}s")
        t0 = time.time()
        _, lm = llama_convert.load_hf_llama(sub["llm"], dtype=dtype)
        save_component(os.path.join(tmp, "llm"), cfgs["llm"], lm)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(sub["llm"], name)):
                shutil.copyfile(os.path.join(sub["llm"], name), os.path.join(tmp, "llm", name))
        if tokenizer_json is not None:
            with open(os.path.join(tmp, "llm", "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(tokenizer_json)
        summary["llm"] = _count(lm)
        del lm
        log(f"llm: {time.time() - t0:.1f}s")
        write_index(tmp, list(COMPONENTS), **{"model_type": "vila_u", "source": os.path.abspath(src),
                                              "dtype": str(dtype) if dtype is not None else "as stored", **index_extra})
    log(f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in summary.items()))
    return summary


def _count(tree) -> int:
    from fairjax.io.tree import flatten

    return int(sum(a.size for a in flatten(tree).values()))


# ----------------------------------------------------------------------------- loading (either layout)

MODEL_DIR, CHECKPOINT = "model_dir", "checkpoint"


def layout(path: str) -> str:
    """:data:`MODEL_DIR` for a fairjax VILA-U model dir (``fairjax.json`` with ``model_type: vila_u``, what
    ``tools/convert_vila_u.py`` writes), :data:`CHECKPOINT` for a vila-u checkpoint folder (``llm/``,
    ``vision_tower/``, ``mm_projector/`` as vila-u saves them); anything else is a one-line error."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a folder; pass a fairjax VILA-U model dir (tools/convert_vila_u.py output) "
                              f"or a vila-u checkpoint folder (llm/, vision_tower/, mm_projector/)")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        kind = read_json(index).get("model_type")
        if kind != "vila_u":
            raise CheckpointError(f"{index}: model_type is {kind!r}, not 'vila_u'; pass a VILA-U model dir "
                                  f"(tools/convert_vila_u.py output)")
        return MODEL_DIR
    missing = [n + "/" for n in SOURCE_PARTS if not os.path.isdir(os.path.join(path, n))]
    if missing:
        raise CheckpointError(f"{path}: no {INDEX_FILE} (not a tools/convert_vila_u.py output) and missing "
                              f"{', '.join(missing)}; expected a vila-u checkpoint folder (llm/, vision_tower/, "
                              f"mm_projector/) or a converted model dir")
    return CHECKPOINT


def load(path: str, *, dtype=jnp.float32, param_dtype=None, attention_impl: str | None = None,
         remat: bool | str = False, scan_layers: bool | str = False, vision_tower: bool = True,
         siglip_config: Mapping[str, Any] | None = None):
    """A VILA-U model -> ``(VilaU, params, RQVAESiglip, vision params)``, from either layout (:func:`layout`):
    a converted model dir, or vila-u's checkpoint folder read and converted in memory (same key rules and
    checks as :func:`convert_vila_u`; the SigLIP config as there, ``siglip_config`` for unknown ones).

    ``params`` = ``{'llm', 'mm_projector', 'rqtransformer', 'codebook'}`` for :mod:`fairjax.models.vila_u`;
    ``codebook`` is the vision tower's ``quantizer`` subtree (the same arrays, one copy). ``dtype`` is the
    compute dtype, ``param_dtype`` the params' (None = as stored). ``vision_tower=False`` reads only the
    generation path (LLM, projector, depth transformer, codebook) and returns ``None`` for the tower and its
    params (no SigLIP encoder or pixel decoder needed in the folder). Every part is checked key by key.
    ``scan_layers`` (True, False or "auto": on accelerators only) scans the LLaMA layers and the depth
    transformer's blocks and returns their params stacked (:func:`fairjax.models.vila_u.stack_params`);
    the files hold the unrolled layout either way.
    """
    from fairjax.models.layers import scan_layers_setting

    scan = scan_layers_setting(scan_layers)
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
              vision_tower=vision_tower)
    if layout(path) == MODEL_DIR:
        vu, params, tower, vis = _load_model_dir(path, **kw)
    else:
        vu, params, tower, vis = _load_checkpoint(path, siglip_config=siglip_config, **kw)
    if scan:
        vu, params = vu.with_scan_layers(True), vila_u.stack_params(params)
    return vu, params, tower, vis


def load_vision_tower(model_dir: str, *, dtype=jnp.float32, param_dtype=None, attention_impl: str | None = None):
    """``(RQVAESiglip, params)`` from a converted model dir (or its ``vision_tower/`` folder)."""
    folder = component_dir(model_dir, "vision_tower")
    cfg = read_json(os.path.join(folder, CONFIG_FILE))
    if not isinstance(cfg.get(SIGLIP_KEY), Mapping):
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: no '{SIGLIP_KEY}'; convert the vila-u folder with "
                              f"tools/convert_vila_u.py")
    model = build_vision_tower(cfg, cfg[SIGLIP_KEY], dtype=dtype, param_dtype=param_dtype or jnp.float32,
                               attention_impl=attention_impl)
    return model, load_params(os.path.join(folder, PARAMS_FILE), rqvae.param_shapes(model), dtype=param_dtype)


def _load_subtree(path: str, prefix: str, shapes: Mapping[tuple, tuple], dtype=None) -> dict:
    """The ``prefix/...`` params of a ``params.safetensors`` (checked against ``shapes``, paths below prefix)."""
    from fairjax.io.safetensors import SafetensorsReader
    from fairjax.io.tree import path_str, unflatten

    want = {f"{prefix}/{path_str(p)}": tuple(s) for p, s in shapes.items()}
    with SafetensorsReader(path) as r:
        have = {k: r.shape(k) for k in r.keys() if k.startswith(prefix + "/")}
        if have != want:
            raise CheckpointError(f"{path}: the {prefix}/ params {sorted(have.items())} do not fit the model's "
                                  f"{sorted(want.items())}; re-convert the vila-u folder with tools/convert_vila_u.py")
        return unflatten({tuple(k.split("/")[1:]): np.array(r[k], dtype=dtype or r.dtype(k), copy=True)
                          for k in want})


def _load_model_dir(model_dir: str, *, dtype, param_dtype, attention_impl, remat, vision_tower):
    tower, vis = (load_vision_tower(model_dir, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
                  if vision_tower else (None, None))
    dirs = {n: component_dir(model_dir, n) for n in ("llm", "mm_projector", "depth_transformer", "vision_tower")}
    vt_cfg = read_json(os.path.join(dirs["vision_tower"], CONFIG_FILE))
    vu = vila_u.build(read_json(os.path.join(dirs["llm"], CONFIG_FILE)), vt_cfg,
                      read_json(os.path.join(dirs["mm_projector"], CONFIG_FILE)), dtype=dtype,
                      param_dtype=param_dtype or jnp.float32, attention_impl=attention_impl, remat=remat)
    shapes = {"llm": llama.param_shapes(vu.llm),
              "mm_projector": llama_convert.projector_shapes(vu.mm_projector),
              "depth_transformer": llama_convert.rqtransformer_shapes(vu.rqtransformer)}
    p = {n: load_params(os.path.join(dirs[n], PARAMS_FILE), s, dtype=param_dtype) for n, s in shapes.items()}
    codebook = vis["quantizer"] if vision_tower else _load_subtree(
        os.path.join(dirs["vision_tower"], PARAMS_FILE), "quantizer", llama_convert.codebook_shapes(vu.codebook),
        dtype=param_dtype)
    params = {"llm": p["llm"], "mm_projector": p["mm_projector"], "rqtransformer": p["depth_transformer"],
              "codebook": codebook}
    return vu, params, tower, vis


def _load_checkpoint(src: str, *, dtype, param_dtype, attention_impl, remat, vision_tower, siglip_config):
    """A vila-u checkpoint folder converted in memory (what :func:`convert_vila_u` writes, not written)."""
    np_dtype = llama_convert._np_dtype(param_dtype)
    sub = _source_dirs(src)
    if vision_tower:
        cfgs, _, _ = check_vila_u(src, siglip_config=siglip_config)
    else:
        cfgs = _read_configs(sub)
    vu = vila_u.build(cfgs["llm"], cfgs["vision_tower"], cfgs["mm_projector"], dtype=dtype,
                      param_dtype=param_dtype or jnp.float32, attention_impl=attention_impl, remat=remat)
    tower = vis = None
    with ShardedReader(sub["vision_tower"], WEIGHTS_PREFIX) as r:
        if vision_tower:
            tower = build_vision_tower(cfgs["vision_tower"], cfgs["siglip_vision"], dtype=dtype,
                                       param_dtype=param_dtype or jnp.float32, attention_impl=attention_impl)
            vis, depth = convert_vision_tower_reader(r, tower, vu.rqtransformer, dtype=np_dtype)
            codebook = vis["quantizer"]
        else:
            depth = llama_convert.convert_rqtransformer(r, vu.rqtransformer, dtype=np_dtype)
            codebook = llama_convert.convert_codebook(r, vu.codebook, dtype=np_dtype)
    with ShardedReader(sub["mm_projector"], WEIGHTS_PREFIX) as r:
        pj = llama_convert.convert_projector(r, vu.mm_projector, dtype=np_dtype)
    _, lm = llama_convert.load_hf_llama(sub["llm"], dtype=np_dtype)
    return vu, {"llm": lm, "mm_projector": pj, "rqtransformer": depth, "codebook": codebook}, tower, vis
