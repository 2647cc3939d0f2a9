"""The SigLIP vision encoder (transformers ``SiglipVisionModel``) in Flax, optionally truncated.

A port of transformers 5.x ``models/siglip/modeling_siglip.py`` (vision side:
``SiglipVisionEmbeddings``, ``SiglipEncoderLayer``, ``post_layernorm``; the
attention-pooling ``head`` is not ported). Submodules carry the transformers
attribute names, so checkpoint keys map by the shared rules of
:mod:`fairjax.convert.core`::

    embeddings.patch_embedding.weight           -> embeddings/patch_embedding/kernel (OIHW -> HWIO)
    embeddings.position_embedding.weight        -> embeddings/position_embedding/embedding
    encoder.layers.3.self_attn.q_proj.weight    -> encoder/layers_3/self_attn/q_proj/kernel

Forward (pixels NCHW, normalised to [-1, 1] by SigLIP's processor)::

    x = patch_embedding(pixels) (stride = kernel = patch) flattened row-major to (B, N, H)
        + position_embedding[0..N)
    x = x + self_attn(layer_norm1(x));  x = x + fc2(act(fc1(layer_norm2(x))))   (per layer)
    out = post_layernorm(x)                                                    (when enabled)

The encoder layers are :class:`fairjax.models.transformer.EncoderLayer` (non-causal),
the block SigLIP shares with CLIP's text encoder.

``num_layers`` runs only the first layers: VILA-U's vision tower takes the
hidden state after layer index ``num_hidden_layers - 2`` (22 of 24 for
SigLIP-large) and no ``post_layernorm``; see :func:`vila_u_encoder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairjax.errors import CheckpointError
from fairjax.models.layers import Conv, layer_norm
from fairjax.models.transformer import ACTIVATIONS, Encoder

Dtype = Any

@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """transformers ``SiglipVisionConfig`` fields (defaults = its ``__init__`` defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side (SigLIP-large-patch16-256: 16)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "SiglipVisionConfig":
        """Parse a ``SiglipVisionConfig`` dict, or a ``SiglipConfig`` dict with a ``vision_config`` entry."""
        if isinstance(cfg.get("vision_config"), Mapping):
            cfg = cfg["vision_config"]
        fields = {f.name for f in dataclasses.fields(cls)}
        c = cls(**{k: cfg[k] for k in fields if cfg.get(k) is not None})
        if c.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"siglip vision config: hidden_act {c.hidden_act!r} is not supported "
                                  f"(use one of {', '.join(ACTIVATIONS)})")
        if c.hidden_size % c.num_attention_heads:
            raise CheckpointError(f"siglip vision config: hidden_size {c.hidden_size} is not divisible by "
                                  f"num_attention_heads {c.num_attention_heads}")
        if c.image_size % c.patch_size:
            raise CheckpointError(f"siglip vision config: image_size {c.image_size} is not a multiple of "
                                  f"patch_size {c.patch_size}")
        return c


class SiglipVisionEmbeddings(nn.Module):
    """``patch_embedding`` (Conv2d, kernel = stride = patch, no padding) + learned ``position_embedding``."""

    config: SiglipVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: (B, H, W, C) NHWC pixels -> (B, N, hidden), patches in row-major order."""
        c = self.config
        if x.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"siglip: images are {x.shape[1]}x{x.shape[2]} but the model takes "
                             f"{c.image_size}x{c.image_size}; resize them first")
        p = c.patch_size
        h = Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                 param_dtype=self.param_dtype, name="patch_embedding")(x)
        b, gh, gw, d = h.shape
        pos = nn.Embed(gh * gw, d, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(gh * gw))
        return h.reshape(b, gh * gw, d) + pos[None]


class SiglipVisionTransformer(nn.Module):
    """transformers ``SiglipVisionModel`` without the pooling head, optionally truncated.

    ``__call__(pixel_values (B, C, H, W), output_hidden_states=False)`` returns the
    last hidden state (B, N, hidden) -- after ``post_layernorm`` when
    ``post_layernorm`` is True -- and with ``output_hidden_states`` also the tuple
    ``(embeddings, after layer 0, ..., after layer num_layers-1)``, which is
    transformers' ``hidden_states`` output cut to ``num_layers + 1`` entries.
    ``num_layers=None`` runs all ``num_hidden_layers``.
    """

    config: SiglipVisionConfig
    num_layers: int | None = None
    post_layernorm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool | str = False

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False):
        c = self.config
        n = c.num_hidden_layers if self.num_layers is None else self.num_layers
        if not 0 <= n <= c.num_hidden_layers:
            raise ValueError(f"siglip: num_layers {n} outside 0..{c.num_hidden_layers}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = SiglipVisionEmbeddings(c, name="embeddings", **kw)(jnp.transpose(pixel_values, (0, 2, 3, 1)))
        x, states = Encoder(c, n, attention_impl=self.attention_impl, remat=self.remat, name="encoder", **kw)(x)
        if self.post_layernorm:
            x = layer_norm(c.layer_norm_eps, name="post_layernorm", **kw)(x)
        return (x, states) if output_hidden_states else x


def vila_u_encoder(config: SiglipVisionConfig, **kw) -> SiglipVisionTransformer:
    """The part of SigLIP that VILA-U's ``RQVAESiglipModel.encode_image`` runs: layers
    ``0 .. num_hidden_layers - 2`` (it stops inside the loop at ``i == len(layers) - 2``), no post-layernorm."""
    return SiglipVisionTransformer(config, num_layers=config.num_hidden_layers - 1, post_layernorm=False, **kw)


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """(B, H, W, 3) uint8 at the model's size -> (B, 3, H, W) float32 in [-1, 1].

    SigLIP's / VILA-U's ``CLIPImageProcessor`` with ``rescale 1/255``, ``mean = std = 0.5``:
    ``(x / 255 - 0.5) / 0.5``. (Resizing to ``image_size`` is left to the caller.)
    """
    x = jnp.asarray(images_uint8, jnp.float32) / 255.0
    return jnp.transpose((x - 0.5) / 0.5, (0, 3, 1, 2))


def param_shapes(model: SiglipVisionTransformer) -> dict:
    """``{flax path: shape}`` without allocating."""
    from fairjax.io.tree import shapes_of
    from fairjax.models.layers import abstract_init

    c = model.config
    x = jax.ShapeDtypeStruct((1, c.num_channels, c.image_size, c.image_size), jnp.float32)
    return shapes_of(abstract_init(model, x))  # no initialiser traced
