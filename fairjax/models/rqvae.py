"""VILA-U's image tokenizer (``RQVAESiglipModel``) in Flax: SigLIP features -> residual codes
-> image.

A port of the public vila-u code,
``vila_u/model/multimodal_encoder/rqvaesigliptransformer/rqvaesiglip/``:
``modeling_rqvaesiglip.py`` (``encode_image``, ``decode``), ``quantizations.py``
(``RQBottleneck`` in eval mode) and ``modules.py`` (the taming-transformers
``Decoder``). Submodules carry the vila-u attribute names (minus ``siglip_model.``,
see :mod:`fairjax.convert.vila_u`)::

    rqvaesiglip.siglip_model.vision_model.encoder.layers.3.mlp.fc1.weight -> vision_model/encoder/layers_3/mlp/fc1/...
    rqvaesiglip.quantizer.codebooks.0.weight                              -> quantizer/codebooks_0/embedding
    rqvaesiglip.decoder.up.4.block.0.nin_shortcut.weight                  -> decoder/up_4/block_0/conv_shortcut/kernel
    rqvaesiglip.decoder.mid.attn_1.q.weight                               -> decoder/mid/attn_1/q/kernel

(the resnet blocks are :class:`fairjax.models.layers.ResnetBlock2D`, whose 1x1
shortcut is called ``conv_shortcut``; the converter renames taming's ``nin_shortcut``).
The quantizer params are exactly :class:`fairjax.models.vila_u.RQCodebook`'s, so
``params['quantizer']`` is the generation head's ``params['codebook']``.

Encode (``encode_image``): SigLIP layers ``0 .. L-2`` (no post-layernorm) give
features ``x`` on the ``h x w`` patch grid; residual quantization with depth D::

    r_0 = x;  c_d = argmin_k ||r_d - e_k||^2 (over the n_embed real rows);  r_{d+1} = r_d - e_{c_d}
    z_q = sum_d e_{c_d}

Decode: ``z_q`` (B, h, w, C) -> [bilinear resize to ``decoder_latent_shape``] ->
``post_quant_conv`` (1x1) -> taming decoder -> image in about [-1, 1];
:func:`to_pixels` maps it to ``(x + 1) * 127.5`` clipped to [0, 255].

Deliberate differences from vila-u: its ``Upsample`` casts to bfloat16 after the
nearest interpolation (the released model runs in bf16; the cast breaks a float32
run), here the compute ``dtype`` decides; distances are computed in float32 whatever
the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairjax.errors import CheckpointError
from fairjax.models import siglip as siglip_lib
from fairjax.models.layers import ResnetBlock2D, SpatialSelfAttention, Upsample2D, conv2d, group_norm
from fairjax.models.vila_u import CodebookConfig, RQCodebook

Dtype = Any
GROUPS, EPS = 32, 1e-6  # taming ``Normalize``: GroupNorm(32, C, eps=1e-6)


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The taming ``Decoder`` arguments (vila-u ``ddconfig``)."""

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    dropout: float = 0.0
    resamp_with_conv: bool = True
    give_pre_end: bool = False

    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def upsample_factor(self) -> int:
        return 2 ** (self.num_resolutions - 1)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "DecoderConfig":
        need = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")
        missing = [k for k in need if cfg.get(k) is None]
        if missing:
            raise CheckpointError(f"rqvaesiglip ddconfig: missing {', '.join(missing)} (expected the 'ddconfig' "
                                  f"dict of vision_tower/config.json)")
        c = cls(ch=int(cfg["ch"]), out_ch=int(cfg["out_ch"]), ch_mult=tuple(int(m) for m in cfg["ch_mult"]),
                num_res_blocks=int(cfg["num_res_blocks"]),
                attn_resolutions=tuple(int(r) for r in cfg["attn_resolutions"]), resolution=int(cfg["resolution"]),
                z_channels=int(cfg["z_channels"]), dropout=float(cfg.get("dropout") or 0.0),
                resamp_with_conv=bool(cfg.get("resamp_with_conv", True)),
                give_pre_end=bool(cfg.get("give_pre_end", False)))
        bad = [c.ch * m for m in c.ch_mult if (c.ch * m) % GROUPS]
        if bad:
            raise CheckpointError(f"rqvaesiglip ddconfig: channel count {bad[0]} (ch * ch_mult) is not divisible "
                                  f"by the decoder's {GROUPS} norm groups")
        return c


@dataclasses.dataclass(frozen=True)
class RQVAESiglipConfig:
    """vila-u ``RQVAESiglipConfig`` (the ``rqvaesiglip`` dict) + the SigLIP vision config it loads by name."""

    siglip: siglip_lib.SiglipVisionConfig
    codebook: CodebookConfig
    latent_shape: tuple[int, int, int]
    code_shape: tuple[int, int, int]
    embed_dim: int
    decoder: DecoderConfig
    decoder_latent_shape: tuple[int, int] | None = None

    @property
    def shape_divisor(self) -> tuple[int, int]:
        return self.latent_shape[0] // self.code_shape[0], self.latent_shape[1] // self.code_shape[1]

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], siglip_vision_config: Mapping[str, Any]) -> "RQVAESiglipConfig":
        """``cfg``: the ``rqvaesiglip`` dict of ``vision_tower/config.json``; ``siglip_vision_config``: the
        ``SiglipVisionConfig`` dict of ``cfg['pretrained_model']`` (see :mod:`fairjax.convert.vila_u`)."""
        sg = siglip_lib.SiglipVisionConfig.from_dict(siglip_vision_config)
        cb = CodebookConfig.from_dict(cfg)
        if not isinstance(cfg.get("ddconfig"), Mapping):
            raise CheckpointError("rqvaesiglip config: no 'ddconfig' dict (the image decoder's config)")
        dec = DecoderConfig.from_dict(cfg["ddconfig"])
        lat = tuple(int(v) for v in cfg["latent_shape"])
        code = tuple(int(v) for v in cfg["code_shape"])
        embed_dim = int(cfg.get("embed_dim") or cb.embed_dim)
        if lat[:2] != (sg.grid, sg.grid) or lat[2] != sg.hidden_size:
            raise CheckpointError(f"rqvaesiglip config: latent_shape {list(lat)} does not match the SigLIP encoder "
                                  f"({sg.grid}x{sg.grid} patches of width {sg.hidden_size}); wrong SigLIP config?")
        if embed_dim != cb.embed_dim:
            raise CheckpointError(f"rqvaesiglip config: embed_dim {embed_dim} != codebook width {cb.embed_dim} "
                                  f"implied by latent_shape {list(lat)} / code_shape {list(code)}")
        dls = cfg.get("decoder_latent_shape")
        return cls(siglip=sg, codebook=cb, latent_shape=lat, code_shape=code, embed_dim=embed_dim, decoder=dec,
                   decoder_latent_shape=None if dls is None else (int(dls[0]), int(dls[1])))


# ----------------------------------------------------------------------------- residual quantizer (pure)

def to_code_shape(x: jax.Array, shape_divisor: tuple[int, int]) -> jax.Array:
    """``RQBottleneck.to_code_shape``: (B, H, W, D) -> (B, H/rH, W/rW, rH*rW*D) (identity for 1x1)."""
    b, h, w, d = x.shape
    rh, rw = shape_divisor
    x = x.reshape(b, h // rh, rh, w // rw, rw, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // rh, w // rw, rh * rw * d)


def to_latent_shape(x: jax.Array, shape_divisor: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`to_code_shape`: (B, h, w, rH*rW*D) -> (B, h*rH, w*rW, D)."""
    b, h, w, c = x.shape
    rh, rw = shape_divisor
    x = x.reshape(b, h, w, rh, rw, c // (rh * rw)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * rh, w * rw, c // (rh * rw))


def codebook_tables(quantizer_params: Mapping, config: CodebookConfig) -> list[jax.Array]:
    """One (n_embed + 1, C) table per depth (the same array D times when the codebook is shared)."""
    t = [quantizer_params[f"codebooks_{i}"]["embedding"] for i in range(config.num_codebooks)]
    return t * config.depth if config.shared_codebook else t


def nearest_code(r: jax.Array, table: jax.Array) -> jax.Array:
    """``VQEmbedding.find_nearest_embedding``: argmin over the n_embed real rows (the padding row is never
    chosen) of ``|r|^2 + |e_k|^2 - 2 r.e_k``, in float32. r (..., C) -> (...) int32."""
    e = table[:-1].astype(jnp.float32)
    r = r.astype(jnp.float32)
    d = (jnp.sum(r * r, -1, keepdims=True) + jnp.sum(e * e, -1)
         - 2.0 * jnp.einsum("...c,kc->...k", r, e, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def residual_quantize(x: jax.Array, tables: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``RQBottleneck.quantize``: x (..., C) -> (codes (..., D) int32, z_q (..., C) = sum_d e_{c_d}).

    At depth d the code is the nearest entry of ``tables[d]`` to the residual
    ``r_d = x - sum_{j<d} e_{c_j}`` (:func:`nearest_code`).
    """
    r = x.astype(jnp.float32)
    agg = jnp.zeros_like(r)
    codes = []
    for table in tables:
        c = nearest_code(r, table)
        q = jnp.take(table, c, axis=0).astype(jnp.float32)
        r = r - q
        agg = agg + q
        codes.append(c)
    return jnp.stack(codes, axis=-1), agg


# ----------------------------------------------------------------------------- decoder (NHWC inside)

class _DecoderBlock(nn.Module):
    """Fields and pieces shared by the taming decoder's ``mid`` block and ``up`` levels."""

    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def resnet(self, out_ch: int, name: str) -> ResnetBlock2D:
        """taming ``ResnetBlock`` (temb_channels 0): GroupNorm 32 / eps 1e-6 / SiLU, 1x1 shortcut when widths
        differ."""
        return ResnetBlock2D(out_ch, groups=GROUPS, eps=EPS, non_linearity="silu", dropout=self.dropout,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def attn(self, name: str) -> SpatialSelfAttention:
        """taming ``AttnBlock``: one head of width C over the H*W positions, 1x1-conv projections::

            h = norm(x);  out = x + proj_out(softmax(q(h) k(h)^T / sqrt(C)) v(h))
        """
        return SpatialSelfAttention(GROUPS, EPS, names=("norm", "q", "k", "v", "proj_out"), conv_projections=True,
                                    implementation=self.attention_impl, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=name)


class MidBlock(_DecoderBlock):
    """``block_1 -> attn_1 -> block_2`` at constant width."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = x.shape[-1]
        x = self.resnet(c, "block_1")(x, deterministic=deterministic)
        x = self.attn("attn_1")(x)
        return self.resnet(c, "block_2")(x, deterministic=deterministic)


class UpLevel(_DecoderBlock, kw_only=True):
    """``up[i_level]``: ``num_blocks`` resnets (each followed by an ``AttnBlock`` when ``with_attn``: the
    level's resolution is in ``attn_resolutions``), then nearest x2 + 3x3 conv unless it is level 0."""

    out_ch: int
    num_blocks: int
    with_attn: bool
    with_upsample: bool
    resamp_with_conv: bool = True

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for j in range(self.num_blocks):
            x = self.resnet(self.out_ch, f"block_{j}")(x, deterministic=deterministic)
            if self.with_attn:
                x = self.attn(f"attn_{j}")(x)
        if self.with_upsample:
            x = Upsample2D(use_conv=self.resamp_with_conv, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsample")(x)
        return x


class Decoder(nn.Module):
    """taming ``Decoder``: ``conv_in -> mid -> up[L-1] .. up[0] -> norm_out -> SiLU -> conv_out`` (NHWC).

    Level ``i`` has width ``ch * ch_mult[i]``; the level run first (``L-1``) sits at
    ``resolution / 2^(L-1)`` and each level but 0 doubles the size.
    """

    config: DecoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, z, deterministic: bool = True):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv2d(c.ch * c.ch_mult[-1], 3, name="conv_in", **kw)(z)
        h = MidBlock(c.dropout, attention_impl=self.attention_impl, name="mid", **kw)(h, deterministic)
        res = c.resolution // c.upsample_factor
        for i in reversed(range(c.num_resolutions)):
            h = UpLevel(out_ch=c.ch * c.ch_mult[i], num_blocks=c.num_res_blocks + 1,
                        with_attn=res in c.attn_resolutions, with_upsample=i != 0,
                        resamp_with_conv=c.resamp_with_conv, dropout=c.dropout, attention_impl=self.attention_impl,
                        name=f"up_{i}", **kw)(h, deterministic)
            if i != 0:
                res *= 2
        if c.give_pre_end:
            return h
        h = nn.silu(group_norm(GROUPS, EPS, name="norm_out", **kw)(h))
        return conv2d(c.out_ch, 3, name="conv_out", **kw)(h)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` (no antialiasing) on NHWC."""
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "linear", antialias=False)


# ----------------------------------------------------------------------------- the tokenizer

class RQVAESiglip(nn.Module):
    """vila-u ``RQVAESiglipModel`` (inference). Methods::

        codes, z_q = m.apply(v, pixels, method=m.encode_image)   # pixels (B,3,S,S) in [-1,1]
        images = m.apply(v, z_q, method=m.decode)                # z_q (B,h,w,C) -> (B,out_ch,h*f,w*f)
        images = m.apply(v, codes, method=m.decode_codes)        # codes (B,h,w,D)

    ``codes`` (B, h, w, D) int32, ``z_q`` (B, H, W, C) in the latent layout
    (equal for VILA-U's 1x1 shape divisor). ``__call__`` reconstructs.
    """

    config: RQVAESiglipConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = siglip_lib.vila_u_encoder(c.siglip, attention_impl=self.attention_impl, **kw)
        self.quantizer = RQCodebook(c.codebook, **kw)
        self.post_quant_conv = conv2d(c.decoder.z_channels, 1, name=None, **kw)
        self.decoder = Decoder(c.decoder, attention_impl=self.attention_impl, **kw)

    def encode_features(self, pixel_values):
        """SigLIP hidden state after layer ``L-2``, on the patch grid: (B, grid, grid, hidden)."""
        h = self.vision_model(pixel_values)
        g = self.config.siglip.grid
        return h.reshape(h.shape[0], g, g, h.shape[-1])

    def quantize(self, features):
        """(B, H, W, D) features -> ``(codes (B, h, w, depth), z_q (B, H, W, D))`` (:func:`residual_quantize`)."""
        c = self.config
        self.quantizer(jnp.zeros((1, c.codebook.depth), jnp.int32))  # make sure the codebook params exist
        tables = codebook_tables(self.quantizer.variables["params"], c.codebook)
        codes, z = residual_quantize(to_code_shape(features, c.shape_divisor), tables)
        return codes, to_latent_shape(z, c.shape_divisor).astype(self.dtype)

    def encode_image(self, pixel_values):
        """``RQVAESiglipModel.encode_image``: pixels -> ``(codes, z_q)``."""
        return self.quantize(self.encode_features(pixel_values))

    def embed_codes(self, codes):
        """``get_code_emb_with_depth``: codes (..., D) -> per-depth embeddings (..., D, C)."""
        return self.quantizer(codes)

    def codes_to_latent(self, codes):
        """codes (B, h, w, D) -> ``z_q = to_latent_shape(sum_d e_{c_d})`` (B, H, W, C)."""
        return to_latent_shape(self.embed_codes(codes).sum(axis=-2), self.config.shape_divisor)

    def decode(self, z_q, deterministic: bool = True):
        """``RQVAESiglipModel.decode``: z_q (B, h, w, C) -> images (B, out_ch, h*f, w*f), about [-1, 1]."""
        c = self.config
        z = z_q.astype(self.dtype)
        if c.decoder_latent_shape is not None:
            z = resize_bilinear(z.astype(jnp.float32), c.decoder_latent_shape).astype(self.dtype)
        out = self.decoder(self.post_quant_conv(z), deterministic)
        return jnp.transpose(out, (0, 3, 1, 2))

    def decode_codes(self, codes):
        return self.decode(self.codes_to_latent(codes))

    def __call__(self, pixel_values):
        _, z_q = self.encode_image(pixel_values)
        return self.decode(z_q)


def to_pixels(images: jax.Array) -> jax.Array:
    """vila-u ``generate_image_content``'s last step: ``clamp((x + 1) * 127.5, 0, 255)`` in float32 (NCHW)."""
    return jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)


def to_uint8_hwc(pixels) -> np.ndarray:
    """(B, 3, H, W) values in [0, 255] -> (B, H, W, 3) uint8 truncated, as vila-u's ``save_image`` does
    (``.numpy().astype(np.uint8)``)."""
    return np.asarray(pixels, np.float32).transpose(0, 2, 3, 1).astype(np.uint8)


# ----------------------------------------------------------------------------- build / shapes

def from_config(rqvaesiglip_config: Mapping[str, Any], siglip_vision_config: Mapping[str, Any], *,
                dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                attention_impl: str | None = None) -> RQVAESiglip:
    return RQVAESiglip(RQVAESiglipConfig.from_dict(rqvaesiglip_config, siglip_vision_config), dtype=dtype,
                       param_dtype=param_dtype, attention_impl=attention_impl)


def param_shapes(model: RQVAESiglip) -> dict:
    """``{flax path: shape}`` of the whole tokenizer, without allocating."""
    from fairjax.io.tree import shapes_of
    from fairjax.models.layers import abstract_init

    s = model.config.siglip
    x = jax.ShapeDtypeStruct((1, s.num_channels, s.image_size, s.image_size), jnp.float32)
    return shapes_of(abstract_init(model, x))  # no initialiser traced


def num_params(shapes: Mapping) -> int:
    return int(sum(math.prod(s) for s in shapes.values()))
