"""mDPO's corrupted image: torchvision's ``RandomResizedCrop`` in JAX, a pure function of its keys."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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
