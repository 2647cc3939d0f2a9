"""LLaMA decoder (transformers ``LlamaForCausalLM``) in Flax linen, with a KV cache.

A port of ``transformers/models/llama/modeling_llama.py`` (transformers 5.x).
The module tree mirrors the PyTorch one, so :mod:`fairjax.convert.core` maps
checkpoint keys onto the params with its generic rules::

    model.layers.3.self_attn.q_proj.weight -> model/layers_3/self_attn/q_proj/kernel
    model.layers.3.input_layernorm.weight  -> model/layers_3/input_layernorm/scale
    model.embed_tokens.weight              -> model/embed_tokens/embedding

Per layer (pre-norm, RoPE, grouped-query attention, SwiGLU)::

    a = h + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = input_layernorm(h)
    h' = a + down_proj(silu(gate_proj(m)) * up_proj(m)),                 m = post_attention_layernorm(a)
    rmsnorm(x) = weight * x / sqrt(mean(x^2) + eps)          (statistics in float32)
    rope(x)[p] = x * cos(p w) + rotate_half(x) * sin(p w),   w = inv_freq (per rope type)

and ``logits = lm_head(norm(h_L))`` (or ``norm(h_L) @ embed_tokens^T`` when tied).

Decoding uses a preallocated cache (:class:`KVCache`): keys/values of shape
``(layers, batch, max_len, kv_heads, head_dim)`` written at slot ``index`` with
``lax.dynamic_update_slice``, a per-slot validity mask (padding) and a per-row
position counter. A token's position id is the number of real (unmasked)
tokens before it in its row, as transformers' ``generate`` computes it
(``cumsum(mask) - 1``, 0 at padding), so left-padded batches decode like
unpadded rows. :func:`prefill`, :func:`decode_step` and :func:`greedy_generate`
are pure and jittable; prefill/decode accept ``inputs_embeds`` instead of ids
(VILA-U feeds image-token embeddings).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairjax import parallel
from fairjax.errors import CheckpointError
from fairjax.models.attention import dot_product_attention
from fairjax.models.layers import Dense, remat_wrap, scan_stack

Dtype = Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
#: the ``tensor``-axis rules (:func:`fairjax.parallel.tensor_rules`): q/k/v and gate/up column-parallel,
#: o and down row-parallel
PARTITION_RULES = parallel.tensor_rules(column=(r"self_attn/(q|k|v)_proj", r"mlp/(gate|up)_proj"),
                                        row=(r"self_attn/o_proj", r"mlp/down_proj"))


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a transformers ``LlamaConfig`` that the forward pass uses.

    Defaults are transformers' (LLaMA-2-7B), so a config.json that omits a key
    means what it means to ``from_pretrained``. RoPE scaling is flattened into
    ``rope_type`` / ``rope_factor`` / ``rope_low_freq_factor`` /
    ``rope_high_freq_factor`` / ``rope_original_max_position_embeddings``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
        """Parse a transformers LLaMA ``config.json`` dict (4.x ``rope_scaling`` or 5.x ``rope_parameters``).

        Raises a one-line :class:`CheckpointError` naming the key for what the
        port does not implement.
        """
        mt = cfg.get("model_type", "llama")
        if mt != "llama":
            raise CheckpointError(f"llm config: model_type {mt!r} is not supported; expected 'llama'")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise CheckpointError(f"llm config: hidden_act {act!r} is not supported; LLaMA uses 'silu'")
        hidden = int(cfg.get("hidden_size", cls.hidden_size))
        heads = int(cfg.get("num_attention_heads", cls.num_attention_heads))
        if hidden % heads and not cfg.get("head_dim"):
            raise CheckpointError(f"llm config: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        kv = cfg.get("num_key_value_heads") or heads
        if heads % kv:
            raise CheckpointError(f"llm config: num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv}")
        rope = _rope_fields(cfg)
        names = {"vocab_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
                 "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias"}
        kw = {k: cfg[k] for k in names if cfg.get(k) is not None}
        return cls(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=int(kv),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), **kw, **rope)


def _rope_fields(cfg: Mapping[str, Any]) -> dict:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (4.x)."""
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rp = dict(cfg.get(key) or {})
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise CheckpointError(f"llm config: {key}.rope_type {rtype!r} is not supported; "
                              f"use one of {', '.join(ROPE_TYPES)}")
    prf = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1.0, 1):
        raise CheckpointError(f"llm config: partial_rotary_factor {prf} is not supported (only 1.0)")
    out = {"rope_theta": float(theta), "rope_type": rtype}
    if rtype != "default":
        if "factor" not in rp:
            raise CheckpointError(f"llm config: {key}.factor is missing for rope type {rtype!r}")
        out["rope_factor"] = float(rp["factor"])
    if rtype == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in rp:
                raise CheckpointError(f"llm config: {key}.{k} is missing for rope type 'llama3'")
        out.update(rope_low_freq_factor=float(rp["low_freq_factor"]),
                   rope_high_freq_factor=float(rp["high_freq_factor"]),
                   rope_original_max_position_embeddings=int(rp["original_max_position_embeddings"]))
    return out


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """``w_i = 1 / theta^(2i/d)`` (float32, as transformers computes it), adjusted per rope type.

    linear: ``w / factor``. llama3: wavelengths ``2 pi / w`` above
    ``orig / low_freq_factor`` are divided by ``factor``, below
    ``orig / high_freq_factor`` kept, in between interpolated with
    ``s = (orig / wavelen - low) / (high - low)``: ``(1 - s) w / factor + s w``.
    dynamic: see :func:`dynamic_inv_freq` (depends on the sequence length).
    """
    d = config.head_dim
    w = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))))
    w = w.astype(np.float32)
    if config.rope_type == "linear":
        w = (w / np.float32(config.rope_factor)).astype(np.float32)
    elif config.rope_type == "llama3":
        factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.rope_original_max_position_embeddings
        wavelen = (2 * math.pi / w).astype(np.float32)
        w_l = np.where(wavelen > old / lo, w / factor, w).astype(np.float32)
        s = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smooth = ((1 - s) * w_l / factor + s * w_l).astype(np.float32)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        w = np.where(medium, smooth, w_l).astype(np.float32)
    return w


def dynamic_inv_freq(config: LlamaConfig, seq_len: jax.Array) -> jax.Array:
    """Dynamic NTK: ``theta' = theta * (factor * L / M - (factor - 1))^(d / (d - 2))``, ``L = max(seq_len, M)``.

    ``seq_len`` is ``max(position_ids) + 1`` of the call, as transformers
    computes it per forward. (transformers keeps the largest frequencies seen so
    far in module state; this pure version recomputes them per call, which is
    the same in every generate/forward except a forward whose length lies
    between ``M`` and a longer length seen earlier by the same torch module.)
    """
    d = config.head_dim
    m = config.max_position_embeddings
    f = config.rope_factor
    length = jnp.maximum(seq_len.astype(jnp.float32), float(m))
    base = config.rope_theta * ((f * length / m) - (f - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))


def rope_cos_sin(config: LlamaConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos(p w), sin(p w)`` of shape (B, S, head_dim) in float32 (``emb = cat(freqs, freqs)``)."""
    if config.rope_type == "dynamic":
        w = dynamic_inv_freq(config, jnp.max(position_ids) + 1)
    else:
        w = jnp.asarray(rope_inv_freq(config))
    freqs = position_ids.astype(jnp.float32)[..., None] * w
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """``cat(-x2, x1)`` with ``x = cat(x1, x2)`` on the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin``; x (B, S, heads, d), cos/sin (B, S, d)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- cache

class KVCache(NamedTuple):
    """Preallocated decoding state (a pytree; pass it through ``jit``/``scan``).

    ``k``/``v``: (layers, batch, max_len, kv_heads, head_dim); ``mask``:
    (batch, max_len) bool, True where a slot holds a real token; ``index``: ()
    int32, the next slot to write; ``positions``: (batch,) int32, the number of
    real tokens so far per row (= the next token's position id).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array
    positions: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros((batch, max_len), bool),
                   index=jnp.zeros((), jnp.int32), positions=jnp.zeros((batch,), jnp.int32))


def default_position_ids(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Position of each token = real tokens before it in its row (``start + cumsum(mask) - 1``; 0 at padding)."""
    m = attention_mask.astype(jnp.int32)
    pos = jnp.asarray(start, jnp.int32)[..., None] + jnp.cumsum(m, axis=-1) - 1
    return jnp.where(m > 0, pos, 0)


# ----------------------------------------------------------------------------- modules

class LlamaRMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``; statistics in float32, cast back before the weight."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(x.dtype).astype(self.dtype)


def _dense(features: int, bias: bool, dtype, param_dtype, name: str) -> Dense:
    return Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=nn.initializers.normal(0.02), name=name)


class LlamaAttention(nn.Module):
    """GQA self-attention with RoPE; writes this layer's keys/values into the cache when given: row
    ``layer_idx`` of the stacked ``(L, B, S, K, H)`` cache, or, with ``layer_idx=None`` (scanned layers),
    the ``(B, S, K, H)`` slice ``nn.scan`` hands this layer."""

    config: LlamaConfig
    layer_idx: int | None = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        c = self.config
        b, s, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = _dense(c.num_attention_heads * c.head_dim, c.attention_bias, name="q_proj", **kw)(x)
        k = _dense(c.num_key_value_heads * c.head_dim, c.attention_bias, name="k_proj", **kw)(x)
        v = _dense(c.num_key_value_heads * c.head_dim, c.attention_bias, name="v_proj", **kw)(x)
        q = apply_rope(q.reshape(b, s, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, s, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(b, s, c.num_key_value_heads, c.head_dim)
        if kv is not None and self.layer_idx is None:  # this layer's slice of the cache (scanned layers)
            ck, cv = kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            kv = (ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        elif kv is not None:
            ck, cv = kv
            start = (self.layer_idx, 0, index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
            kv = (ck, cv)
            k, v = ck[self.layer_idx].astype(q.dtype), cv[self.layer_idx].astype(q.dtype)
        if mask is None:
            o = dot_product_attention(q, k, v, is_causal=True, implementation=self.attention_impl)
        else:
            o = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        o = _dense(c.hidden_size, c.attention_bias, name="o_proj", **kw)(o.reshape(b, s, -1))
        return o, kv


class LlamaMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = _dense(c.intermediate_size, c.mlp_bias, name="gate_proj", **kw)(x)
        u = _dense(c.intermediate_size, c.mlp_bias, name="up_proj", **kw)(x)
        return _dense(c.hidden_size, c.mlp_bias, name="down_proj", **kw)(nn.silu(g) * u)


class LlamaDecoderLayer(nn.Module):
    """``h += self_attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))``; returns ``(h, kv)``."""

    config: LlamaConfig
    layer_idx: int | None = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, h, cos, sin, mask, kv=None, index=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = LlamaRMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(h)
        a, kv = LlamaAttention(c, self.layer_idx, attention_impl=self.attention_impl, name="self_attn", **kw)(
            n, cos, sin, mask, kv, index)
        h = h + a
        m = LlamaRMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(h)
        return h + LlamaMLP(c, name="mlp", **kw)(m), kv


class LlamaModel(nn.Module):
    """embed_tokens -> layers_0..L-1 -> norm. Returns ``(hidden (B,S,H) after norm, cache or None)``.

    ``scan_layers``: the layers run under ``nn.scan`` (one child ``layers`` with a leading layer axis on
    every param; the KV cache's leading layer axis is scanned along with them)."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool | str = False
    scan_layers: bool = False

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02), **kw)
        if self.scan_layers:
            layer = remat_wrap(LlamaDecoderLayer, self.remat, prevent_cse=False)
            self.layers = layer(c, None, attention_impl=self.attention_impl, **kw)
        else:
            layer = remat_wrap(LlamaDecoderLayer, self.remat)
            self.layers = [layer(c, i, attention_impl=self.attention_impl, **kw) for i in range(c.num_hidden_layers)]
        self.norm = LlamaRMSNorm(c.rms_norm_eps, **kw)

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                 cache: KVCache | None = None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, s = h.shape[:2]
        if cache is None:
            mask = None
            if attention_mask is not None:
                am = jnp.asarray(attention_mask).astype(bool)
                mask = jnp.tril(jnp.ones((s, s), bool))[None, None] & am[:, None, None, :]
                if position_ids is None:
                    position_ids = default_position_ids(am)
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
            kv = index = None
        else:
            am = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
            if position_ids is None:
                position_ids = default_position_ids(am, cache.positions)
            index = cache.index
            slot_mask = jax.lax.dynamic_update_slice(cache.mask, am, (0, index))
            q_slot = index + jnp.arange(s)
            k_slot = jnp.arange(cache.max_len)
            mask = (k_slot[None, :] <= q_slot[:, None])[None, None] & slot_mask[:, None, None, :]
            kv = (cache.k, cache.v)
        cos, sin = rope_cos_sin(self.config, position_ids)
        if self.scan_layers:  # the cache's leading (layer) axis is scanned with the params
            h, kv = scan_stack(self.layers, self.config.num_hidden_layers, h, cos, sin, mask, kv, index,
                               in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast))
        else:
            for layer in self.layers:
                h, kv = layer(h, cos, sin, mask, kv, index)
        h = self.norm(h)
        if cache is not None:  # a write past the last slot would be clamped by dynamic_update_slice: poison it
            h = jnp.where(index + s <= cache.max_len, h, jnp.nan)
            cache = KVCache(k=kv[0], v=kv[1], mask=slot_mask, index=index + s,
                            positions=cache.positions + am.sum(-1).astype(jnp.int32))
        return h, cache


class LlamaOutput(NamedTuple):
    logits: jax.Array | None  # (B, S, V) float32, or None when logits=False
    hidden_states: jax.Array  # (B, S, H) after the final norm
    cache: KVCache | None


class LlamaForCausalLM(nn.Module):
    """transformers ``LlamaForCausalLM``: ``model`` + ``lm_head`` (absent when ``tie_word_embeddings``).

    ``__call__(input_ids | inputs_embeds, attention_mask, position_ids, cache, logits=True)``
    returns :class:`LlamaOutput`. ``attention_mask`` (B, S) marks real tokens
    (padding may be on either side); without ``position_ids`` positions count
    real tokens only (see module docstring). ``attention_impl``: :mod:`fairjax.models.attention`
    (None = ``auto``). ``scan_layers``: see :class:`LlamaModel` (params ``model/layers/...`` with a
    leading layer axis; :func:`stack_params` / :func:`unstack_params` convert).
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool | str = False
    scan_layers: bool = False

    def setup(self):
        self.model = LlamaModel(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                attention_impl=self.attention_impl, remat=self.remat, scan_layers=self.scan_layers)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config.vocab_size, False, self.dtype, self.param_dtype, None)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                 cache: KVCache | None = None, logits: bool = True) -> LlamaOutput:
        h, cache = self.model(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        out = self.lm_logits(h) if logits else None
        if self.is_initializing() and not logits:
            self.lm_logits(h[:, :1])
        return LlamaOutput(out, h, cache)

    def lm_logits(self, h):
        """Logits (float32) from final-norm hidden states."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def embed(self, input_ids):
        """``embed_tokens(input_ids)``."""
        return self.model.embed_tokens(input_ids)


# ----------------------------------------------------------------------------- decoding

def _last_real_index(mask: jax.Array) -> jax.Array:
    """Index of the last True per row (S-1 for left padding)."""
    s = mask.shape[-1]
    return s - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=-1)


def prefill(model: LlamaForCausalLM, params, input_ids=None, attention_mask=None, *, inputs_embeds=None,
            max_len: int, cache_dtype: Dtype | None = None, logits: bool = True):
    """Run the prompt through a fresh cache of ``max_len`` slots.

    Returns ``(logits (B, V) float32 or None, hidden (B, H), cache)`` for each
    row's last real token. ``max_len`` must cover the prompt plus every token
    to be decoded.
    """
    x = input_ids if inputs_embeds is None else inputs_embeds
    b, s = x.shape[:2]
    if s > max_len:
        raise ValueError(f"prompt length {s} exceeds the cache length max_len={max_len}")
    am = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    cache = init_cache(model.config, b, max_len, cache_dtype or model.dtype)
    out = model.apply({"params": params}, input_ids, inputs_embeds=inputs_embeds, attention_mask=am,
                      cache=cache, logits=False)
    last = jnp.take_along_axis(out.hidden_states, _last_real_index(am)[:, None, None], axis=1)[:, 0]
    lg = model.apply({"params": params}, last, method=LlamaForCausalLM.lm_logits) if logits else None
    return lg, last, out.cache


def decode_step(model: LlamaForCausalLM, params, cache: KVCache, tokens=None, *, inputs_embeds=None,
                logits: bool = True):
    """One token per row: ``tokens`` (B,) ids or ``inputs_embeds`` (B, H).

    Returns ``(logits (B, V) or None, hidden (B, H), cache)``. The cache must
    have a free slot (``index < max_len``); past the end the outputs are NaN.
    """
    ids = None if tokens is None else jnp.asarray(tokens)[:, None]
    emb = None if inputs_embeds is None else inputs_embeds[:, None, :]
    out = model.apply({"params": params}, ids, inputs_embeds=emb, cache=cache, logits=logits)
    return (None if out.logits is None else out.logits[:, 0]), out.hidden_states[:, 0], out.cache


def greedy_generate(model: LlamaForCausalLM, params, input_ids, attention_mask=None, *, max_new_tokens: int,
                    eos_token_id: int | None = None, pad_token_id: int = 0, cache_dtype: Dtype | None = None):
    """Greedy KV-cached decoding: prefill, then a ``lax.scan`` of :func:`decode_step`.

    Returns the new tokens (B, max_new_tokens). With ``eos_token_id`` a row
    that has produced it emits ``pad_token_id`` afterwards (as transformers'
    ``generate`` does). Jit it with ``max_new_tokens`` static.
    """
    b, s = input_ids.shape
    logits, _, cache = prefill(model, params, input_ids, attention_mask, max_len=s + max(max_new_tokens - 1, 0),
                               cache_dtype=cache_dtype)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    done = jnp.zeros((b,), bool) if eos_token_id is None else first == eos_token_id

    def step(carry, _):
        cache, tok, done = carry
        lg, _, cache = decode_step(model, params, cache, tok)
        nxt = jnp.argmax(lg, axis=-1).astype(jnp.int32)
        if eos_token_id is not None:
            nxt = jnp.where(done, pad_token_id, nxt)
            done = done | (nxt == eos_token_id)
        return (cache, nxt, done), nxt

    if max_new_tokens == 1:
        return first[:, None]
    _, rest = jax.lax.scan(step, (cache, first, done), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


# ----------------------------------------------------------------------------- build

def from_config(cfg: Mapping[str, Any], *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                attention_impl: str | None = None, remat: bool | str = False,
                scan_layers: bool = False) -> LlamaForCausalLM:
    """Module for a transformers LLaMA ``config.json`` dict."""
    return LlamaForCausalLM(LlamaConfig.from_dict(cfg), dtype=dtype, param_dtype=param_dtype,
                            attention_impl=attention_impl, remat=remat, scan_layers=scan_layers)


def stack_params(params) -> dict:
    """Unrolled LLaMA params (``model/layers_i``, the files' layout) -> the ``scan_layers`` layout."""
    from fairjax.io.tree import stack_layers

    return stack_layers(params, ("layers",))


def unstack_params(params) -> dict:
    """``scan_layers`` LLaMA params -> the unrolled layout (unrolled params pass through)."""
    from fairjax.io.tree import unstack_layers

    return unstack_layers(params, ("layers",))


def param_shapes(model: LlamaForCausalLM) -> dict:
    """``{flax path: shape}`` of the model's params in the model's own layout, without allocating them."""
    from fairjax.io.tree import shapes_of
    from fairjax.models.layers import abstract_init

    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    if model.scan_layers:
        return shapes_of(abstract_init(model, ids))  # no initialiser traced
    # an unrolled model: traced scanned (one layer instead of all of them) and unstacked, the same tree
    return shapes_of(unstack_params(abstract_init(model.clone(scan_layers=True), ids)))
