"""CLIP text encoders in Flax: ``CLIPTextModel`` (SDXL ``text_encoder``, CLIP ViT-L)
and ``CLIPTextModelWithProjection`` (SDXL ``text_encoder_2``, OpenCLIP bigG).

A port of ``transformers/models/clip/modeling_clip.py`` (transformers 5.x). The
module tree mirrors the PyTorch one as SDXL checkpoints store it, so the
parameter paths map onto checkpoint keys by the shared rules of
:mod:`fairjax.convert.core`::

    text_model.encoder.layers.3.self_attn.q_proj.weight
    -> text_model/encoder/layers_3/self_attn/q_proj/kernel

(transformers 5 saves a bare ``CLIPTextModel`` without the ``text_model.``
prefix and loads either form; :mod:`fairjax.convert.clip` accepts both and
writes the prefixed form, which transformers 4 and 5 both load.)

The forward pass, per layer ``l`` (pre-LN transformer, causal self-attention)::

    h_0     = token_embedding[ids] + position_embedding[0..T-1]
    a       = h + out_proj(softmax(q k^T / sqrt(d_head) + causal) v),  q,k,v from layer_norm1(h)
    h_{l+1} = a + fc2(act(fc1(layer_norm2(a))))
    last    = final_layer_norm(h_L)
    pooled  = last[b, eos_position(ids_b)]
    text_embeds = pooled @ text_projection          (WithProjection only)

The layers are :class:`fairjax.models.transformer.EncoderLayer` (causal), the block
CLIP shares with SigLIP. ``hidden_states`` is ``(h_0, h_1, ..., h_L)`` as transformers returns it with
``output_hidden_states=True``; SDXL conditions on ``hidden_states[-2]`` (the
penultimate layer, before the final LayerNorm) of both encoders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from fairjax.errors import CheckpointError
from fairjax.models.layers import Dense, layer_norm
from fairjax.models.transformer import ACTIVATIONS, Encoder

Dtype = Any


# ----------------------------------------------------------------------------- config

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that the forward pass uses.

    Defaults are transformers' ``CLIPTextConfig`` defaults, so a config.json
    that omits a key means what it means to ``from_pretrained``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    with_projection: bool = False

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], *, with_projection: bool | None = None) -> "CLIPTextConfig":
        """Parse a transformers text-encoder ``config.json`` dict; reject what the port does not implement.

        ``with_projection`` defaults to ``architectures == ["CLIPTextModelWithProjection"]``.
        """
        mt = cfg.get("model_type", "clip_text_model")
        if mt != "clip_text_model":
            raise CheckpointError(
                f"text encoder config: model_type {mt!r} is not supported; expected 'clip_text_model' "
                f"(a CLIPTextConfig, as in SDXL's text_encoder/config.json)")
        arch = cfg.get("architectures") or ["CLIPTextModel"]
        if len(arch) != 1 or arch[0] not in ARCHITECTURES:
            raise CheckpointError(f"text encoder config: architectures {arch!r} is not supported; "
                                  f"expected one of {list(ARCHITECTURES)}")
        if with_projection is None:
            with_projection = arch[0] == "CLIPTextModelWithProjection"
        names = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        kw = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        out = cls(**kw, with_projection=bool(with_projection))
        if out.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"text encoder config: hidden_act {out.hidden_act!r} is not supported; "
                                  f"use one of {sorted(ACTIVATIONS)}")
        if out.hidden_size % out.num_attention_heads:
            raise CheckpointError(f"text encoder config: hidden_size {out.hidden_size} is not divisible by "
                                  f"num_attention_heads {out.num_attention_heads}")
        for k in ("attention_dropout", "dropout"):
            if cfg.get(k):
                raise CheckpointError(f"text encoder config: {k}={cfg[k]} is not supported (inference/frozen "
                                      f"encoder only); set it to 0.0")
        return out


# ----------------------------------------------------------------------------- pieces

def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token whose final hidden state is the pooled output, per row.

    As transformers does it: with the legacy ``eos_token_id == 2`` (configs
    saved before transformers PR #24773, e.g. SDXL's) the EOS is taken to be
    the highest token id in the row (``argmax(ids)``, first on ties); otherwise
    the first position equal to ``eos_token_id``.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


@struct.dataclass
class CLIPTextOutput:
    """``last_hidden_state`` (B,T,D) after final_layer_norm; ``pooler_output`` (B,D);
    ``hidden_states`` tuple of L+1 (B,T,D) or None; ``text_embeds`` (B,P) or None."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple | None = None
    text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids=None):
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}; truncate the token ids")
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[-1])[None]
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="token_embedding")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="position_embedding")(position_ids)
        return tok + pos


class CLIPTextTransformer(nn.Module):
    """embeddings -> encoder -> final_layer_norm -> pooled at the EOS position."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None
    remat: bool | str = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids, position_ids)
        mask = None
        if attention_mask is not None:  # padding mask on keys, combined with the causal mask
            mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        h, states = Encoder(c, c.num_hidden_layers, causal=True, attention_impl=self.attention_implementation,
                            remat=self.remat, name="encoder", **kw)(h, mask)
        last = layer_norm(c.layer_norm_eps, name="final_layer_norm", **kw)(h)
        idx = eos_positions(input_ids, c.eos_token_id)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        return last, pooled, states


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel``; ``__call__(input_ids) -> CLIPTextOutput``.

    ``input_ids`` int (B, T) with T <= max_position_embeddings (SDXL: 77, no
    attention mask). ``output_hidden_states=True`` adds all L+1 hidden states.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None
    remat: bool | str = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states: bool = False):
        last, pooled, states = CLIPTextTransformer(
            self.config, dtype=self.dtype, param_dtype=self.param_dtype,
            attention_implementation=self.attention_implementation, remat=self.remat,
            name="text_model")(input_ids, attention_mask, position_ids)
        text_embeds = None
        if self.config.with_projection:
            text_embeds = Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="text_projection")(pooled)
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled,
                              hidden_states=states if output_hidden_states else None, text_embeds=text_embeds)


def CLIPTextModelWithProjection(config: CLIPTextConfig, **kw) -> CLIPTextModel:
    """transformers ``CLIPTextModelWithProjection``: adds ``text_embeds = pooled @ text_projection``."""
    return CLIPTextModel(dataclasses.replace(config, with_projection=True), **kw)


# ----------------------------------------------------------------------------- build / load

def from_config(cfg: Mapping[str, Any], *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                attention_implementation: str | None = None, remat: bool = False) -> CLIPTextModel:
    """Module for a transformers text-encoder ``config.json`` dict (class chosen by ``architectures``)."""
    return CLIPTextModel(CLIPTextConfig.from_dict(cfg), dtype=dtype, param_dtype=param_dtype,
                         attention_implementation=attention_implementation, remat=remat)


def param_shapes(model: CLIPTextModel) -> dict:
    """``{flax path: shape}`` of the model's params, without allocating them."""
    from fairjax.io.tree import shapes_of
    from fairjax.models.layers import abstract_init

    ids = jax.ShapeDtypeStruct((1, model.config.max_position_embeddings), jnp.int32)
    tree = abstract_init(model, ids)  # no initialiser traced
    return shapes_of(tree)


def load(model_dir: str, component: str = "text_encoder", dtype: Dtype = jnp.float32,
         param_dtype: Dtype | None = None, *, attention_implementation: str | None = None, remat: bool = False):
    """Load ``(encoder, params)`` from a fairjax model dir (or the component folder itself).

    ``component`` is ``"text_encoder"`` (CLIP-L) or ``"text_encoder_2"`` (bigG +
    projection). Params are returned as stored, cast to ``param_dtype`` when
    given; every key and shape is checked against the config first.
    """
    import os

    from fairjax.io.model_dir import CONFIG_FILE, PARAMS_FILE, component_dir, load_params, read_json

    folder = component_dir(model_dir, component)
    model = from_config(read_json(os.path.join(folder, CONFIG_FILE)), dtype=dtype,
                        param_dtype=param_dtype or jnp.float32, attention_implementation=attention_implementation,
                        remat=remat)
    params = load_params(os.path.join(folder, PARAMS_FILE), param_shapes(model), dtype=param_dtype)
    return model, params
