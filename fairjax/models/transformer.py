"""The pre-LN transformer block shared by the CLIP text encoder, SigLIP and VILA-U's depth transformer.

All three are the GPT-2 style block (transformers ``CLIPEncoderLayer`` /
``SiglipEncoderLayer``, vila-u ``AttentionBlock``)::

    x = x + out(attention(q(n), k(n), v(n))),   n = layer_norm_1(x)
    x = x + fc_2(act(fc_1(layer_norm_2(x))))

with biased projections and ``softmax(q k^T / sqrt(d_head) [+ causal / padding mask]) v``
per head. They differ in the submodule names (each keeps its checkpoint's, so the
generic rules of :mod:`fairjax.convert.core` map the keys), in causal masking and in
the activation; the pieces here take those as arguments:

* :class:`SelfAttention` -- the attention sublayer (names ``q_proj/k_proj/v_proj/out_proj``
  by default; vila-u: ``query/key/value/proj``);
* :func:`feed_forward` -- ``fc_2(act(fc_1(x)))`` built in the *calling* module's scope
  (vila-u's block holds ``mlp_0``/``mlp_2`` directly), and :class:`MLP`, the same as its
  own submodule (transformers ``CLIPMLP`` / ``SiglipMLP``: ``mlp/fc1``, ``mlp/fc2``);
* :class:`EncoderLayer` / :class:`Encoder` -- the transformers layer and layer stack
  (``layers_i/{layer_norm1, self_attn, layer_norm2, mlp}``) that CLIP and SigLIP share.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairjax import parallel
from fairjax.models.attention import dot_product_attention
from fairjax.models.layers import Dense, layer_norm, remat_wrap

#: the ``tensor``-axis rules of :class:`SelfAttention` / :class:`MLP` blocks (CLIP, SigLIP;
#: :func:`fairjax.parallel.tensor_rules`): q/k/v and fc1 column-parallel, out and fc2 row-parallel
PARTITION_RULES = parallel.tensor_rules(column=(r"self_attn/(q|k|v)_proj", r"mlp/fc1"),
                                        row=(r"self_attn/out_proj", r"mlp/fc2"))

Dtype = Any


def _quick_gelu(x):
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_erf(x):
    """Exact GELU ``0.5 x (1 + erf(x / sqrt 2))`` (transformers ``"gelu"``, torch ``nn.GELU()``)."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    """Tanh-approximated GELU (transformers ``"gelu_new"``, ``"gelu_pytorch_tanh"``, ``"gelu_fast"``)."""
    return jax.nn.gelu(x, approximate=True)


#: transformers ``hidden_act`` names -> function.
ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": _quick_gelu,
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased projections named ``names`` = (q, k, v, out).

    ``__call__(x (B, T, E), mask=None)``: ``mask`` (broadcastable to (B, heads, T, T),
    True = attend) is combined with the causal mask when ``causal``.
    """

    num_heads: int
    causal: bool = False
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "out_proj")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        b, t, e = x.shape
        dense = lambda name: Dense(e, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        shape = (b, t, self.num_heads, e // self.num_heads)
        q, k, v = (dense(n)(x).reshape(shape) for n in self.names[:3])
        o = dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.attention_impl)
        return dense(self.names[3])(o.reshape(b, t, e))


def feed_forward(x, hidden: int, act: Callable, names: tuple[str, str] = ("fc1", "fc2"), *, dtype: Dtype,
                 param_dtype: Dtype):
    """``fc_2(act(fc_1(x)))`` back to ``x``'s width; call it inside a compact method: the two
    ``nn.Dense`` (named ``names``) become submodules of the module being run."""
    h = act(Dense(hidden, dtype=dtype, param_dtype=param_dtype, name=names[0])(x))
    return Dense(x.shape[-1], dtype=dtype, param_dtype=param_dtype, name=names[1])(h)


class MLP(nn.Module):
    """transformers ``CLIPMLP`` / ``SiglipMLP``: ``fc2(act(fc1(x)))``."""

    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return feed_forward(x, self.intermediate_size, ACTIVATIONS[self.hidden_act], dtype=self.dtype,
                            param_dtype=self.param_dtype)


class EncoderLayer(nn.Module):
    """transformers ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``::

        x = x + self_attn(layer_norm1(x), mask);  x = x + mlp(layer_norm2(x))

    ``config`` is a :class:`~fairjax.models.clip_text.CLIPTextConfig` or a
    :class:`~fairjax.models.siglip.SiglipVisionConfig` (the fields used:
    ``num_attention_heads``, ``intermediate_size``, ``hidden_act``, ``layer_norm_eps``).
    """

    config: Any
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + SelfAttention(c.num_attention_heads, self.causal, attention_impl=self.attention_impl,
                              name="self_attn", **kw)(h, mask)
        h = layer_norm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + MLP(c.intermediate_size, c.hidden_act, name="mlp", **kw)(h)


class Encoder(nn.Module):
    """``layers_0 .. layers_{num_layers-1}`` (:class:`EncoderLayer`, each under ``nn.remat`` when ``remat``).

    ``__call__(x, mask=None)`` returns the last hidden state and the tuple
    ``(x, after layer 0, ..., after layer num_layers-1)`` (transformers' ``hidden_states``).
    """

    config: Any
    num_layers: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool | str = False

    @nn.compact
    def __call__(self, x, mask=None):
        layer = remat_wrap(EncoderLayer, self.remat)
        states = [x]
        for i in range(self.num_layers):
            x = layer(self.config, self.causal, dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_impl=self.attention_impl, name=f"layers_{i}")(x, mask)
            states.append(x)
        return x, tuple(states)
