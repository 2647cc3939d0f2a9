"""VILA-U preference fine-tuning with LoRA: SFT / BPO / DPO on image tokens, mDPO on text answers.

Model adapters (pure, jittable; ``params = {'llm', 'mm_projector', 'rqtransformer', 'codebook'}``
as :func:`fairjax.convert.vila_u.load` returns them; ``lora`` a flat :mod:`fairjax.lora` tree over
the LLM's kernels, applied unmerged -- see :func:`lora_interceptor`):

* :func:`image_code_logprobs` -- teacher-forced log-probability of an image's codes given its
  prompt (vila-u ``VILAULlamaModel.forward`` on a generation sample). A row is
  ``[prompt, left-padded, ending with <im_start>] [e_1 .. e_{N-1}]`` with
  ``e_t = mm_projector(sum_d emb(c_{t,d}))``; the LLM's final-norm hidden state at
  ``<im_start>`` and at ``e_1 .. e_{N-1}`` feeds the depth transformer, whose logits at
  depth ``d`` of position ``t`` score ``c_{t,d}``. Per sample
  ``lp = mean_{t,d} log softmax(logits_{t,d})[c_{t,d}]`` over the N x D codes (BPO, SFT) or
  the sum (DPO, ``reduce='sum'``).
* :func:`response_logprobs` -- ``sum_j log p(y_j | prefix)`` of an answer conditioned on an
  image (the understanding side): a row is ``[pre (left-padded)] [e_1 .. e_N] [post + answer
  (right-padded)]`` and ``lm_head`` scores the answer tokens.
* :func:`random_resized_crop` -- mDPO's corrupted image, torchvision ``RandomResizedCrop(size,
  scale=(0.01, 0.2))`` (the crop keeps 1-20% of the area, aspect in [3/4, 4/3]) with bilinear
  resizing back to the full size; :func:`encode_codes` turns pixels into codes.

Losses (:mod:`fairjax.losses`): ``sft`` = ``mean(-lp)`` (image-token cross-entropy);
``bpo`` = ``losses.bpo(lp_a, lp_b)`` on the two halves of each explicit pair, no reference;
``dpo`` = ``losses.dpo`` with the reference = the same base params without LoRA;
``mdpo`` = ``losses.mdpo(c, r, c', ...)``, reference = the base without LoRA, the same crop for
policy and reference (the released mDPO code draws a new crop for the reference pass).

Every random draw of a row (LoRA dropout mask, crop) comes from
``fold_in(step key, record index)``, so a pair's loss does not depend on the batch it is
in, on its position or on the device layout.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairjax import lora as lora_lib
from fairjax import losses
from fairjax.data import vila_u_data as vdata
from fairjax.errors import UserError
from fairjax.models import llama, siglip, vila_u

LOSSES = ("sft", "bpo", "dpo", "mdpo")
DATA_KIND = {"sft": ("images", "pairs"), "bpo": ("pairs",), "dpo": ("pairs",), "mdpo": ("mdpo",)}
LORA_TARGETS = (r"layers_\d+/self_attn/(q|k|v|o)_proj/kernel$", r"layers_\d+/mlp/(gate|up|down)_proj/kernel$")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------- LoRA, unmerged

def lora_interceptor(lora: Mapping[str, Mapping], alpha: float, dropout: float = 0.0, row_keys=None):
    """A flax method interceptor: every ``nn.Dense`` whose ``<module path>/kernel`` is in ``lora``
    returns ``dense(x) + (alpha / r) * (drop(x) @ a) @ b`` (PEFT's ``lora.Linear``; equal to
    ``x @ (W + (alpha/r) a b)`` without the dropout). ``drop`` zeroes each entry with probability
    ``dropout`` and scales by ``1 / (1 - dropout)``, its mask drawn per row from
    ``fold_in(row_keys[i], crc32(path))`` (no dropout when ``row_keys`` is None). Use it as
    ``with nn.intercept_methods(lora_interceptor(...)): model.apply(...)``; no merged copy of a
    kernel is made."""

    def icpt(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__" or not isinstance(ctx.module, nn.Dense):
            return next_fun(*args, **kwargs)
        path = "/".join(ctx.module.path) + "/kernel"
        entry = lora.get(path)
        y = next_fun(*args, **kwargs)
        if entry is None:
            return y
        x = jnp.asarray(args[0]).astype(y.dtype)
        if dropout > 0 and row_keys is not None:
            keep = hash_keep_mask(jax.random.key_data(row_keys), zlib.crc32(path.encode()), dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(y.dtype)
        a, b = entry["a"].astype(y.dtype), entry["b"].astype(y.dtype)
        return y + ((alpha / a.shape[-1]) * ((x @ a) @ b)).astype(y.dtype)

    return icpt


def _mix32(h):
    """lowbias32 (Wellons): an invertible 32-bit integer hash with good avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hash_keep_mask(key_data, salt: int, rate: float, shape) -> jax.Array:
    """Dropout keep-mask of ``shape`` (rows first): entry ``j`` of row ``i`` is kept when
    ``mix(mix(j ^ k_i0 ^ salt) ^ k_i1) >= rate * 2^32`` (``k_i`` = row ``i``'s key data).

    A counter-based hash of the element index, computed elementwise where it is used, so XLA
    fuses it into the dropout and never stores a mask (``jax.random.bernoulli`` masks were kept
    alive across layers by XLA, ~2 GB per device at 8 layers x 8 pairs). The index is built in
    ``shape`` itself from one iota per axis: computed on a flat ``(rows, prod(shape[1:]))`` iota and
    reshaped, the mask lost the activations' row sharding under FSDP, so XLA's SPMD partitioner
    computed it in another layout and moved it with an all-to-all (a stored bool mask per LoRA'd
    layer and pass, 0.17 GiB per LLaMA-7B layer at 8 pairs per device; bench/memory_vila_u.py).
    Keep probability ``1 - rate`` to within 2^-32; fresh masks per step, row and layer through the
    keys and salt."""
    shape = tuple(shape)
    kd = key_data.astype(jnp.uint32).reshape(shape[0], -1)
    row = (shape[0],) + (1,) * (len(shape) - 1)
    j = jnp.zeros((1,) + shape[1:], jnp.uint32)  # flat index within the row, built in x's own shape (no reshape)
    for axis in range(1, len(shape)):
        j = j + jax.lax.broadcasted_iota(jnp.uint32, (1,) + shape[1:], axis) * jnp.uint32(math.prod(shape[axis + 1:]))
    h = _mix32(j ^ kd[:, :1].reshape(row) ^ jnp.uint32(salt & 0xFFFFFFFF))
    h = _mix32(h ^ kd[:, -1:].reshape(row))
    return h >= jnp.uint32(min(int(rate * 2**32), 2**32 - 1))


def _llm_hidden(vu: vila_u.VilaU, llm_params, x, mask, lora, lora_alpha, dropout, row_keys):
    """Final-norm hidden states of the LLM on input embeddings ``x`` (LoRA applied when given)."""
    def run():
        return vu.llm.apply({"params": llm_params}, inputs_embeds=x, attention_mask=mask, logits=False).hidden_states

    if not lora:
        return run()
    with nn.intercept_methods(lora_interceptor(lora, lora_alpha, dropout, row_keys)):
        return run()


def _embed(vu, params, ids):
    return vu.llm.apply({"params": params["llm"]}, ids, method=llama.LlamaForCausalLM.embed)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[target]`` in float32: ``logits[target] - logsumexp(logits)``."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


# ----------------------------------------------------------------------------- adapters

def code_logprobs(vu: vila_u.VilaU, params, hidden, codes, chunk: int = 0) -> jax.Array:
    """``log softmax(depth_logits(hidden, codes))[codes]``: (B, N, H), (B, N, D) -> (B, N, D) float32.

    ``chunk`` > 0 (dividing N): positions go through the depth transformer ``chunk`` at a time in a
    ``lax.map`` whose body is rematerialised, so only one chunk's (B, chunk, D, V) logits and
    block activations are ever live (forward and backward); the values are the same."""
    def one(h, c):
        return token_logprobs(vila_u.depth_logits(vu, params, h, c), c)

    b, n = codes.shape[:2]
    if not chunk or chunk >= n:
        return one(hidden, codes)
    if n % chunk:
        raise UserError(f"model.head_chunk={chunk} does not divide the {n} image positions")
    k = n // chunk
    split = lambda x: jnp.swapaxes(x.reshape((b, k, chunk) + x.shape[2:]), 0, 1)  # noqa: E731
    out = jax.lax.map(lambda xs: jax.checkpoint(one)(*xs), (split(hidden), split(codes)))
    return jnp.swapaxes(out, 0, 1).reshape(codes.shape)


def image_code_logprobs(vu: vila_u.VilaU, params, prompt_ids, prompt_mask, codes, *, lora=None, lora_alpha=1.0,
                        dropout=0.0, row_keys=None, reduce: str = "mean", head_chunk: int = 0) -> jax.Array:
    """Per-sample log-probability of ``codes (B, N, D)`` after ``prompt_ids (B, P)`` (left-padded,
    ``prompt_mask`` marks real tokens, the last real token is ``<im_start>``); see module docstring.
    ``reduce``: ``'mean'`` over the N x D codes or ``'sum'``; ``head_chunk``: see
    :func:`code_logprobs`. Returns (B,) float32."""
    b, p = prompt_ids.shape
    te = _embed(vu, params, prompt_ids)
    ie = vila_u.image_embeds(vu, params, codes[:, :-1]).astype(te.dtype)
    x = jnp.concatenate([te, ie], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(codes.shape[:1] + (codes.shape[1] - 1,), bool)], 1)
    h = _llm_hidden(vu, params["llm"], x, mask, lora, lora_alpha, dropout, row_keys)[:, p - 1:]
    lp = code_logprobs(vu, params, h, codes, head_chunk)
    if reduce == "mean":
        return jnp.mean(lp, axis=(1, 2))
    if reduce == "sum":
        return jnp.sum(lp, axis=(1, 2))
    raise UserError(f"reduce={reduce!r} is not 'mean' or 'sum'")


def response_logprobs(vu: vila_u.VilaU, params, pre_ids, pre_mask, codes, rest_ids, rest_mask, rest_target, *,
                      lora=None, lora_alpha=1.0, dropout=0.0, row_keys=None) -> jax.Array:
    """``sum_j [rest_target_j] log p(rest_ids_j | pre, image, rest_<j)`` per row (B,) float32.

    ``pre_ids (B, P)`` left-padded (ends with ``<im_start>``), ``codes (B, N, D)`` the image,
    ``rest_ids (B, R)`` right-padded (``<im_end>``, the question, ``ASSISTANT:``, the answer,
    EOS), ``rest_target`` marks the answer tokens to score."""
    p, n, r = pre_ids.shape[1], codes.shape[1], rest_ids.shape[1]
    x = jnp.concatenate([_embed(vu, params, pre_ids), vila_u.image_embeds(vu, params, codes),
                         _embed(vu, params, rest_ids)], axis=1)
    mask = jnp.concatenate([pre_mask.astype(bool), jnp.ones(codes.shape[:2], bool), rest_mask.astype(bool)], 1)
    h = _llm_hidden(vu, params["llm"], x, mask, lora, lora_alpha, dropout, row_keys)[:, p + n - 1:p + n - 1 + r]
    logits = vu.llm.apply({"params": params["llm"]}, h, method=llama.LlamaForCausalLM.lm_logits)
    return jnp.sum(jnp.where(rest_target, token_logprobs(logits, rest_ids), 0.0), axis=-1)


def encode_codes(tower, params, pixels: jax.Array) -> jax.Array:
    """Pixels (B, 3, S, S) in [-1, 1] -> codes (B, h*w, D) (raster order) with the vision tower's
    SigLIP encoder and residual quantizer (``params['vision_model']``, ``params['codebook']``)."""
    v = {"params": {"vision_model": params["vision_model"], "quantizer": params["codebook"]}}
    codes, _ = tower.apply(v, pixels, method="encode_image")
    return codes.reshape(codes.shape[0], -1, codes.shape[-1])


# ----------------------------------------------------------------------------- mDPO's corrupted image

def crop_box(key, height: int, width: int, scale=(0.01, 0.2), ratio=(3 / 4, 4 / 3)) -> jax.Array:
    """torchvision ``RandomResizedCrop.get_params`` (its first attempt, which always fits for
    ``scale <= 0.2``): area fraction ``s ~ U(scale)``, aspect ``exp(U(log ratio))``,
    ``w = round(sqrt(s H W aspect))``, ``h = round(sqrt(s H W / aspect))``, top-left uniform.
    Returns int32 ``[top, left, h, w]``."""
    k = jax.random.split(key, 4)
    target = height * width * jax.random.uniform(k[0], (), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k[1], (), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    w = jnp.clip(jnp.round(jnp.sqrt(target * aspect)), 1, width).astype(jnp.int32)
    h = jnp.clip(jnp.round(jnp.sqrt(target / aspect)), 1, height).astype(jnp.int32)
    top = jnp.floor(jax.random.uniform(k[2]) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k[3]) * (width - w + 1)).astype(jnp.int32)
    return jnp.stack([top, left, h, w])


def _src_index(start, size, n_out: int):
    """torch bilinear, ``align_corners=False``: ``src = max((o + 0.5) size / n_out - 0.5, 0)``,
    ``i0 = min(floor(src), size - 1)``, ``i1 = min(i0 + 1, size - 1)``, weight ``src - i0``."""
    src = jnp.maximum((jnp.arange(n_out, dtype=jnp.float32) + 0.5) * (size.astype(jnp.float32) / n_out) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), size - 1)
    i1 = jnp.minimum(i0 + 1, size - 1)
    lam = jnp.clip(src - i0, 0.0, 1.0)
    return start + i0, start + i1, lam


def resized_crop(image: jax.Array, box: jax.Array) -> jax.Array:
    """``F.interpolate(image[:, t:t+h, l:l+w], size=(H, W), mode='bilinear', align_corners=False)``
    for one (C, H, W) image and a traced ``box = [t, l, h, w]`` (no antialiasing: the crop is
    upsampled, where torchvision's antialias has no effect)."""
    _, hh, ww = image.shape
    y0, y1, ly = _src_index(box[0], box[2], hh)
    x0, x1, lx = _src_index(box[1], box[3], ww)
    rows = image[:, y0, :] * (1 - ly)[None, :, None] + image[:, y1, :] * ly[None, :, None]
    return rows[:, :, x0] * (1 - lx) + rows[:, :, x1] * lx


def random_resized_crop(keys, images: jax.Array, scale=(0.01, 0.2), ratio=(3 / 4, 4 / 3)):
    """Per image (B, C, H, W) one :func:`crop_box` from ``keys[i]``, resized back to (H, W).
    Returns ``(corrupted images, boxes (B, 4))``."""
    _, _, hh, ww = images.shape
    boxes = jax.vmap(lambda k: crop_box(k, hh, ww, scale, ratio))(keys)
    return jax.vmap(resized_crop)(images.astype(jnp.float32), boxes).astype(images.dtype), boxes


# ----------------------------------------------------------------------------- tiny model

TINY = {
    "llm": dict(model_type="llama", vocab_size=68, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                tie_word_embeddings=False, hidden_act="silu"),
    "siglip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                   patch_size=8, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "rqvaesiglip": dict(embed_dim=32, n_embed=64, latent_shape=[4, 4, 32], code_shape=[4, 4, 4],
                        shared_codebook=True, pretrained_model="tiny-random-siglip",
                        ddconfig=dict(ch=32, out_ch=3, ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                                      resolution=32, z_channels=8, dropout=0.0, double_z=False, in_channels=3)),
    "rqtransformer": dict(block_size=[4, 4, 4], input_embed_dim_1=32, input_embed_dim_2=64, embed_dim=32,
                          vocab_size=64, head={"block": {"n_head": 4}, "n_layer": 2}),
    "mm_projector": dict(mm_projector_type="mlp2x_gelu"),
}


def random_params(abstract, seed: int) -> dict:
    """Numpy params for a tree of shapes (no compilation): norm ``scale`` 1, ``bias`` 0, the rest
    ``N(0, 1 / fan_in)`` (fan_in = all dims but the last; codebook / embedding rows ``N(0, 1)``)."""
    from fairjax.convert.core import flatten, unflatten

    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten(abstract).items():
        shape, name = tuple(leaf.shape), path[-1]
        if name == "scale":
            out[path] = np.ones(shape, np.float32)
        elif name == "bias":
            out[path] = np.zeros(shape, np.float32)
        else:
            fan_in = 1 if name == "embedding" or len(shape) < 2 else math.prod(shape[:-1])
            out[path] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    return unflatten(out)


def build_tiny_model_dir(out: str, seed: int = 0) -> None:
    """A random VILA-U-shaped fairjax model dir (same layout as ``tools/convert_vila_u.py`` writes)."""
    from fairjax.convert import vila_u as convert_vila_u
    from fairjax.convert.model_dir import save_component, write_index

    t = TINY
    vt_cfg = {"rqvaesiglip": t["rqvaesiglip"], "rqtransformer": t["rqtransformer"], "hidden_size": 32,
              convert_vila_u.SIGLIP_KEY: t["siglip"]}
    vu = vila_u.build(t["llm"], vt_cfg, t["mm_projector"])
    tower = convert_vila_u.build_vision_tower(vt_cfg, t["siglip"])
    p = random_params(jax.eval_shape(vu.init, jax.random.key(0)), seed)
    s = t["siglip"]["image_size"]
    vis = random_params(jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, 3, s, s)))["params"], seed + 1)
    vis["quantizer"] = p["codebook"]
    os.makedirs(out)
    save_component(os.path.join(out, "llm"), t["llm"], p["llm"])
    save_component(os.path.join(out, "mm_projector"), t["mm_projector"], p["mm_projector"])
    save_component(os.path.join(out, "depth_transformer"), t["rqtransformer"], p["rqtransformer"])
    save_component(os.path.join(out, "vision_tower"), vt_cfg, vis)
    write_index(out, list(convert_vila_u.COMPONENTS), model_type="vila_u", source=f"fairjax tiny random, seed {seed}")


def ensure_tiny(root: str, seed: int = 0) -> dict[str, str]:
    """``{'model', 'pairs', 'mdpo'}`` dirs of the tiny model and datasets under ``root``, built once
    (deterministically from ``seed``) in a temp dir renamed into place."""
    root = os.path.abspath(root)
    dirs = {k: os.path.join(root, k) for k in ("model", "pairs", "mdpo")}
    if all(os.path.isdir(d) for d in dirs.values()):
        return dirs
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tiny_model_dir(os.path.join(tmp, "model"), seed)
        tok = vdata.TinyTokenizer(TINY["llm"]["vocab_size"])
        rq = TINY["rqtransformer"]
        shape = (rq["block_size"][0] * rq["block_size"][1], rq["block_size"][2])
        n_embed = TINY["rqvaesiglip"]["n_embed"]
        vdata.write_dataset(os.path.join(tmp, "pairs"), "pairs", vdata.tiny_pair_records(tok, shape, n_embed, seed=seed),
                            codebook_size=n_embed, metadata={"source": "tiny", "seed": seed})
        vdata.write_dataset(os.path.join(tmp, "mdpo"), "mdpo",
                            vdata.tiny_mdpo_records(tok, tok.eos, TINY["siglip"]["image_size"], seed=seed),
                            codebook_size=n_embed, metadata={"source": "tiny", "seed": seed})
        try:
            os.replace(tmp, root)
        except OSError:
            if not all(os.path.isdir(d) for d in dirs.values()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs


# ----------------------------------------------------------------------------- the task

def default_config():
    """Every key :class:`VilaUPrefTask` reads, on top of :func:`fairjax.trainer.default_train_config`
    (REFERENCE.md defaults: LoRA r 32, alpha 32, dropout 0.1 on q/k/v/o/gate/up/down of every LLaMA
    layer; depth transformer, codec and projector frozen)."""
    import ml_collections

    from fairjax.trainer import default_train_config

    c = default_train_config()
    c.task = "vila_u_pref"
    c.loss = "bpo"  # sft | bpo | dpo | mdpo
    c.beta = 1.0
    c.bpo_variant = "v1"  # fairjax.losses.bpo: v1 = the released bpo_loss_v1
    c.dpo_average_logp = False  # DPO on image tokens: summed (False) or mean (True) code log-probs
    c.anchor_delta = 0.0  # mDPO anchor margin
    c.epochs = 1.0  # used when total_steps <= 0: total_steps = round(epochs * steps_per_epoch)
    c.total_steps = 0
    c.warmup_ratio = 0.03  # > 0: optimizer.warmup_steps = ceil(warmup_ratio * total_steps)
    c.tiny = ""  # non-empty: build / reuse the tiny random model and data under tiny_root
    c.tiny_root = os.path.join(os.path.expanduser("~"), ".cache", "fairjax", "tiny_vila_u")
    c.tiny_seed = 0
    c.model = ml_collections.ConfigDict(dict(
        dir="",  # a fairjax VILA-U model dir (tools/convert_vila_u.py) or the vila-u checkpoint folder
        dtype="float32",  # compute: bfloat16 on accelerators
        param_dtype="float32",  # frozen base params: bfloat16 on accelerators (LoRA stays float32)
        remat=False,  # rematerialise each LLaMA / depth-transformer block in the backward pass
        attention_impl="",  # '' = XLA; 'cudnn' = flash attention on GPU
        head_chunk=0,  # > 0: image positions per rematerialised depth-head chunk (bounds the code logits)
    ))
    c.data = ml_collections.ConfigDict(dict(dir="", split="train", shuffle=True, max_prompt_len=0))
    c.lora = ml_collections.ConfigDict(dict(rank=32, alpha=32.0, dropout=0.1, targets=LORA_TARGETS,
                                            init=""))  # init: a LoRA file to continue (BPO stage 2)
    c.corrupt = ml_collections.ConfigDict(dict(scale=(0.01, 0.2), ratio=(3 / 4, 4 / 3)))  # mDPO crop
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 10
    return c


def load_model(model_dir: str, *, dtype=jnp.float32, param_dtype=None, remat=False, attention_impl=None):
    """``(VilaU, params, RQVAESiglip, vision params)`` of a fairjax VILA-U model dir or a vila-u checkpoint
    folder (:func:`fairjax.convert.vila_u.load`)."""
    from fairjax.convert import vila_u as convert_vila_u

    if not os.path.isdir(model_dir):
        raise UserError(f"model.dir {model_dir!r} is not a folder; pass vila-u-7b-256's folder or its "
                        "tools/convert_vila_u.py output (or use a :tiny preset)")
    return convert_vila_u.load(model_dir, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                               remat=remat)


def _dtype(name: str, key: str):
    if name not in _DTYPES:
        raise UserError(f"{key}={name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class VilaUPrefTask:
    """Task for :func:`fairjax.trainer.train` (contract in its docstring). ``model`` optionally gives
    ``(VilaU, params[, RQVAESiglip, vision params])`` in place of ``config.model.dir`` (tests)."""

    init_in_jit = False

    def __init__(self, config, model=None):
        self.config = c = config
        self.loss_name = str(c.loss)
        if self.loss_name not in LOSSES:
            raise UserError(f"config.loss={self.loss_name!r} is not one of {', '.join(LOSSES)}")
        if c.get("tiny"):
            dirs = ensure_tiny(os.path.join(c.tiny_root, f"seed{int(c.tiny_seed)}"), int(c.tiny_seed))
            c.model.dir = c.model.dir or dirs["model"]
            c.data.dir = c.data.dir or dirs["mdpo" if self.loss_name == "mdpo" else "pairs"]
        dtype = _dtype(str(c.model.dtype), "model.dtype")
        self.param_dtype = _dtype(str(c.model.param_dtype), "model.param_dtype")
        if model is None:
            model = load_model(str(c.model.dir), dtype=dtype, param_dtype=self.param_dtype, remat=bool(c.model.remat),
                               attention_impl=c.model.attention_impl or None)
        self.vu, self.base = model[0], model[1]
        self.tower, vis = (model[2], model[3]) if len(model) > 2 else (None, None)
        if self.loss_name == "mdpo":
            if self.tower is None:
                raise UserError("mDPO needs the vision tower (to encode the corrupted image); load a converted model dir")
            self.base = dict(self.base, vision_model=vis["vision_model"])
        self._open_data()
        self.alpha, self.rank = float(c.lora.alpha), int(c.lora.rank)
        self.dropout = float(c.lora.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if int(c.total_steps) <= 0:
            c.total_steps = max(1, int(round(float(c.epochs) * self.batches.steps_per_epoch)))
        if float(c.get("warmup_ratio", 0.0)) > 0:
            c.optimizer.warmup_steps = int(math.ceil(float(c.warmup_ratio) * int(c.total_steps)))

    # -- data

    def _open_data(self):
        from fairjax.data.prefs import PreferenceBatches

        c = self.config
        data = vdata.VilaUData(str(c.data.dir), str(c.data.split))
        if data.kind not in DATA_KIND[self.loss_name]:
            raise UserError(f"{data.out_dir} holds {data.kind!r} records; loss {self.loss_name!r} needs "
                            f"{' or '.join(repr(k) for k in DATA_KIND[self.loss_name])} records")
        vocab = self.vu.llm.config.vocab_size
        if data.info["max_token_id"] >= vocab:
            raise UserError(f"{data.out_dir}: token id {data.info['max_token_id']} is outside the LLM vocabulary "
                            f"({vocab}); tokenize with this model's tokenizer")
        if data.kind != "mdpo":
            n_embed, want = self.vu.codebook.config.n_embed, (self.vu.image_tokens, self.vu.depth)
            if data.info["codebook_size"] != n_embed or tuple(data.code_shape) != want:
                raise UserError(f"{data.out_dir}: codes of shape {tuple(data.code_shape)} from a codebook of "
                                f"{data.info['codebook_size']}, but the model takes {want} codes from {n_embed}; "
                                "encode the images with this model's vision tower")
        else:
            s = self.tower.config.siglip.image_size
            if tuple(data.info["image_shape"]) != (s, s, 3):
                raise UserError(f"{data.out_dir}: images are {tuple(data.info['image_shape'])}, the vision tower takes "
                                f"({s}, {s}, 3); resize them when writing the dataset")
        self.data = vdata.SampleView(data) if self.loss_name == "sft" else data
        self.batches = PreferenceBatches(self.data, int(c.batch_size), seed=int(c.seed), shuffle=bool(c.data.shuffle))
        L = self.data.lengths
        if data.kind == "mdpo":
            self.pre_len = int(L["pre_ids"].max())
            self.rest_len = int((L["post_ids"] + np.maximum(L["chosen_ids"], L["rejected_ids"])).max())
        else:
            longest = int(L["prompt_ids"].max())
            self.prompt_len = int(c.data.max_prompt_len) or longest
            if longest > self.prompt_len:
                raise UserError(f"{data.out_dir}: a prompt has {longest} tokens, more than data.max_prompt_len="
                                f"{self.prompt_len}; raise it (0 = the longest prompt)")

    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        units = self.batches.global_indices(step)
        per = len(units) // process_count
        units = units[process_index * per:(process_index + 1) * per]
        raw = self.data.read(units)
        out = {"index": np.asarray(units, np.int32)}
        if self.loss_name == "mdpo":
            out["pre_ids"], out["pre_mask"] = vdata.left_pad(raw["pre_ids"], self.pre_len)
            for side in ("chosen", "rejected"):
                rest = [np.concatenate([p, a]) for p, a in zip(raw["post_ids"], raw[f"{side}_ids"])]
                ids, mask = vdata.right_pad(rest, self.rest_len)
                start = np.asarray([len(p) for p in raw["post_ids"]])[:, None]
                out[f"{side}_ids"], out[f"{side}_mask"] = ids, mask
                out[f"{side}_target"] = mask & (np.arange(self.rest_len)[None] >= start)
            out["image"] = raw["image"]
            return out
        out["prompt_ids"], out["prompt_mask"] = vdata.left_pad(raw["prompt_ids"], self.prompt_len)
        if self.loss_name == "sft":
            out["codes"] = raw["codes"]
        else:
            out["codes_a"], out["codes_b"] = raw["codes_a"], raw["codes_b"]
        return out

    # -- params

    def init(self, rng):
        c = self.config
        frozen = jax.tree.map(lambda a: np.asarray(a).astype(self.param_dtype), self.base)
        targets = list(c.lora.targets)
        if c.lora.init:
            lora, meta = lora_lib.load(str(c.lora.init))
            want = lora_lib.match_kernels(frozen["llm"], targets)
            if sorted(lora) != want:
                raise UserError(f"LoRA file {c.lora.init} adapts {len(lora)} kernels, lora.targets select {len(want)} "
                                f"of this model; continue with the same targets and model")
            if abs(float(meta.get("alpha", self.alpha)) - self.alpha) > 1e-9 or lora_lib.rank_of(
                    next(iter(lora.values()))) != self.rank:
                raise UserError(f"LoRA file {c.lora.init} has rank {meta.get('rank')} alpha {meta.get('alpha')}, the "
                                f"config lora.rank={self.rank} lora.alpha={self.alpha}; make them equal")
            lora_lib.merge(frozen["llm"], lora, self.alpha)  # checks every entry's shape (result discarded)
            lora = {k: {n: np.asarray(v, np.float32) for n, v in e.items()} for k, e in lora.items()}
        else:
            lora = jax.device_get(lora_lib.init(frozen["llm"], targets, self.rank, self.alpha, rng))
        return lora, frozen

    # -- loss

    def _row_keys(self, rng, index, slots: int):
        """(B * slots,) keys ``fold_in(fold_in(fold_in(rng, 1), index_i), slot)``, rows ordered (i, slot)."""
        per = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, 1), i))(index)
        return jax.vmap(lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(jnp.arange(slots)))(per).reshape(-1)

    def _lp(self, lora, frozen, batch, codes, rng, slots, reduce):
        """Image-code log-probs of ``codes (B, slots, N, D)`` under the prompt of each record -> (B, slots)."""
        b = codes.shape[0]
        ids = jnp.repeat(batch["prompt_ids"], slots, axis=0)
        mask = jnp.repeat(batch["prompt_mask"], slots, axis=0)
        keys = self._row_keys(rng, batch["index"], slots) if lora else None
        lp = image_code_logprobs(self.vu, frozen, ids, mask, codes.reshape((b * slots,) + codes.shape[2:]),
                                 lora=lora, lora_alpha=self.alpha, dropout=self.dropout if lora else 0.0,
                                 row_keys=keys, reduce=reduce, head_chunk=int(self.config.model.get("head_chunk", 0)))
        return lp.reshape(b, slots)

    def loss(self, trainable, frozen, batch, rng):
        c = self.config
        if self.loss_name == "sft":
            lp = self._lp(trainable, frozen, batch, batch["codes"][:, None], rng, 1, "mean")[:, 0]
            nll = -jnp.mean(lp)
            return nll, {"nll": jax.lax.stop_gradient(nll), "lp": jax.lax.stop_gradient(jnp.mean(lp))}
        if self.loss_name == "mdpo":
            return self._mdpo(trainable, frozen, batch, rng)
        codes = jnp.stack([batch["codes_a"], batch["codes_b"]], axis=1)
        if self.loss_name == "bpo":
            lp = self._lp(trainable, frozen, batch, codes, rng, 2, "mean")
            loss, m = losses.bpo(lp[:, 0], lp[:, 1], beta=float(c.beta), variant=str(c.bpo_variant))
            m.update(lp_a=jax.lax.stop_gradient(jnp.mean(lp[:, 0])), lp_b=jax.lax.stop_gradient(jnp.mean(lp[:, 1])))
            return loss, m
        reduce = "mean" if c.dpo_average_logp else "sum"
        lp = self._lp(trainable, frozen, batch, codes, rng, 2, reduce)
        ref = jax.lax.stop_gradient(self._lp(None, frozen, batch, codes, rng, 2, reduce))
        return losses.dpo(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta=float(c.beta))

    def mdpo_codes(self, frozen, batch, rng):
        """``(clean codes, corrupted codes, crop boxes)`` of the batch's images: each image's crop box
        from ``fold_in(fold_in(rng, 2), index)``; both images encoded by the frozen vision tower."""
        c = self.config
        pix = siglip.preprocess(batch["image"])
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, 2), i))(batch["index"])
        bad, boxes = random_resized_crop(keys, pix, tuple(c.corrupt.scale), tuple(c.corrupt.ratio))
        b = pix.shape[0]
        both = encode_codes(self.tower, frozen, jnp.stack([pix, bad], 1).reshape((2 * b,) + pix.shape[1:]))
        both = jax.lax.stop_gradient(both.reshape((b, 2) + both.shape[1:]))
        return both[:, 0], both[:, 1], boxes

    def mdpo_logprobs(self, trainable, frozen, batch, rng):
        """``(policy, reference)`` answer log-probs, each (B, 3): columns chosen | image,
        rejected | image, chosen | corrupted image (the same crop for both)."""
        clean, bad, _ = self.mdpo_codes(frozen, batch, rng)
        b = clean.shape[0]
        codes = jnp.stack([clean, clean, bad], 1).reshape((3 * b,) + clean.shape[1:])
        rest = {k: jnp.stack([batch[f"chosen_{k}"], batch[f"rejected_{k}"], batch[f"chosen_{k}"]], 1).reshape(3 * b, -1)
                for k in ("ids", "mask", "target")}
        pre_ids, pre_mask = jnp.repeat(batch["pre_ids"], 3, axis=0), jnp.repeat(batch["pre_mask"], 3, axis=0)

        def run(lora):
            keys3 = self._row_keys(rng, batch["index"], 3) if lora else None
            lp = response_logprobs(self.vu, frozen, pre_ids, pre_mask, codes, rest["ids"], rest["mask"],
                                   rest["target"], lora=lora, lora_alpha=self.alpha,
                                   dropout=self.dropout if lora else 0.0, row_keys=keys3)
            return lp.reshape(b, 3)

        return run(trainable), jax.lax.stop_gradient(run(None))

    def _mdpo(self, trainable, frozen, batch, rng):
        pol, ref = self.mdpo_logprobs(trainable, frozen, batch, rng)
        return losses.mdpo(pol[:, 0], pol[:, 1], pol[:, 2], ref[:, 0], ref[:, 1], ref[:, 2], beta=float(self.config.beta),
                           anchor_delta=float(self.config.get("anchor_delta", 0.0)))

    # -- outputs

    def finish(self, trainable, frozen, workdir: str) -> dict:
        from fairjax.trainer import params_on_host

        host = params_on_host(trainable)
        path = os.path.join(workdir, "lora.safetensors")
        if jax.process_index() == 0:
            lora_lib.save(path, host, alpha=self.alpha, targets=list(self.config.lora.targets),
                          loss=self.loss_name, base_model=str(self.config.model.dir))
        return {"lora": path, "lora_params": lora_lib.num_params(host)}
