"""Attention implementations and the backend/shape rules of ``auto``; remat policies.

Every implementation that runs on CPU is checked against ``jax.nn.dot_product_attention``'s XLA path
(an independent implementation) with masks, causal flags, grouped heads and padded query blocks.
``auto``'s choices are a pure function of (backend, dtype, shapes, mask); they are checked for the
GPU and TPU rules the module documents without needing those devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairjax.errors import ConfigError
from fairjax.models import attention as A
from fairjax.models import layers


def _qkv(b, t, s, n, kv, h, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (b, t, n, h))
    kk = jax.random.normal(k[1], (b, s, kv, h))
    v = jax.random.normal(k[2], (b, s, kv, h))
    mask = jax.random.bernoulli(k[3], 0.8, (b, 1, t, s)).at[..., 0].set(True)
    return q, kk, v, mask


@pytest.mark.parametrize("impl", ["einsum", "chunked", "batched", "xla", "auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_implementations_match_xla(impl, causal, masked, monkeypatch):
    q, k, v, mask = _qkv(2, 37, 45, 4, 2, 16)
    m = mask if masked else None
    want = jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=causal, implementation="xla")
    monkeypatch.setattr(A, "CHUNK_SCORES", 7 * 45)  # 'chunked': several query blocks, the last one padded
    got = A.dot_product_attention(q, k, v, mask=m, is_causal=causal, implementation=impl)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "batched"])
def test_gradients_match_xla(impl, monkeypatch):
    q, k, v, mask = _qkv(1, 33, 33, 4, 2, 8, seed=1)
    monkeypatch.setattr(A, "CHUNK_SCORES", 8 * 33)

    def loss(impl):
        return lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, mask=mask, implementation=impl) ** 2)

    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_auto_runs_on_cpu_and_says_what_it_picked(capsys):
    A._announced.clear()
    q, k, v, _ = _qkv(1, 8, 8, 2, 2, 8)
    out = A.dot_product_attention(q, k, v)  # the default is auto
    assert out.shape == q.shape
    assert "attention auto -> batched (cpu backend)" in capsys.readouterr().err
    A.dot_product_attention(q, k, v)
    assert capsys.readouterr().err == ""  # once per distinct choice


@pytest.mark.parametrize("backend, dtype, q_shape, k_shape, masked, limit, want", [
    ("gpu", jnp.bfloat16, (2, 4096, 10, 64), (2, 4096, 10, 64), False, 128, "cudnn"),   # SDXL self-attention
    ("gpu", jnp.float16, (2, 4096, 10, 64), (2, 77, 10, 64), False, 128, "cudnn"),     # cross-attention
    ("gpu", jnp.float32, (2, 4096, 10, 64), (2, 4096, 10, 64), False, 128, "xla"),     # fp32: no flash
    ("gpu", jnp.bfloat16, (2, 300, 32, 128), (2, 300, 8, 128), True, 128, "xla"),      # LLaMA padding mask
    ("gpu", jnp.bfloat16, (1, 256, 1, 512), (1, 256, 1, 512), False, 256, "xla"),      # head 512 too wide
    ("gpu", jnp.bfloat16, (1, 16384, 1, 512), (1, 16384, 1, 512), False, 256, "chunked"),  # VAE mid-block 1024 px
    ("gpu", jnp.bfloat16, (2, 64, 4, 20), (2, 64, 4, 20), False, 128, "xla"),          # head 20: not a multiple of 8
    ("tpu", jnp.bfloat16, (2, 4096, 10, 64), (2, 4096, 10, 64), False, None, "pallas"),
    ("tpu", jnp.bfloat16, (2, 4096, 10, 64), (2, 77, 10, 64), False, None, "xla"),     # 77 keys: not 128-blocked
    ("tpu", jnp.bfloat16, (1, 16384, 1, 512), (1, 16384, 1, 512), False, None, "pallas"),
    ("cpu", jnp.float32, (1, 16384, 1, 512), (1, 16384, 1, 512), False, None, "chunked"),
    ("cpu", jnp.float32, (2, 4096, 10, 64), (2, 4096, 10, 64), False, None, "batched"),
    ("cpu", jnp.float32, (2, 300, 32, 128), (2, 300, 8, 128), True, None, "batched"),     # LLaMA on CPU
])
def test_auto_rules(backend, dtype, q_shape, k_shape, masked, limit, want):
    got, why = A.resolve("auto", q_shape=q_shape, k_shape=k_shape, dtype=dtype, masked=masked, backend=backend,
                         cudnn_head_limit=limit)
    assert got == want, why


def test_explicit_choice_is_kept_and_unknown_is_one_line():
    assert A.resolve("einsum", q_shape=(1, 4, 1, 8), k_shape=(1, 4, 1, 8), dtype=jnp.float32)[0] == "einsum"
    assert A.check(None) == A.check("") == "auto"
    with pytest.raises(ConfigError, match="not one of auto, xla, cudnn, pallas, einsum, chunked, batched") as e:
        A.check("flash")
    assert "\n" not in str(e.value)


def test_unet_refuses_an_unknown_attention_before_tracing():
    from fairjax.diffusion.tiny import unet_config
    from fairjax.models.unet import UNet2DConditionModel

    with pytest.raises(ConfigError, match="'flash'"):
        UNet2DConditionModel.from_config(unet_config("micro"), attention_implementation="flash")


def test_remat_policies_keep_values_and_gradients():
    """Every policy computes the same function and gradient; an unknown one is a one-line error."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(16)(x)) @ jnp.ones((16, 16)) + x

    class Stack(nn.Module):
        remat: object = "none"

        @nn.compact
        def __call__(self, x):
            cls = layers.remat_wrap(Block, self.remat)
            for i in range(3):
                x = cls(name=f"b{i}")(x)
            return x

    x = jax.random.normal(jax.random.key(0), (4, 16))
    params = Stack().init(jax.random.key(1), x)
    want = jax.grad(lambda p: jnp.sum(Stack("none").apply(p, x) ** 2))(params)
    for policy in (*layers.REMAT_POLICIES, True, False, "true"):
        got = jax.grad(lambda p, pol=policy: jnp.sum(Stack(pol).apply(p, x) ** 2))(params)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    assert layers.remat_policy(True) == "nothing_saveable" and layers.remat_policy("false") == "none"
    with pytest.raises(ConfigError, match="remat='everything' is not one of none, nothing_saveable"):
        layers.remat_policy("everything")
