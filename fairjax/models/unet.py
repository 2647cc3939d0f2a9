"""Flax port of diffusers' ``UNet2DConditionModel`` (SDXL, SD 1.x / 2.x).

The model's config is diffusers' ``unet/config.json`` dict itself; defaults are
filled as diffusers fills them, values this port does not implement are refused
with a one-line error naming the key. Module names are diffusers' attribute
names (``down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q``,
``time_embedding/linear_1``, ``add_embedding/linear_2`` ...), so conversion is
the generic rule set of :mod:`fairjax.convert.core`.

Usage::

    unet, params = load("models/sdxl")            # a fairjax model dir or its unet/ folder
    eps = unet.apply({"params": params}, sample, t, context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})

``sample`` is NCHW like diffusers (NHWC inside), ``t`` a scalar or ``(B,)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairjax import parallel
from fairjax.errors import ConfigError
from fairjax.models import attention
from fairjax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    abstract_init,
    conv2d,
    get_activation,
    group_norm,
    timestep_embedding,
)

Dtype = Any

CLASS_NAME = "UNet2DConditionModel"

#: diffusers 0.42 ``UNet2DConditionModel.__init__`` defaults (checked against diffusers in tests).
DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

#: keys that must keep one value (the only one this port implements).
_FIXED: dict[str, Any] = {
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
_ADDITION_TYPES = (None, "text_time")
#: the ``tensor``-axis rules (:func:`fairjax.parallel.tensor_rules`): attention q/k/v and the GEGLU
#: input projection column-parallel, attention out and the feed-forward output row-parallel
PARTITION_RULES = parallel.tensor_rules(column=(r"attn[12]/to_(q|k|v)", r"ff/net_0/proj"),
                                        row=(r"attn[12]/to_out_0", r"ff/net_2"))


def _tuple(v):
    """Lists (also nested) -> tuples, so the config is hashable."""
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def _per_block(cfg: Mapping, key: str, n: int) -> tuple:
    v = cfg[key]
    if isinstance(v, tuple):
        if len(v) != n:
            raise ConfigError(f"unet config: {key} has {len(v)} entries but there are {n} down blocks")
        return v
    return (v,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A validated, normalised diffusers UNet config (hashable, so it can be a module field).

    ``values`` holds every diffusers key (defaults filled, lists as tuples); the
    per-block properties resolve diffusers' conventions, including its naming
    quirk: with ``num_attention_heads`` None, ``attention_head_dim`` is the
    number of heads.
    """

    values: tuple[tuple[str, Any], ...]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "UNetConfig":
        name = config.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ConfigError(f"unet config: _class_name is {name!r}, not {CLASS_NAME} (is this a unet/ folder?)")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
        if unknown:
            raise ConfigError(f"unet config: unknown key(s) {', '.join(unknown)} (not a diffusers 0.42 "
                              f"{CLASS_NAME} config, or a newer option this port does not implement)")
        cfg = {k: _tuple(config.get(k, d)) for k, d in DEFAULTS.items()}
        _validate(cfg)
        return cls(tuple(cfg.items()))

    def __getitem__(self, key: str):
        return dict(self.values)[key]

    def to_dict(self) -> dict:
        return dict(self.values)

    @property
    def num_blocks(self) -> int:
        return len(self["down_block_types"])

    def per_block(self, key: str) -> tuple:
        return _per_block(self.to_dict(), key, self.num_blocks)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.per_block("attention_head_dim")

    @property
    def time_embed_dim(self) -> int:
        return self["time_embedding_dim"] or 4 * self["block_out_channels"][0]

    @property
    def cross_attention_dim(self) -> int:
        return self.per_block("cross_attention_dim")[0]

    def reverse_transformer_layers(self) -> tuple:
        rev = self["reverse_transformer_layers_per_block"]
        return rev if rev is not None else tuple(reversed(self.per_block("transformer_layers_per_block")))


def _validate(cfg: dict) -> None:
    for key, want in _FIXED.items():
        if cfg[key] != want:
            raise ConfigError(f"unet config: {key}={cfg[key]!r} is not supported (only {want!r})")
    n = len(cfg["down_block_types"])
    for key, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        bad = [t for t in cfg[key] if t not in allowed]
        if bad:
            raise ConfigError(f"unet config: {key} contains {bad[0]!r} (supported: {', '.join(allowed)})")
    if cfg["mid_block_type"] not in _MID_TYPES:
        raise ConfigError(f"unet config: mid_block_type={cfg['mid_block_type']!r} is not supported "
                          f"(supported: UNetMidBlock2DCrossAttn or null)")
    if cfg["addition_embed_type"] not in _ADDITION_TYPES:
        raise ConfigError(f"unet config: addition_embed_type={cfg['addition_embed_type']!r} is not supported "
                          f"(supported: null, 'text_time')")
    if cfg["addition_embed_type"] == "text_time" and (
            cfg["addition_time_embed_dim"] is None or cfg["projection_class_embeddings_input_dim"] is None):
        raise ConfigError("unet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                          "projection_class_embeddings_input_dim")
    if len(cfg["up_block_types"]) != n or len(cfg["block_out_channels"]) != n:
        raise ConfigError(f"unet config: down_block_types, up_block_types and block_out_channels must have the "
                          f"same length (got {n}, {len(cfg['up_block_types'])}, {len(cfg['block_out_channels'])})")
    if cfg["norm_num_groups"] is None:
        raise ConfigError("unet config: norm_num_groups=null is not supported")
    for key in ("only_cross_attention", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                "transformer_layers_per_block"):
        _per_block(cfg, key, n)
    if len(set(_per_block(cfg, "cross_attention_dim", n))) != 1:
        raise ConfigError("unet config: cross_attention_dim must be the same for every block")
    try:
        get_activation(cfg["act_fn"])
    except ValueError as e:
        raise ConfigError(f"unet config: act_fn: {e}") from None
    heads = _per_block(cfg, "attention_head_dim", n)
    for i, (ch, h) in enumerate(zip(cfg["block_out_channels"], heads)):
        if ch % h or ch % cfg["norm_num_groups"]:
            raise ConfigError(f"unet config: block_out_channels[{i}]={ch} is not divisible by its head count {h} "
                              f"and norm_num_groups {cfg['norm_num_groups']}")
    rev = cfg["reverse_transformer_layers_per_block"]
    if rev is not None and len(rev) != n:
        raise ConfigError(f"unet config: reverse_transformer_layers_per_block has {len(rev)} entries, need {n}")


def _layers(spec, num_layers: int) -> tuple[int, ...]:
    """diffusers' per-block ``transformer_layers_per_block``: an int for every layer, or one per layer."""
    return tuple(spec) if isinstance(spec, tuple) else (spec,) * num_layers


# ----------------------------------------------------------------------------- blocks

class _BlockBase(nn.Module):
    """Fields shared by the down / mid / up blocks (one value per block)."""

    out_channels: int
    num_layers: int
    transformer_layers: tuple[int, ...] = ()  # empty: no cross-attention (DownBlock2D / UpBlock2D)
    heads: int = 1
    resnet_eps: float = 1e-5
    resnet_groups: int = 32
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    implementation: str | None = None
    remat: bool | str = False
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, i: int) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                             non_linearity=self.act_fn, output_scale_factor=self.output_scale_factor,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}")

    def transformer(self, i: int) -> Transformer2DModel:
        return Transformer2DModel(self.heads, self.out_channels // self.heads, num_layers=self.transformer_layers[i],
                                  norm_num_groups=self.resnet_groups, use_linear_projection=self.use_linear_projection,
                                  only_cross_attention=self.only_cross_attention,
                                  upcast_attention=self.upcast_attention, implementation=self.implementation,
                                  remat=self.remat, scan_layers=self.scan_layers, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"attentions_{i}")


class DownBlock(_BlockBase):
    """``CrossAttnDownBlock2D`` (with ``transformer_layers``) or ``DownBlock2D``.

    Per layer: ``x = resnet(x, temb)`` [``x = attention(x, context)``], keep ``x``;
    then ``downsamplers_0`` (stride-2 conv) if ``add_downsample``, keep ``x``.
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.transformer_layers:
                x = self.transformer(i)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_BlockBase):
    """``UNetMidBlock2DCrossAttn``: ``resnets_0``, then (``attentions_i``, ``resnets_{i+1}``) pairs."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(i)(x, context)
            x = self.resnet(i + 1)(x, temb)
        return x


class UpBlock(_BlockBase):
    """``CrossAttnUpBlock2D`` (with ``transformer_layers``) or ``UpBlock2D``.

    Per layer: ``x = resnet(concat(x, skips.pop()), temb)`` [``x = attention(x, context)``];
    then ``upsamplers_0`` (nearest to ``upsample_size`` or 2x, 3x3 conv) if ``add_upsample``.
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.transformer_layers:
                x = self.transformer(i)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x, upsample_size)
        return x


# ----------------------------------------------------------------------------- model

class UNet2DConditionModel(nn.Module):
    """diffusers' ``UNet2DConditionModel`` forward, for the configs :class:`UNetConfig` accepts.

    ``emb = time_embedding(sinusoid(t)) [+ add_embedding(concat(text_embeds,
    sinusoid(time_ids)))]``; ``x = conv_in(sample)``; down blocks (keeping every
    intermediate as a skip), mid block, up blocks (consuming the skips in reverse),
    ``conv_out(act(conv_norm_out(x)))``.

    ``attention_implementation``: ``auto`` (default; None means the same), ``xla``, ``cudnn``,
    ``pallas``, ``einsum`` or ``chunked`` (:mod:`fairjax.models.attention`); ``remat`` checkpoints
    every transformer block. ``scan_layers`` runs each ``Transformer2DModel``'s blocks with ``nn.scan``:
    its params are ``.../attentions_i/transformer_blocks/...`` with a leading layer axis instead of
    ``transformer_blocks_0 .. _{L-1}`` (:func:`fairjax.io.tree.stack_layers` maps one onto the other;
    files always hold the unrolled layout).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = "auto"
    remat: bool | str = False
    scan_layers: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | UNetConfig, **kwargs) -> "UNet2DConditionModel":
        """Build from a diffusers config dict; ``kwargs``: dtype, param_dtype, attention_implementation, remat,
        scan_layers."""
        if not isinstance(config, UNetConfig):
            config = UNetConfig.from_dict(config)
        if "attention_implementation" in kwargs:
            kwargs["attention_implementation"] = attention.check(kwargs["attention_implementation"])
        return cls(config, **kwargs)

    def _block_kwargs(self, i: int, *, reverse: bool = False) -> dict:
        c = self.config
        idx = c.num_blocks - 1 - i if reverse else i
        return dict(heads=c.heads[idx], resnet_eps=c["norm_eps"], resnet_groups=c["norm_num_groups"],
                    act_fn=c["act_fn"], use_linear_projection=c["use_linear_projection"],
                    only_cross_attention=c.per_block("only_cross_attention")[idx],
                    upcast_attention=c["upcast_attention"], implementation=self.attention_implementation,
                    remat=self.remat, scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype)

    def _time_embedding(self, t, batch, added_cond_kwargs):
        c = self.config
        t = jnp.asarray(t)
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t[None], (batch,))
        t_emb = timestep_embedding(t, c["block_out_channels"][0], c["flip_sin_to_cos"], c["freq_shift"])
        emb = TimestepEmbedding(c.time_embed_dim, c["act_fn"], dtype=self.dtype, param_dtype=self.param_dtype,
                                name="time_embedding")(t_emb.astype(self.dtype))
        if c["addition_embed_type"] == "text_time":
            kwargs = added_cond_kwargs or {}
            for key in ("text_embeds", "time_ids"):
                if key not in kwargs:
                    raise ValueError(f"this UNet has addition_embed_type 'text_time': pass added_cond_kwargs "
                                     f"with {key!r} (text_embeds (B, 1280) and time_ids (B, 6) for SDXL)")
            text_embeds = jnp.asarray(kwargs["text_embeds"])
            time_ids = jnp.asarray(kwargs["time_ids"])
            time_embeds = timestep_embedding(time_ids.reshape(-1), c["addition_time_embed_dim"],
                                             c["flip_sin_to_cos"], c["freq_shift"])
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(self.dtype)
            emb = emb + TimestepEmbedding(c.time_embed_dim, "silu", dtype=self.dtype, param_dtype=self.param_dtype,
                                          name="add_embedding")(add)
        return emb

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        c = self.config
        attention.check(self.attention_implementation)
        n = c.num_blocks
        channels = c["block_out_channels"]
        x = jnp.transpose(jnp.asarray(sample), (0, 2, 3, 1)).astype(self.dtype)
        context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        if c["center_input_sample"]:
            x = 2 * x - 1.0
        emb = self._time_embedding(timesteps, x.shape[0], added_cond_kwargs)

        x = conv2d(channels[0], c["conv_in_kernel"], self.dtype, self.param_dtype, "conv_in")(x)
        skips = [x]
        layers = c.per_block("layers_per_block")
        tlayers = c.per_block("transformer_layers_per_block")
        for i, kind in enumerate(c["down_block_types"]):
            cross = kind == "CrossAttnDownBlock2D"
            x, s = DownBlock(channels[i], layers[i], _layers(tlayers[i], layers[i]) if cross else (),
                             add_downsample=i < n - 1, downsample_padding=c["downsample_padding"],
                             name=f"down_blocks_{i}", **self._block_kwargs(i))(x, emb, context)
            skips += s

        if c["mid_block_type"] is not None:
            x = MidBlock(channels[-1], 1, _layers(tlayers[-1], 1),
                         output_scale_factor=c["mid_block_scale_factor"], name="mid_block",
                         **self._block_kwargs(n - 1))(x, emb, context)

        rev_layers = c.reverse_transformer_layers()
        for i, kind in enumerate(c["up_block_types"]):
            num = layers[n - 1 - i] + 1
            res, skips = skips[-num:], skips[:-num]
            final = i == n - 1
            size = None if final else tuple(skips[-1].shape[1:3])
            cross = kind == "CrossAttnUpBlock2D"
            x = UpBlock(channels[n - 1 - i], num, _layers(rev_layers[i], num) if cross else (),
                        add_upsample=not final, name=f"up_blocks_{i}",
                        **self._block_kwargs(i, reverse=True))(x, res, emb, context, size)

        x = group_norm(c["norm_num_groups"], c["norm_eps"], self.dtype, self.param_dtype, "conv_norm_out")(x)
        x = get_activation(c["act_fn"])(x)
        x = conv2d(c["out_channels"], c["conv_out_kernel"], self.dtype, self.param_dtype, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))


# ----------------------------------------------------------------------------- shapes / loading

def dummy_inputs(config: UNetConfig, batch: int = 1) -> tuple:
    """Smallest valid inputs (for ``init`` / ``eval_shape``; param shapes do not depend on them)."""
    size = 2 ** (config.num_blocks - 1)
    sample = jnp.zeros((batch, config["in_channels"], size, size), jnp.float32)
    context = jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32)
    added = None
    if config["addition_embed_type"] == "text_time":
        atd = config["addition_time_embed_dim"]
        added = {"text_embeds": jnp.zeros((batch, config["projection_class_embeddings_input_dim"] - atd)),
                 "time_ids": jnp.zeros((batch, 1))}
    return sample, jnp.zeros((batch,), jnp.float32), context, added


def init_params(model: UNet2DConditionModel, rng: jax.Array) -> dict:
    """Random params (flax default initialisers), mostly for tests."""
    return model.init(rng, *dummy_inputs(model.config))["params"]


def param_shapes(model: UNet2DConditionModel) -> dict:
    """``jax.eval_shape`` of the params: a tree of ``ShapeDtypeStruct`` (no memory, no compute), in the
    model's own layout. An unrolled model is traced in its scanned form (one layer per transformer stack
    instead of up to ten) and unstacked, and no initialiser is traced (:func:`abstract_init`): the full
    SDXL UNet traces about 3x faster that way, and the tree is the same as ``init``'s."""
    if not model.scan_layers:
        return unstack_params(param_shapes(model.clone(scan_layers=True)))
    return abstract_init(model, *dummy_inputs(model.config))


SHAPES_DIR = "shapes"  # under the fairjax cache root (fairjax.convert.cache.cache_root)


def _shapes_file(config: UNetConfig) -> str:
    """``<cache root>/shapes/unet-<hash>.json``: the hash covers the config and the source of the model code
    (every ``fairjax/models/*.py``) and the JAX and Flax versions, so a change to any of them traces again."""
    import hashlib
    import json
    import os

    import flax

    from fairjax.io.fs import cache_root

    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{jax.__version__} {flax.__version__}".encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(name.encode() + f.read())
    return os.path.join(cache_root(), SHAPES_DIR, f"unet-{h.hexdigest()[:24]}.json")


@functools.lru_cache(maxsize=8)
def _config_shapes(config: UNetConfig) -> tuple:
    """Traced once per config and process, and kept on disk (:func:`_shapes_file`): the full SDXL UNet takes
    1.7 s to trace on a 2-core Xeon (:func:`param_shapes`; 5.2 s before the trace went scanned and
    initialiser-free). The disk copy is only a cache: unreadable, corrupt or unwritable, it is traced again,
    and the result is the same."""
    import json
    import os

    from fairjax.io.model_dir import write_json
    from fairjax.io.tree import shapes_of

    path = None
    try:
        path = _shapes_file(config)
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        return tuple((tuple(k.split("/")), tuple(int(d) for d in v)) for k, v in stored.items())
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    out = tuple(shapes_of(param_shapes(UNet2DConditionModel(config))).items())
    if path is None:
        return out
    try:  # atomic (temp file + rename); a cache that cannot be written only costs the trace next time
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, {"/".join(k): list(v) for k, v in out})
    except OSError:
        pass
    return out


def config_shapes(config: Mapping[str, Any] | UNetConfig) -> dict:
    """``{flax path: shape}`` of the params a diffusers UNet config describes (:func:`param_shapes`, traced once
    per config and process: converting a model and then loading it traces it once)."""
    return dict(_config_shapes(config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)))


def load(model_dir: str, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None, *,
         scan_layers: bool | str = False, **overrides):
    """Load ``(unet, params)`` from a fairjax model dir (or its ``unet/`` folder).

    ``overrides``: module options (``attention_implementation``, ``remat``,
    ``param_dtype``) or diffusers config keys to replace (e.g. ``upcast_attention``).
    Params are returned as stored (float32 masters unless converted otherwise),
    cast to ``param_dtype`` when given; every key and shape is checked against the config.
    Params that need no cast are read-only views of the file's memory map (read on first use).
    ``scan_layers`` (True, False or "auto": on accelerators only) returns the scanned model and its
    params stacked (:func:`stack_params`); the files hold the unrolled layout either way.
    """
    import os

    from fairjax.io.model_dir import CONFIG_FILE, PARAMS_FILE, component_dir, load_params, read_json
    from fairjax.models.layers import scan_layers_setting

    scan = scan_layers_setting(scan_layers)
    folder = component_dir(model_dir, "unet")
    config = read_json(os.path.join(folder, CONFIG_FILE))
    module_keys = {"attention_implementation", "remat"}
    module_kw = {k: v for k, v in overrides.items() if k in module_keys}
    config.update({k: v for k, v in overrides.items() if k not in module_keys})
    unet = UNet2DConditionModel.from_config(config, dtype=dtype, param_dtype=param_dtype or jnp.float32, **module_kw)
    # the shapes are traced while the file is read (load_params takes them as a function); arrays that need no
    # cast are memory-mapped, read when first used (as diffusers' from_pretrained)
    params = load_params(os.path.join(folder, PARAMS_FILE), lambda: config_shapes(unet.config), dtype=param_dtype,
                         mmap=True)
    if scan:
        unet, params = unet.clone(scan_layers=True), stack_params(params)
    return unet, params


def stack_params(params) -> dict:
    """Unrolled UNet params (``transformer_blocks_i``, the files' layout) -> the ``scan_layers`` layout."""
    from fairjax.io.tree import stack_layers

    return stack_layers(params, ("transformer_blocks",))


def unstack_params(params) -> dict:
    """``scan_layers`` UNet params -> the unrolled layout every file holds (unrolled params pass through)."""
    from fairjax.io.tree import unstack_layers

    return unstack_layers(params, ("transformer_blocks",))
