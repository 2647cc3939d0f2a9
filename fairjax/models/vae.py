"""The SDXL VAE (diffusers ``AutoencoderKL``) in Flax.

A port of diffusers 0.42 ``models/autoencoders/autoencoder_kl.py`` with the
``Encoder`` / ``Decoder`` of ``autoencoders/vae.py`` and the
``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` / ``UNetMidBlock2D`` blocks of
``unets/unet_2d_blocks.py``. Submodules carry the diffusers attribute names,
so checkpoint keys map by the shared rules of :mod:`fairjax.convert.core`::

    encoder.mid_block.attentions.0.to_out.0.weight -> encoder/mid_block/attentions_0/to_out_0/kernel
    decoder.up_blocks.1.upsamplers.0.conv.weight   -> decoder/up_blocks_1/upsamplers_0/conv/kernel

The API is NCHW like diffusers (``encode(x) -> (mean, logvar)``,
``decode(z) -> image``, images in [-1, 1]); everything inside is NHWC.

Latent scaling for the diffusion model is read from the config, never
defaulted (SDXL: ``scaling_factor`` 0.13025; the old Flax default 0.18215 is
SD1.x's): see :func:`scale_latents` / :func:`unscale_latents`.

Precision: the SDXL VAE overflows in float16 (activations in the decoder's
last blocks exceed the fp16 range; diffusers sets ``force_upcast`` and
upcasts it). The compute ``dtype`` therefore defaults to float32 here; pass
bfloat16 only knowingly (or use an fp16-fixed VAE).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairjax.errors import CheckpointError
from fairjax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    conv2d,
    get_activation,
    group_norm,
)

Dtype = Any
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution clamps logvar to this range


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers ``AutoencoderKL`` config fields (defaults = diffusers' ``__init__`` defaults,
    except ``scaling_factor``, which must be in the config)."""

    scaling_factor: float
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """Parse a diffusers ``vae/config.json`` dict; reject values this port does not implement."""
        name = cfg.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise CheckpointError(f"vae config: _class_name {name!r} is not supported; expected 'AutoencoderKL'")
        if cfg.get("scaling_factor") is None:
            raise CheckpointError("vae config: scaling_factor is missing; copy it from the model's vae/config.json "
                                  "(SDXL: 0.13025) rather than relying on a default")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k in fields:
            if k in cfg and (cfg[k] is not None or k in ("shift_factor", "latents_mean", "latents_std")):
                v = cfg[k]
                kw[k] = tuple(v) if isinstance(v, list) else v
        c = cls(**kw)
        c._validate()
        return c

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        for key, types, want in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            bad = [t for t in types if t != want]
            if bad:
                raise CheckpointError(f"vae config: {key} contains {bad[0]!r}; only {want!r} is supported")
            if len(types) != n:
                raise CheckpointError(f"vae config: {key} has {len(types)} entries but block_out_channels has {n}")
        try:
            get_activation(self.act_fn)
        except ValueError as e:
            raise CheckpointError(f"vae config: act_fn: {e}") from None
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise CheckpointError(f"vae config: block_out_channels {bad[0]} is not divisible by "
                                  f"norm_num_groups {self.norm_num_groups}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise CheckpointError("vae config: latents_mean and latents_std must be given together")


# ----------------------------------------------------------------------------- latents

def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """Draw ``z = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (``DiagonalGaussianDistribution.sample``)."""
    eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def _channel_stats(values, z):
    return jnp.asarray(values, z.dtype).reshape(1, -1, 1, 1)


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents (NCHW) -> the diffusion model's latent space.

    ``(z - latents_mean) * scaling_factor / latents_std`` when the config has
    per-channel statistics, else ``(z - shift_factor) * scaling_factor``
    (shift 0 when absent; SDXL: ``z * 0.13025``).
    """
    if config.latents_mean is not None:
        return (z - _channel_stats(config.latents_mean, z)) * config.scaling_factor / _channel_stats(
            config.latents_std, z)
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Inverse of :func:`scale_latents` (what diffusers pipelines do before ``vae.decode``)."""
    if config.latents_mean is not None:
        return z * _channel_stats(config.latents_std, z) / config.scaling_factor + _channel_stats(
            config.latents_mean, z)
    return z / config.scaling_factor + (config.shift_factor or 0.0)


# ----------------------------------------------------------------------------- blocks (NHWC)
# ResnetBlock2D (called without temb), Downsample2D (padding=0), Upsample2D and the
# mid-block attention (SpatialSelfAttention: one head, Dense to_q/to_k/to_v/to_out_0;
# old checkpoints' query/key/value/proj_attn are renamed by fairjax.convert.vae) are the
# shared diffusers blocks of fairjax.models.layers; the VAE-only pieces follow.

class UNetMidBlock2D(nn.Module):
    """``resnets_0 -> [attentions_0] -> resnets_1`` at constant width (no time embedding)."""

    groups: int
    non_linearity: str
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, eps=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, non_linearity=self.non_linearity, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(implementation=self.attention_implementation, name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, non_linearity=self.non_linearity, name="resnets_1", **kw)(x)


class ResampleBlock2D(nn.Module):
    """diffusers' ``DownEncoderBlock2D`` (``resample="down"``) and ``UpDecoderBlock2D`` (``"up"``):
    ``resnets_0 .. resnets_{num_layers-1}`` at ``out_channels`` (no time embedding), then the
    stride-2 ``downsamplers_0`` (padded bottom/right) or the nearest-2x ``upsamplers_0``
    (``resample=None``: neither, the last block of each side)."""

    out_channels: int
    num_layers: int
    resample: str | None
    groups: int
    non_linearity: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=1e-6, non_linearity=self.non_linearity,
                              name=f"resnets_{i}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class _Coder(nn.Module):
    """Fields and pieces shared by :class:`Encoder` and :class:`Decoder`."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    def mid_block(self, x):
        c = self.config
        return UNetMidBlock2D(c.norm_num_groups, c.act_fn, c.mid_block_add_attention,
                              attention_implementation=self.attention_implementation, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="mid_block")(x)

    def blocks(self, x, prefix: str, num_layers: int, resample: str, chans):
        """``{prefix}_0 ..``: one :class:`ResampleBlock2D` per width, all but the last resampling."""
        c = self.config
        for i, ch in enumerate(chans):
            x = ResampleBlock2D(ch, num_layers, resample if i < len(chans) - 1 else None, c.norm_num_groups,
                                c.act_fn, dtype=self.dtype, param_dtype=self.param_dtype, name=f"{prefix}_{i}")(x)
        return x

    def conv_in(self, x, features: int):
        return conv2d(features, 3, self.dtype, self.param_dtype, "conv_in")(x)

    def conv_out(self, x, features: int):
        """``conv_out(act(conv_norm_out(x)))``."""
        c = self.config
        x = group_norm(c.norm_num_groups, 1e-6, self.dtype, self.param_dtype, "conv_norm_out")(x)
        return conv2d(features, 3, self.dtype, self.param_dtype, "conv_out")(get_activation(c.act_fn)(x))


class Encoder(_Coder):
    """``conv_in -> down_blocks -> mid_block -> conv_norm_out -> act -> conv_out`` (2 * latent channels)."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = self.conv_in(x, c.block_out_channels[0])
        x = self.blocks(x, "down_blocks", c.layers_per_block, "down", c.block_out_channels)
        return self.conv_out(self.mid_block(x), 2 * c.latent_channels)


class Decoder(_Coder):
    """``conv_in -> mid_block -> up_blocks (layers_per_block + 1 resnets each) -> norm -> act -> conv_out``."""

    @nn.compact
    def __call__(self, z):
        c = self.config
        chans = tuple(reversed(c.block_out_channels))
        x = self.mid_block(self.conv_in(z, chans[0]))
        x = self.blocks(x, "up_blocks", c.layers_per_block + 1, "up", chans)
        return self.conv_out(x, c.out_channels)


def _nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``. Methods (NCHW in and out)::

        mean, logvar = model.apply(v, x, method=model.encode)   # x: (B, C, H, W) in [-1, 1]
        image = model.apply(v, z, method=model.decode)          # z: raw (unscaled) latents
        image = model.apply(v, x)                               # decode(mean), or a sample with key=

    ``logvar`` is clamped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution``
    does. Compute ``dtype`` defaults to float32 (the SDXL VAE is fp16-unstable).
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(c, attention_implementation=self.attention_implementation, **kw)
        self.decoder = Decoder(c, attention_implementation=self.attention_implementation, **kw)
        if c.use_quant_conv:
            self.quant_conv = conv2d(2 * c.latent_channels, 1, name=None, **kw)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv2d(c.latent_channels, 1, name=None, **kw)

    def encode(self, x):
        """Images (B, C, H, W) -> ``(mean, logvar)``, each (B, latent_channels, H/f, W/f)."""
        h = self.encoder(_nhwc(x))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(_nchw(h), 2, axis=1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z):
        """Raw latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
        z = _nhwc(z)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return _nchw(self.decoder(z))

    def __call__(self, x, key: jax.Array | None = None):
        """Reconstruct: decode the posterior mean, or a posterior sample when ``key`` is given."""
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_latent(mean, logvar, key)
        return self.decode(z)


# ----------------------------------------------------------------------------- build / load

def from_config(cfg: Mapping[str, Any], *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                attention_implementation: str | None = None) -> AutoencoderKL:
    """Module for a diffusers ``vae/config.json`` dict (``VAEConfig.from_dict`` validates it)."""
    return AutoencoderKL(VAEConfig.from_dict(cfg), dtype=dtype, param_dtype=param_dtype,
                         attention_implementation=attention_implementation)


def param_shapes(model: AutoencoderKL) -> dict:
    """``{flax path: shape}`` of the model's params, without allocating them."""
    from fairjax.io.tree import shapes_of
    from fairjax.models.layers import abstract_init

    f = 2 ** (len(model.config.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, model.config.in_channels, 2 * f, 2 * f), jnp.float32)
    return shapes_of(abstract_init(model, x))  # no initialiser traced


def downsample_factor(config: VAEConfig) -> int:
    """Pixels per latent along each side (SDXL: 8)."""
    return 2 ** (len(config.block_out_channels) - 1)


def load(model_dir: str, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None, *,
         component: str = "vae", attention_implementation: str | None = None):
    """Load ``(vae, params)`` from a fairjax model dir (or its ``vae/`` folder).

    Compute ``dtype`` defaults to float32 (the SDXL VAE is fp16-unstable). Params
    are returned as stored, cast to ``param_dtype`` when given; every key and
    shape is checked against the config first.
    """
    from fairjax.io.model_dir import CONFIG_FILE, PARAMS_FILE, component_dir, load_params, read_json

    folder = component_dir(model_dir, component)
    model = from_config(read_json(os.path.join(folder, CONFIG_FILE)), dtype=dtype,
                        param_dtype=param_dtype or jnp.float32, attention_implementation=attention_implementation)
    params = load_params(os.path.join(folder, PARAMS_FILE), param_shapes(model), dtype=param_dtype)
    return model, params


__all__: Sequence[str] = ("AutoencoderKL", "VAEConfig", "from_config", "load", "param_shapes", "sample_latent",
                          "scale_latents", "unscale_latents", "downsample_factor")
