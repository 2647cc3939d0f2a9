"""Multi-head attention for every fairjax model, with the implementation chosen per backend and shape.

``dot_product_attention(q, k, v, implementation=...)`` on ``(B, T, N, H)`` arrays computes
``softmax(q k^T * scale + mask) v`` (``scale = H^-1/2``) by one of:

* ``xla``: ``jax.nn.dot_product_attention(implementation='xla')`` (full score matrix);
* ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16/fp16, head
  width a multiple of 8 and at most 128, or 256 from Hopper on; no score matrix in memory);
* ``pallas``: the Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu``), for
  sequence lengths that are multiples of its 128-wide blocks;
* ``einsum``: the two products written out with a float32 softmax (no grouped-query vmap);
* ``batched``: the heads folded into the batch, ``(B*N, T, H) @ (B*N, H, S)`` matmuls and a float32
  softmax. On CPU, XLA runs these faster than the 4-D products of ``xla``: 20-45% less time per call,
  forward and backward, at the 50M UNet's shapes (``BENCHMARKS.md``);
* ``chunked``: ``xla`` on blocks of queries, one block at a time, each block rematerialised in the
  backward pass: exact, and its memory is one ``block x S`` score slab instead of ``T x S`` (the
  VAE mid-block at 1024 px has T = S = 16384 positions: a 1 GiB fp32 score matrix per image);
* ``auto`` (the default everywhere): ``cudnn`` on GPUs and ``pallas`` on TPUs where their rules
  allow, else ``chunked`` when a score matrix would pass :data:`CHUNK_SCORES` entries, else ``batched``
  on CPU and ``xla`` elsewhere.
  What it picks is printed once per distinct choice (``fairjax: attention auto -> ...``).
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fairjax.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "einsum", "chunked", "batched")
#: ``auto`` chunks the queries when ``T * S`` (per batch row and head) passes this: 2^24 entries =
#: 64 MiB of float32 scores per (row, head)
CHUNK_SCORES = 1 << 24
PALLAS_BLOCK = 128
_announced: set[tuple[str, str]] = set()


def check(implementation) -> str:
    """The implementation's canonical name (None and "" mean ``auto``); anything else is a one-line error."""
    name = "auto" if implementation in (None, "") else str(implementation)
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return name


def _cudnn_head_limit() -> int:
    """Largest head width cuDNN's flash attention takes on this GPU: 256 from Hopper (sm 9.0) on, else 128."""
    try:
        cc = jax.devices()[0].compute_capability
        return 256 if tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0) else 128
    except Exception:  # noqa: BLE001 - not a CUDA device, or no compute capability reported
        return 128


def resolve(implementation, *, q_shape, k_shape, dtype, masked: bool = False, backend: str | None = None,
            cudnn_head_limit: int | None = None) -> tuple[str, str]:
    """``(implementation, reason)`` for one call site: ``implementation`` itself unless it is ``auto``.

    ``auto`` picks, for ``q (B, T, N, H)`` and ``k (B, S, K, H)``: on GPU ``cudnn`` when the dtype is
    bfloat16/float16, ``H % 8 == 0``, ``H <= cudnn_head_limit`` and there is no arbitrary mask (a
    causal flag is fine); on TPU ``pallas`` when ``T`` and ``S`` are multiples of 128, there is no
    arbitrary mask and the heads are not grouped; otherwise ``chunked`` when ``T * S >
    CHUNK_SCORES``, else ``batched`` on CPU and ``xla`` on other backends.
    """
    name = check(implementation)
    if name != "auto":
        return name, "asked for"
    backend = backend or jax.default_backend()
    _, t, n, h = q_shape
    s, kv_heads = k_shape[1], k_shape[2]
    dtype = np.dtype(dtype)
    if backend in ("gpu", "cuda"):
        limit = cudnn_head_limit or _cudnn_head_limit()
        if masked:
            why = "a padding mask (cuDNN takes causal or no mask here)"
        elif dtype not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
            why = f"{dtype} (cuDNN flash attention is bf16/fp16)"
        elif h % 8 or h > limit:
            why = f"head width {h} (cuDNN: a multiple of 8, at most {limit})"
        else:
            return "cudnn", f"GPU, {dtype}, head width {h}"
    elif backend == "tpu":
        if masked:
            why = "a padding mask"
        elif t % PALLAS_BLOCK or s % PALLAS_BLOCK:
            why = f"sequence lengths {t}, {s} (the Pallas kernel's blocks are {PALLAS_BLOCK})"
        elif kv_heads != n:
            why = "grouped key/value heads"
        else:
            return "pallas", f"TPU, sequence lengths {t}, {s}"
    else:
        why = f"{backend} backend"
    if t * s > CHUNK_SCORES:
        return "chunked", f"{why}; {t} x {s} scores per head exceed {CHUNK_SCORES}"
    if backend == "cpu":
        return "batched", why
    return "xla", why


def _announce(name: str, why: str) -> None:
    key = (name, why)
    if key not in _announced:
        _announced.add(key)
        print(f"fairjax: attention auto -> {name} ({why})", file=sys.stderr, flush=True)


def _heads_and_mask(q, k, v, mask, is_causal):
    """``(k, v, mask)`` for the written-out implementations: key/value heads repeated to the query heads
    (grouped-query attention), the causal mask (top-left aligned, as ``jax.nn.dot_product_attention``)
    folded into ``mask``."""
    n, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != n:
        k = jnp.repeat(k, n // kv_heads, axis=2)
        v = jnp.repeat(v, n // kv_heads, axis=2)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        mask = causal[None, None] if mask is None else jnp.logical_and(mask, causal)
    return k, v, mask


def _einsum(q, k, v, mask, is_causal, scale):
    k, v, mask = _heads_and_mask(q, k, v, mask, is_causal)
    logits = jnp.einsum("bthd,bshd->bhts", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _batched(q, k, v, mask, is_causal, scale):
    """The heads folded into the batch: ``(B*N, T, H) @ (B*N, H, S)``, float32 softmax, ``@ (B*N, S, H)``."""
    k, v, mask = _heads_and_mask(q, k, v, mask, is_causal)
    b, t, n, _ = q.shape
    s = k.shape[1]

    def fold(x):  # (B, L, N, H) -> (B*N, L, H)
        return x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], x.shape[3])

    logits = jnp.matmul(fold(q * jnp.asarray(scale, q.dtype)), fold(k).transpose(0, 2, 1),
                        preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(jnp.broadcast_to(mask, (b, n, t, s)).reshape(b * n, t, s), logits,
                           jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.matmul(probs, fold(v)).reshape(b, n, t, v.shape[3]).transpose(0, 2, 1, 3)


def _chunked(q, k, v, mask, is_causal, scale):
    """Exact attention on blocks of queries (``lax.map``), each block rematerialised for the backward."""
    b, t, n, h = q.shape
    s = k.shape[1]
    block = max(1, min(t, CHUNK_SCORES // max(s, 1)))
    block = 1 << (block.bit_length() - 1)  # a power of two
    pad = -t % block
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
    nb = qp.shape[1] // block
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, s))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True) if pad else mask
    qb = qp.reshape(b, nb, block, n, h).swapaxes(0, 1)  # (nb, B, block, N, H)
    mb = None if mask is None else mask.reshape(b, mask.shape[1], nb, block, s).transpose(2, 0, 1, 3, 4)

    @jax.checkpoint
    def one(args):
        i, qi, mi = args
        m = mi
        if is_causal:  # query rows i*block .. of the causal mask
            rows = i * block + jnp.arange(block)[:, None]  # top-left aligned, as jax.nn.dot_product_attention
            causal = (jnp.arange(s)[None, :] <= rows)[None, None]
            m = causal if m is None else jnp.logical_and(m, causal)
        return jax.nn.dot_product_attention(qi, k, v, mask=m, scale=scale, implementation="xla")

    out = jax.lax.map(one, (jnp.arange(nb), qb, mb))  # (nb, B, block, N, H)
    out = out.swapaxes(0, 1).reshape(b, nb * block, n, h)
    return out[:, :t] if pad else out


def _pallas(q, k, v, is_causal, scale):
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    tr = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # (B, T, N, H) <-> (B, N, T, H)
    return tr(flash_attention(tr(q), tr(k), tr(v), causal=is_causal, sm_scale=scale))


def dot_product_attention(q, k, v, *, implementation="auto", mask=None, is_causal: bool = False, scale=None):
    """``softmax(q k^T * scale [+ mask]) v`` on ``(B, T, N, H)`` queries and ``(B, S, K, H)`` keys and
    values (``N`` a multiple of ``K``); ``mask`` is a boolean ``(B|1, N|1, T, S)`` array (True = keep)."""
    scale = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    name = check(implementation)
    if name == "auto":
        name, why = resolve(name, q_shape=q.shape, k_shape=k.shape, dtype=q.dtype, masked=mask is not None)
        _announce(name, why)
    if name in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                                            implementation=name)
    if name == "einsum":
        return _einsum(q, k, v, mask, is_causal, scale)
    if name == "batched":
        return _batched(q, k, v, mask, is_causal, scale)
    if name == "chunked":
        return _chunked(q, k, v, mask, is_causal, scale)
    if mask is not None:
        raise ConfigError("attention implementation 'pallas' takes no padding mask; use 'xla' or 'auto'")
    return _pallas(q, k, v, is_causal, scale)
