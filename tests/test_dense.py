"""fairjax's Dense: flax's nn.Dense whose product flattens the input's leading axes on CPU.

The gradients are checked against numpy's ``x^T g`` and ``g W^T`` (computed here, in float64), not
against the code under test; the module against ``flax.linen.Dense`` itself.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairjax import lora as lora_lib
from fairjax.models import layers
from fairjax.models.layers import Dense, dense_dot_general


def _numpy_grads(x, w, g):
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    g2 = g.reshape(-1, g.shape[-1]).astype(np.float64)
    return (g2 @ w.astype(np.float64).T).reshape(x.shape), x2.T @ g2


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 5), (2, 3, 4, 5)])
def test_gradients_are_the_textbook_products(shape, remat):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((shape[-1], 3)).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (3,)).astype(np.float32)

    def f(x, w):
        y = dense_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        return jnp.sum(jnp.tanh(y) * 0 + y * g)  # cotangent g, through a fusion with the product

    if remat:
        f = jax.checkpoint(f)
    y = jax.jit(lambda x, w: dense_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))))(x, w)
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-5)
    dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    want_dx, want_dw = _numpy_grads(x, w, g)
    assert dx.shape == x.shape and dw.shape == w.shape
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)


def test_cpu_product_is_the_flattened_one_and_the_switch_turns_it_off(monkeypatch):
    x = jnp.ones((4, 8, 16))
    w = jnp.ones((16, 32))

    def operand_ranks():  # the ranks of every dot_general's left operand in the gradient's jaxpr
        jaxpr = jax.make_jaxpr(jax.grad(lambda w: dense_dot_general(x, w, (((2,), (0,)), ((), ()))).sum()))(w)
        return sorted(e.invars[0].aval.ndim for e in jaxpr.eqns if e.primitive.name == "dot_general")

    assert jax.default_backend() == "cpu"
    assert operand_ranks() == [2, 2]  # forward and weight gradient, both on (tokens, features)
    monkeypatch.setattr(layers, "FLATTEN_ON_CPU", False)
    assert operand_ranks() == [3, 3]


def test_other_contractions_fall_back_to_lax():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 5, 2)), jnp.float32)
    dims = (((2,), (1,)), ((0,), (0,)))  # batched: not Dense's contraction
    got = dense_dot_general(a, b, dims)
    np.testing.assert_allclose(np.asarray(got), np.einsum("bij,bjk->bik", np.asarray(a), np.asarray(b)), rtol=1e-5)
    eqns = jax.make_jaxpr(lambda a: dense_dot_general(a, b, dims))(a).eqns
    assert [e.primitive.name for e in eqns] == ["dot_general"]


def test_module_is_flax_dense_with_the_same_params_and_outputs():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 6)), jnp.float32)
    ours, theirs = Dense(4, name="proj"), nn.Dense(4, name="proj")
    p_ours = ours.init(jax.random.key(0), x)
    p_theirs = theirs.init(jax.random.key(0), x)
    assert isinstance(ours, nn.Dense)  # the LoRA interceptor and the sharding rules look for nn.Dense
    assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_theirs)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(ours.apply(p_ours, x)), np.asarray(theirs.apply(p_theirs, x)), rtol=1e-6)


def test_lora_interceptor_gradients_through_dense():
    """``y = x W + s (x A) B``: the gradients of A and B are s x^T (g B^T) and s (x A)^T g."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    g = rng.standard_normal((2, 5, 4)).astype(np.float32)
    model = Dense(4, name="proj")
    params = model.init(jax.random.key(0), x)["params"]
    lora = {"kernel": {"a": rng.standard_normal((6, 2)).astype(np.float32),
                      "b": rng.standard_normal((2, 4)).astype(np.float32)}}
    alpha = 4.0

    def loss(lo):
        variables = {"params": params, "lora": lora_lib.lora_variables(lo, params, alpha)}
        with nn.intercept_methods(lora_lib.lora_interceptor()):
            return jnp.sum(model.apply(variables, x) * g)

    grads = jax.jit(jax.grad(loss))(lora)["kernel"]
    s = alpha / 2
    x2, g2 = x.reshape(-1, 6).astype(np.float64), g.reshape(-1, 4).astype(np.float64)
    a, b = lora["kernel"]["a"].astype(np.float64), lora["kernel"]["b"].astype(np.float64)
    np.testing.assert_allclose(np.asarray(grads["a"]), s * x2.T @ (g2 @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["b"]), s * (x2 @ a).T @ g2, rtol=1e-5, atol=1e-5)


def test_no_model_builds_flax_dense_directly():
    """Every linear layer of fairjax's models is ``Dense`` (a plain ``nn.Dense`` would miss the CPU form)."""
    import pathlib
    import re

    root = pathlib.Path(layers.__file__).resolve().parents[1]
    offenders = [f"{p.relative_to(root.parent)}:{i}" for p in sorted(root.rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bnn\.Dense\(", line)]
    assert not offenders, f"use fairjax.models.layers.Dense: {offenders}"
