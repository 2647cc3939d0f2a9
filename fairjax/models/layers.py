"""Shared 2-D building blocks of the diffusers UNet / VAE family, in Flax linen.

Every module here mirrors a diffusers PyTorch module of the same name, with the
same submodule names (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``,
``to_out_0``, ``ff/net_0/proj`` ...), so that the generic key rules of
:mod:`fairjax.convert.core` map the PyTorch state dict onto these params with no
per-model table. Activations are NHWC (channels last) inside; the models
transpose once at their boundary.

Numerics follow diffusers exactly (float32 parity ~1e-6): GroupNorm / LayerNorm
use the two-pass variance (``use_fast_variance=False``), GELU is the exact erf
form, nearest upsampling reproduces ``F.interpolate(mode="nearest")``.
"""

from __future__ import annotations

import math
import threading
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairjax.models.attention import dot_product_attention

Dtype = Any

#: activation checkpointing of a repeated block (``remat`` of the models and ``model.remat`` of the
#: configs): ``none`` keeps every activation; ``nothing_saveable`` recomputes the whole block in the
#: backward pass (``nn.remat``'s default, the least memory); ``dots_saveable`` keeps the results of
#: matmuls and recomputes the rest; ``dots_with_no_batch_dims_saveable`` keeps only the matmuls
#: without batch dimensions (the weight products, not attention's score products)
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
_REMAT_ALIASES = {True: "nothing_saveable", False: "none", None: "none", "true": "nothing_saveable",
                  "false": "none", "full": "nothing_saveable", "": "none"}


def remat_policy(remat) -> str:
    """The canonical policy name of a ``remat`` setting (a bool or one of :data:`REMAT_POLICIES`)."""
    key = remat.strip().lower() if isinstance(remat, str) else remat
    name = _REMAT_ALIASES.get(key, key) if isinstance(key, (str, bool)) or key is None else None
    if name not in REMAT_POLICIES:
        from fairjax.errors import ConfigError

        raise ConfigError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)} (or true / false)")
    return name


def remat_wrap(cls, remat, **kwargs):
    """``cls`` under ``nn.remat`` with the policy ``remat`` names (``cls`` itself for ``none``)."""
    name = remat_policy(remat)
    if name == "none":
        return cls
    policy = None if name == "nothing_saveable" else getattr(jax.checkpoint_policies, name)
    return nn.remat(cls, policy=policy, **kwargs)

# ----------------------------------------------------------------------------- abstract init

_ABSTRACT = threading.local()  # ``on`` while :func:`abstract_init` runs on this thread


def _zeros_init(rng, shape, dtype=jnp.float32, *args, **kwargs):
    return jnp.zeros(shape, dtype)


def _install_abstract_param():
    """Wrap flax's ``Scope.param`` once so that, on a thread inside :func:`abstract_init`, a new param's
    initialiser is replaced by zeros of the same shape and dtype. Every other call goes to flax unchanged."""
    from flax.core import scope

    if getattr(scope.Scope.param, "_fairjax_abstract", False):
        return
    param = scope.Scope.param

    def wrapped(self, name, init_fn, *init_args, **init_kwargs):
        if getattr(_ABSTRACT, "on", False):
            init_fn = _zeros_init
        return param(self, name, init_fn, *init_args, **init_kwargs)

    wrapped._fairjax_abstract = True
    scope.Scope.param = wrapped


def abstract_init(model: nn.Module, *inputs) -> dict:
    """``jax.eval_shape`` of ``model.init(key, *inputs)["params"]``: a tree of ``ShapeDtypeStruct``, no memory,
    no compute. The initialisers are not traced (each param is ``zeros(shape, dtype)`` in the trace): every
    flax and fairjax initialiser takes ``(key, shape, dtype)``, so the shapes and dtypes are those ``init``
    gives, and the 1680 random initialisers of the SDXL UNet no longer cost a third of its trace.
    ``inputs`` may be arrays or ``ShapeDtypeStruct``."""
    _install_abstract_param()

    def init(*a):
        before, _ABSTRACT.on = getattr(_ABSTRACT, "on", False), True
        try:
            return model.init(jax.random.key(0), *a)["params"]
        finally:
            _ABSTRACT.on = before

    return jax.eval_shape(init, *inputs)


#: ``scan_layers`` settings (``model.scan_layers`` of the configs): ``auto`` scans on GPU / TPU, not on CPU
SCAN_LAYERS = ("auto", "true", "false")


def scan_layers_setting(value, backend: str | None = None, key: str = "scan_layers") -> bool:
    """Whether to scan repeated layers for a ``scan_layers`` setting: True / False (or "true" / "false"),
    or "auto" (None, "") = True on an accelerator (GPU, TPU), False on CPU. ``key`` names the setting
    in the error a bad value raises."""
    v = value.strip().lower() if isinstance(value, str) else value
    if v in (None, "", "auto"):
        return (backend or jax.default_backend()) != "cpu"
    if v in (True, "true"):
        return True
    if v in (False, "false"):
        return False
    from fairjax.errors import ConfigError

    raise ConfigError(f"{key}={value!r} is not one of {', '.join(SCAN_LAYERS)}")


def scan_stack(block: nn.Module, length: int, carry, *args, in_axes=None):
    """Run ``block`` ``length`` times with ``nn.scan``: ``carry = block(carry, *args)`` (or, for a block
    that returns ``(carry, y)``, also stacking the ``y``), one set of params per layer stacked on a
    leading axis (``variable_axes={'params': 0, 'lora': 0}``, ``split_rngs={'params': True}``).

    ``block`` is the unbound module instance (its name names the stack: ``transformer_blocks``,
    ``layers``, ``blocks``), built from ``remat_wrap(cls, remat, prevent_cse=False)`` so the policy
    applies per layer inside the loop. ``in_axes``: one entry per ``arg`` (default all ``nn.broadcast``:
    shared inputs); ``0`` scans an arg's leading axis (a stacked KV cache). Returns ``(carry, ys)``.
    """
    def body(mdl, c, *xs):
        out = mdl(c, *xs)
        return out if isinstance(out, tuple) else (out, None)

    axes = tuple(in_axes) if in_axes is not None else (nn.broadcast,) * len(args)
    scan = nn.scan(body, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True}, in_axes=axes,
                   length=length)
    return scan(block, carry, *args)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt(2)))`` -- PyTorch's formula (XLA's ``erf`` is
    cheaper on CPU than the ``erfc`` form of ``nn.gelu(approximate=False)``)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), x.dtype)))


_ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": gelu,
    "relu": nn.relu,
}


def get_activation(name: str) -> Callable:
    """diffusers' ``get_activation``: ``silu``/``swish``, ``mish``, ``gelu`` (exact), ``relu``."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported (use one of {', '.join(_ACTIVATIONS)})") from None


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm(num_groups, C, eps, affine=True)`` over the last (channel) axis of ``(B, ..., C)``.

    Same parameters (``scale``, ``bias``) and numerics as ``flax.linen.GroupNorm(use_fast_variance=False)``:
    float32 statistics, two-pass variance ``mean((x - mean)^2)``. The sums are taken per channel over the
    spatial axes first (a reduction that keeps the contiguous channel axis), then per group over the
    ``C / G`` channel sums; Flax reduces over a ``(B, HW, G, C/G)`` view instead, which XLA's CPU backend runs
    2-3x slower forward and backward (``BENCHMARKS.md``, issue 24).
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        xf = jnp.asarray(x, jnp.promote_types(jnp.float32, x.dtype))
        axes = tuple(range(1, x.ndim - 1))
        n = math.prod(x.shape[a] for a in axes) * (c // g)
        per_group = (x.shape[0],) + (1,) * len(axes) + (g, c // g)

        def group_mean(v):  # (B, ..., C) -> (B, 1.., C): the mean of each channel's group, repeated per channel
            sums = jnp.sum(v, axis=axes).reshape(x.shape[0], g, c // g).sum(-1) / n
            return jnp.broadcast_to(sums.reshape(per_group[:-1] + (1,)), per_group).reshape(per_group[:-2] + (c,))

        d = xf - group_mean(xf)
        mul = jax.lax.rsqrt(group_mean(d * d) + self.epsilon) * jnp.asarray(scale, xf.dtype)
        return jnp.asarray(d * mul + jnp.asarray(bias, xf.dtype), dtype)


def group_norm(num_groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> GroupNorm:
    """``torch.nn.GroupNorm(num_groups, C, eps, affine=True)`` over the last (channel) axis."""
    return GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


# ----------------------------------------------------------------------------- Dense

#: ``False`` turns :func:`dense_dot_general`'s CPU form off (every Dense then runs ``lax.dot_general`` on its
#: input as it is, as ``flax.linen.Dense`` does); for A/B benchmarks (``bench/ab_unet_step.py --dense``) and tests
FLATTEN_ON_CPU = True


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for :class:`Dense` (``x @ kernel`` over the last axis of ``x``), in the form
    XLA:CPU differentiates without copies.

    For an input with several leading axes (batch, tokens, ...), JAX's transpose rule writes the weight
    gradient as a dot that contracts over all of them, with the cotangent's axes permuted; XLA:CPU then
    copies the cotangent into an ``(out, tokens)`` layout before every weight-gradient GEMM (strided
    copies that both threads of a small CPU wait on). On the CPU backend the leading axes are flattened
    into one first (a free reshape): the weight gradient becomes one ``(tokens, in)^T (tokens, out)``
    product that XLA runs on the operands as they lie. The products and their sums are the same. Other
    backends (where a flattened axis could also cross a sharded one), and anything but the plain
    ``x @ kernel`` contraction, get ``lax.dot_general`` unchanged.
    """
    plain = ((lhs.ndim - 1,), (0,))
    if (not FLATTEN_ON_CPU or jax.default_backend() != "cpu" or lhs.ndim <= 2 or rhs.ndim != 2
            or tuple(map(tuple, dimension_numbers[0])) != plain or any(map(len, dimension_numbers[1]))):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
    return y.reshape(lhs.shape[:-1] + (rhs.shape[-1],))


class Dense(nn.Dense):
    """``flax.linen.Dense`` (same params, init and numerics) whose product is :func:`dense_dot_general`.
    Still an ``nn.Dense``, so :func:`fairjax.lora.lora_interceptor` and the sharding rules see it."""

    dot_general: Callable | None = dense_dot_general


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """``torch.nn.LayerNorm(C, eps, elementwise_affine=True)``."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


#: ``False`` turns :func:`conv_general_dilated`'s CPU form off (every :class:`Conv` then runs
#: ``lax.conv_general_dilated``); for A/B benchmarks (``bench/ab_unet_step.py --conv``) and tests
WINOGRAD_ON_CPU = True

#: what a Winograd-eligible convolution computes when it is differentiated (a custom JVP decides):
#: ``"direct"``, XLA's direct convolution, forward and backward, exactly as without Winograd (the train
#: step's time and compile time are unchanged; only inference takes Winograd); ``"winograd-forward"``, the
#: Winograd forward with the direct convolution's derivatives; ``"winograd"``, differentiating through the
#: Winograd transforms. The 50M UNet's train step ran at the same speed with each and compiled 20-25%
#: slower with Winograd in it (BENCHMARKS.md), hence the default; the others are for A/B benchmarks
WINOGRAD_DIFFERENTIATED = "direct"
#: smaller convolutions (batch x height x width pixels, or input or output channels) take XLA's direct
#: convolution: there the 16 small products of Winograd's batched dot (pixels / 4 rows each) and its
#: transforms cost more than the FLOPs they save. ``bench/bench_conv.py``: with 64 rows (8x8, batch 4)
#: Winograd lost at every channel count, with 256 (16x16) it won and lost by turns, from 512 rows on it won
#: (32x32 at batch 2 or 4, 64 to 1280 channels; up to 1.8x at SDXL's sizes)
WINOGRAD_MIN_PIXELS = 2048
WINOGRAD_MIN_CHANNELS = 32
#: a convolution whose transformed input or output (4 times the input's or output's bytes) would be larger
#: takes XLA's direct convolution instead
WINOGRAD_MAX_BYTES = 1 << 28

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # flax's NHWC / HWIO / NHWC as lax dimension numbers
_NHWC_DIMS = jax.lax.ConvDimensionNumbers(*_NHWC)


def _transform(t0, t1, t2, t3):
    """``B^T`` of Winograd F(2, 3) applied to four input rows (or columns)."""
    return t0 - t2, t1 + t2, t2 - t1, t1 - t3


def winograd_conv3x3(x, kernel, precision=None):
    """A 3x3, stride 1, padding 1 convolution of ``x`` (N, H, W, C) with ``kernel`` (3, 3, C, K) by Winograd's
    F(2x2, 3x3) algorithm (Lavin and Gray, 2015): each 4x4 input tile and the kernel are transformed, the 16
    transformed positions become 16 ``(tiles, C) x (C, K)`` matrix products in one batched dot, and the
    products are transformed back into the tile's 2x2 outputs. That is 16 multiplies per 4 outputs where the
    direct convolution takes 36: 2.25x fewer FLOPs. The transforms only add, subtract and halve. The result
    equals the direct convolution's up to float rounding (about 1e-6 relative in float32; ``tests/test_conv.py``).
    Odd ``H`` or ``W`` get one extra row or column of zeros, cropped from the output."""
    n, h, w, c = x.shape
    k = kernel.shape[-1]
    th, tw = (h + 1) // 2, (w + 1) // 2  # tiles
    xp = jnp.pad(x, ((0, 0), (1, 2 * th - h + 1), (1, 2 * tw - w + 1), (0, 0)))  # (n, 2 th + 2, 2 tw + 2, c)
    rows = _transform(*(xp[:, a:a + 2 * th:2] for a in range(4)))  # each (n, th, 2 tw + 2, c)
    v = jnp.stack([col for r in rows for col in _transform(*(r[:, :, b:b + 2 * tw:2] for b in range(4)))])

    def g_t(r0, r1, r2):  # G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
        return r0, (r0 + r1 + r2) * 0.5, (r0 - r1 + r2) * 0.5, r2

    gr = [g_t(kernel[0, j], kernel[1, j], kernel[2, j]) for j in range(3)]
    u = jnp.stack([e for a in range(4) for e in g_t(gr[0][a], gr[1][a], gr[2][a])])  # (16, c, k)
    m = jax.lax.dot_general(v.reshape(16, n * th * tw, c), u.astype(v.dtype), (((2,), (1,)), ((0,), (0,))),
                            precision=precision).reshape(4, 4, n, th, tw, k)

    def a_t(m0, m1, m2, m3):  # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
        return m0 + m1 + m2, m1 - m2 - m3

    r = [a_t(m[0, b], m[1, b], m[2, b], m[3, b]) for b in range(4)]  # r[b][i]: output row i of the tile
    y = jnp.stack([jnp.stack(a_t(r[0][i], r[1][i], r[2][i], r[3][i]), -2) for i in range(2)], 2)
    y = y.reshape(n, 2 * th, 2 * tw, k)  # (n, th, 2, tw, 2, k) -> interleaved
    return y[:, :h, :w] if (2 * th, 2 * tw) != (h, w) else y


def _lax_conv3x3(x, kernel, precision=None):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC_DIMS,
                                        precision=precision)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _winograd_or_lax(x, kernel, precision, differentiated):
    """:func:`winograd_conv3x3`, differentiated as :data:`WINOGRAD_DIFFERENTIATED` says (``differentiated``):
    with ``"direct"`` or ``"winograd-forward"`` the tangent is the direct convolution's, which JAX
    transposes for the gradient with XLA's convolution transposes, keeping only ``x`` and ``kernel``."""
    return winograd_conv3x3(x, kernel, precision)


@_winograd_or_lax.defjvp
def _winograd_or_lax_jvp(precision, differentiated, primals, tangents):
    if differentiated == "winograd":
        return jax.jvp(lambda x, k: winograd_conv3x3(x, k, precision), primals, tangents)
    (x, kernel), (dx, dk) = primals, tangents
    y = (winograd_conv3x3 if differentiated == "winograd-forward" else _lax_conv3x3)(x, kernel, precision)
    return y, _lax_conv3x3(dx, kernel, precision) + _lax_conv3x3(x, dk, precision)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """``lax.conv_general_dilated`` for :class:`Conv`. On the CPU backend, where XLA's direct convolution is
    slower than PyTorch's oneDNN at the UNet's sizes (``bench/bench_conv.py``), for a float32 NHWC
    convolution with stride 1 and no dilation or groups: a 3x3 kernel with padding 1 (from
    :data:`WINOGRAD_MIN_PIXELS` and :data:`WINOGRAD_MIN_CHANNELS` up to :data:`WINOGRAD_MAX_BYTES`) runs as
    :func:`winograd_conv3x3` where it is not differentiated (:data:`WINOGRAD_DIFFERENTIATED`), and a 1x1
    kernel without padding as one ``(pixels, C_in) x (C_in, C_out)`` matrix product.
    Everything else, and every other backend (whose convolution libraries choose their own algorithms),
    gets ``lax.conv_general_dilated``."""
    dims = dimension_numbers
    nhwc = hasattr(dims, "lhs_spec") and (tuple(dims.lhs_spec), tuple(dims.rhs_spec), tuple(dims.out_spec)) == _NHWC
    ones = (None, (1, 1), [1, 1])
    pads = tuple(map(tuple, padding)) if not isinstance(padding, str) else padding
    if pads == "SAME" and rhs.ndim == 4 and rhs.shape[:2] in ((3, 3), (1, 1)):  # stride 1: SAME is (k - 1) // 2
        pads = ((rhs.shape[0] // 2,) * 2,) * 2
    if (WINOGRAD_ON_CPU and jax.default_backend() == "cpu" and nhwc and lhs.ndim == 4
            and tuple(window_strides) == (1, 1) and lhs_dilation in ones and rhs_dilation in ones
            and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
            and lhs.dtype == rhs.dtype == jnp.float32):
        pixels = lhs.size // lhs.shape[-1]
        transformed = 4 * pixels * max(lhs.shape[-1], rhs.shape[-1]) * 4  # bytes of the larger of V and M
        if (rhs.shape[:2] == (3, 3) and pads == ((1, 1), (1, 1)) and transformed <= WINOGRAD_MAX_BYTES
                and pixels >= WINOGRAD_MIN_PIXELS and min(rhs.shape[2:]) >= WINOGRAD_MIN_CHANNELS):
            return _winograd_or_lax(lhs, rhs, precision, WINOGRAD_DIFFERENTIATED)
        if rhs.shape[:2] == (1, 1) and pads in (((0, 0), (0, 0)), "VALID"):
            y = jax.lax.dot(lhs.reshape(-1, lhs.shape[-1]), rhs.reshape(rhs.shape[2:]), precision=precision)
            return y.reshape(lhs.shape[:-1] + (rhs.shape[-1],))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dims,
                                        feature_group_count=feature_group_count,
                                        batch_group_count=batch_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type)


class Conv(nn.Conv):
    """``flax.linen.Conv`` (same params, init and numerics up to float rounding) whose convolution is
    :func:`conv_general_dilated`."""

    conv_general_dilated: Callable | None = conv_general_dilated


def conv2d(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, *, stride: int = 1,
           padding: int | None = None, use_bias: bool = True) -> nn.Conv:
    """``torch.nn.Conv2d(..., kernel, stride, padding)``; padding defaults to ``(kernel - 1) // 2``."""
    p = (kernel - 1) // 2 if padding is None else padding
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


# ----------------------------------------------------------------------------- time embedding

def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: int = 10000) -> jax.Array:
    """diffusers' ``get_timestep_embedding`` (DDPM sinusoids), float32.

    ``freq_k = exp(-log(max_period) * k / (dim/2 - shift))`` for ``k < dim/2``;
    ``emb = [sin(scale * t * freq), cos(scale * t * freq)]`` (``[cos, sin]`` when
    ``flip_sin_to_cos``), zero-padded by one column when ``dim`` is odd.
    ``timesteps`` is 1-D, possibly fractional.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    emb = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_2(act(linear_1(x)))``, diffusers' ``TimestepEmbedding`` (no cond_proj)."""

    time_embed_dim: int
    act_fn: str = "silu"
    out_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = get_activation(self.act_fn)(x)
        return Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="linear_2")(x)


# ----------------------------------------------------------------------------- resnet / resampling

class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``), NHWC.

    ``h = conv1(act(norm1(x)))``; with ``temb``: ``h += time_emb_proj(act(temb))``
    (no ``act`` when ``skip_time_act``); ``h = conv2(dropout(act(norm2(h))))``;
    ``out = (shortcut(x) + h) / output_scale_factor`` where ``shortcut`` is the 1x1
    ``conv_shortcut`` when the channel count changes (or ``use_in_shortcut``).

    ``time_emb_proj`` exists only when the block is called with ``temb`` (the VAE
    calls it without, like diffusers' ``temb_channels=None``). diffusers'
    ``conv_shortcut=True`` flag has no effect in its ``ResnetBlock2D`` (the
    shortcut is always 1x1) so it is not carried here.
    """

    out_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    non_linearity: str = "swish"
    output_scale_factor: float = 1.0
    skip_time_act: bool = False
    use_in_shortcut: bool | None = None
    conv_shortcut_bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        act = get_activation(self.non_linearity)
        in_ch = x.shape[-1]
        out_ch = self.out_channels or in_ch
        h = act(group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm1")(x))
        h = conv2d(out_ch, 3, self.dtype, self.param_dtype, "conv1")(h)
        if temb is not None:
            t = temb if self.skip_time_act else act(temb)
            t = Dense(out_ch, dtype=self.dtype, param_dtype=self.param_dtype, name="time_emb_proj")(t)
            h = h + t[:, None, None, :]
        h = act(group_norm(self.groups_out or self.groups, self.eps, self.dtype, self.param_dtype, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        h = conv2d(out_ch, 3, self.dtype, self.param_dtype, "conv2")(h)
        shortcut = (in_ch != out_ch) if self.use_in_shortcut is None else self.use_in_shortcut
        if shortcut:
            x = conv2d(out_ch, 1, self.dtype, self.param_dtype, "conv_shortcut", use_bias=self.conv_shortcut_bias)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class _Resample2D(nn.Module):
    """The fields of diffusers' ``Downsample2D`` / ``Upsample2D`` and their ``conv``."""

    out_channels: int | None = None
    use_conv: bool = True
    padding: int = 1
    kernel_size: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, x, stride: int = 1):
        """``conv`` (``kernel_size``, ``padding``, ``stride``) to ``out_channels`` (default: ``x``'s width)."""
        return conv2d(self.out_channels or x.shape[-1], self.kernel_size, self.dtype, self.param_dtype, "conv",
                      stride=stride, padding=self.padding)(x)


class Downsample2D(_Resample2D):
    """diffusers' ``Downsample2D``: stride-2 3x3 ``conv`` (or 2x2 average pool), NHWC.

    With ``padding=0`` the input is first padded by one row/column at the bottom
    and right (``F.pad(x, (0, 1, 0, 1))``), as the VAE encoder does.
    """

    @nn.compact
    def __call__(self, x):
        if not self.use_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x, stride=2)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """``F.interpolate(x, size or 2x, mode="nearest")`` on NHWC.

    Output pixel ``i`` takes input pixel ``min(floor(i * in / out), in - 1)``
    (PyTorch's legacy ``nearest``); exact 2x is a plain repeat.
    """
    h, w = x.shape[1:3]
    oh, ow = size if size is not None else (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    ih = np.minimum(np.floor(np.arange(oh) * np.float32(h / oh)).astype(np.int64), h - 1)
    iw = np.minimum(np.floor(np.arange(ow) * np.float32(w / ow)).astype(np.int64), w - 1)
    return x[:, ih][:, :, iw]


class Upsample2D(_Resample2D):
    """diffusers' ``Upsample2D``: nearest upsample (2x, or to ``output_size``) then 3x3 ``conv``."""

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        x = upsample_nearest(x, output_size)
        return self.conv(x) if self.use_conv else x


# ----------------------------------------------------------------------------- attention

def attention(q, k, v, heads: int, *, implementation: str | None = None, upcast: bool = False):
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` on ``(B, T, heads*d)`` inputs.

    ``implementation``: one of :data:`fairjax.models.attention.IMPLEMENTATIONS` (None = ``auto``,
    chosen per backend and shape by :func:`fairjax.models.attention.resolve`). ``upcast`` computes
    in float32 (diffusers' ``upcast_attention``).
    """
    b, t, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    q = q.reshape(b, t, heads, d)
    k = k.reshape(b, k.shape[1], heads, d)
    v = v.reshape(b, v.shape[1], heads, d)
    out = dot_product_attention(q, k, v, implementation=implementation)
    return out.reshape(b, t, inner).astype(dtype)


class SpatialSelfAttention(nn.Module):
    """One head of width C over the H*W positions of NHWC ``x``, with a residual::

        h = group_norm(x);  out = x + out(softmax(q(h) k(h)^T / sqrt(C)) v(h))

    The diffusers VAE mid-block ``Attention`` (``_from_deprecated_attn_block``; Dense
    projections, the default ``names``) and the taming ``AttnBlock`` of VILA-U's decoder
    (``conv_projections``: 1x1 convs, names ``norm/q/k/v/proj_out``). ``names`` is
    (norm, q, k, v, out).
    """

    groups: int = 32
    eps: float = 1e-6
    names: tuple[str, str, str, str, str] = ("group_norm", "to_q", "to_k", "to_v", "to_out_0")
    conv_projections: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.conv_projections:
            proj = lambda name: conv2d(c, 1, name=name, **kw)  # noqa: E731
        else:
            proj = lambda name: Dense(c, name=name, **kw)  # noqa: E731
        norm, *qkv, out = self.names
        h = group_norm(self.groups, self.eps, name=norm, **kw)(x)
        q, k, v = (proj(n)(h).reshape(b, hgt * wid, 1, c) for n in qkv)
        o = dot_product_attention(q, k, v, implementation=self.implementation)
        return x + proj(out)(o.reshape(b, hgt, wid, c))


class Attention(nn.Module):
    """diffusers' ``Attention`` as used by transformer blocks: ``to_q/k/v``, ``to_out_0``.

    Self-attention when ``context`` is None, else cross-attention on ``context``.
    """

    heads: int
    dim_head: int
    out_dim: int | None = None
    bias: bool = False
    out_bias: bool = True
    upcast_attention: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias: Dense(n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                                            name=name)
        context = x if context is None else context
        q = dense(inner, "to_q", self.bias)(x)
        k = dense(inner, "to_k", self.bias)(context)
        v = dense(inner, "to_v", self.bias)(context)
        h = attention(q, k, v, self.heads, implementation=self.implementation, upcast=self.upcast_attention)
        return dense(self.out_dim or x.shape[-1], "to_out_0", self.out_bias)(h)


class GEGLU(nn.Module):
    """``a, g = split(proj(x)); a * gelu(g)`` (exact GELU)."""

    dim_out: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        a, g = jnp.split(h, 2, axis=-1)
        return a * gelu(g)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net_2(net_0(x))``, inner width ``mult * dim``."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` (``norm_type="layer_norm"``, GEGLU), pre-norm residuals.

    ``x += attn1(norm1(x))`` (self-attention, or cross-attention to ``context``
    when ``only_cross_attention``); ``x += attn2(norm2(x), context)``;
    ``x += ff(norm3(x))``.
    """

    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.heads, self.dim_head, upcast_attention=self.upcast_attention,
                                      implementation=self.implementation, name=name, **kw)
        h = layer_norm(self.norm_eps, name="norm1", **kw)(x)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        h = layer_norm(self.norm_eps, name="norm2", **kw)(x)
        x = x + attn("attn2")(h, context)
        h = layer_norm(self.norm_eps, name="norm3", **kw)(x)
        return x + FeedForward(name="ff", **kw)(h)


class Transformer2DModel(nn.Module):
    """diffusers' ``Transformer2DModel`` on continuous (image) input, NHWC.

    ``h = proj_in(norm(x))`` (1x1 conv, or a Dense on the flattened tokens when
    ``use_linear_projection``), ``num_layers`` :class:`BasicTransformerBlock` over the
    ``H*W`` tokens (row-major, as diffusers flattens), ``out = proj_out(h) + x``.
    ``remat`` (a bool or one of :data:`REMAT_POLICIES`) checkpoints each block. ``scan_layers`` runs the
    blocks with ``nn.scan`` (:func:`scan_stack`): one child ``transformer_blocks`` whose params have a
    leading layer axis, instead of ``transformer_blocks_0 .. _{num_layers-1}``.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    implementation: str | None = None
    remat: bool | str = False
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = group_norm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = Dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
        else:
            h = conv2d(inner, 1, name="proj_in", **kw)(h).reshape(b, hgt * wid, inner)
        block_kw = dict(only_cross_attention=self.only_cross_attention, upcast_attention=self.upcast_attention,
                        implementation=self.implementation, **kw)
        if self.scan_layers:
            block = remat_wrap(BasicTransformerBlock, self.remat, prevent_cse=False)(
                self.heads, self.dim_head, name="transformer_blocks", **block_kw)
            h, _ = scan_stack(block, self.num_layers, h, context)
        else:
            block_cls = remat_wrap(BasicTransformerBlock, self.remat)
            for i in range(self.num_layers):
                h = block_cls(self.heads, self.dim_head, name=f"transformer_blocks_{i}", **block_kw)(h, context)
        if self.use_linear_projection:
            h = Dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wid, c)
        else:
            h = conv2d(c, 1, name="proj_out", **kw)(h.reshape(b, hgt, wid, inner))
        return h + residual
