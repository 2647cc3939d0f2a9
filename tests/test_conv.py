"""fairjax's Conv: flax's nn.Conv whose 3x3 and 1x1 convolutions on CPU run as Winograd F(2x2, 3x3) and as a
matrix product.

Outputs and gradients are checked against a numpy float64 convolution written here (a sum over the nine
shifted views of the padded input), not against the code under test; the module against ``flax.linen.Conv``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairjax.models import layers
from fairjax.models.layers import Conv, conv_general_dilated, winograd_conv3x3


def _numpy_conv(x, w, pad):
    """float64 ``y[n, i, j, k] = sum_{a, b, c} xpad[n, i + a, j + b, c] w[a, b, c, k]`` (stride 1)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, wd = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    return sum(xp[:, a:a + h, b:b + wd] @ w[a, b] for a in range(kh) for b in range(kw))


def _numpy_grads(x, w, g, pad):
    """The gradients of ``sum(conv(x, w) * g)``: ``dx`` scatters ``g w[a, b]^T`` back over each shifted view,
    ``dw[a, b] = view_ab^T g``."""
    x, w, g = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, wd = g.shape[1:3]
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for a in range(kh):
        for b in range(kw):
            view = xp[:, a:a + h, b:b + wd]
            dw[a, b] = view.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            dxp[:, a:a + h, b:b + wd] += g @ w[a, b].T
    return dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2]], dw


def _conv(x, w, pad=1, conv=conv_general_dilated):
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return conv(x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=dims)


def _data(shape, k, ksize=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((ksize, ksize, shape[-1], k)) / np.sqrt(ksize * ksize * shape[-1])).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (k,)).astype(np.float32)
    return x, w, g


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# even, odd and single-pixel images; one channel; more channels than pixels
@pytest.mark.parametrize("shape,k", [((2, 8, 8, 16), 24), ((3, 7, 5, 4), 6), ((1, 1, 1, 3), 2), ((2, 2, 3, 1), 1),
                                     ((1, 4, 4, 64), 8)])
def test_winograd_equals_the_float64_convolution(shape, k):
    x, w, _ = _data(shape, k)
    got = jax.jit(winograd_conv3x3)(x, w)
    assert got.shape == shape[:-1] + (k,)
    assert _rel(got, _numpy_conv(x, w, 1)) < 1e-5


@pytest.mark.parametrize("differentiated", ["direct", "winograd-forward", "winograd"])
@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 6, 8), (1, 5, 7, 3)])
def test_gradients_are_the_float64_ones(shape, remat, differentiated, monkeypatch, winograd_everywhere):
    monkeypatch.setattr(layers, "WINOGRAD_DIFFERENTIATED", differentiated)
    x, w, g = _data(shape, 5, seed=1)

    def f(x, w):
        return jnp.sum(_conv(x, w) * g)

    if remat:
        f = jax.checkpoint(f)
    dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    want_dx, want_dw = _numpy_grads(x, w, g, 1)
    assert _rel(dx, want_dx) < 1e-5 and _rel(dw, want_dw) < 1e-5
    # forward mode too (a custom JVP, not a custom VJP)
    tx, tw = _data(shape, 5, seed=2)[:2]
    _, tangent = jax.jvp(_conv, (x, w), (tx, tw))
    assert _rel(tangent, _numpy_conv(tx, w, 1) + _numpy_conv(x, tw, 1)) < 1e-5


def test_differentiated_convolution_is_the_direct_one_by_default(monkeypatch, winograd_everywhere):
    """Inference takes Winograd; under ``jax.grad`` (and ``jax.jvp``) the default computes XLA's direct
    convolution, forward and backward, as if Winograd were off (the train step's program is unchanged)."""
    x, w, g = _data((2, 6, 6, 8), 5)
    grad = jax.grad(lambda x, w: jnp.sum(_conv(x, w) * g), (0, 1))
    assert "dot_general" in _primitives(_conv, x, w) and "conv_general_dilated" not in _primitives(_conv, x, w)
    assert "dot_general" not in _primitives(grad, x, w) and "conv_general_dilated" in _primitives(grad, x, w)
    monkeypatch.setattr(layers, "WINOGRAD_DIFFERENTIATED", "winograd-forward")
    assert {"dot_general", "conv_general_dilated"} <= _primitives(grad, x, w)
    monkeypatch.setattr(layers, "WINOGRAD_DIFFERENTIATED", "winograd")
    assert "conv_general_dilated" not in _primitives(grad, x, w)


def test_one_by_one_is_a_matrix_product():
    x, w, g = _data((2, 5, 6, 7), 3, ksize=1)
    assert _rel(_conv(x, w, pad=0), _numpy_conv(x, w, 0)) < 1e-5
    dx, dw = jax.grad(lambda x, w: jnp.sum(_conv(x, w, pad=0) * g), (0, 1))(x, w)
    want_dx, want_dw = _numpy_grads(x, w, g, 0)
    assert _rel(dx, want_dx) < 1e-5 and _rel(dw, want_dw) < 1e-5


def _primitives(fn, *args):
    """Every primitive of ``fn``'s jaxpr, nested ones included (traced anew: the switches are read while
    tracing, and JAX caches the trace of a function object it has seen)."""
    def walk(jaxpr):
        for e in jaxpr.eqns:
            yield e.primitive.name
            for v in e.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else [v]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    return set(walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr))


def test_which_convolutions_take_the_cpu_forms(monkeypatch):
    assert jax.default_backend() == "cpu"
    x, w3, _ = _data((2, 8, 8, 4), 4)
    w1 = w3[1:2, 1:2]
    # by default too small for Winograd: 128 pixels (below WINOGRAD_MIN_PIXELS) and 4 channels
    assert "conv_general_dilated" in _primitives(_conv, x, w3)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_PIXELS", 2 * 8 * 8)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 5)
    assert "conv_general_dilated" in _primitives(_conv, x, w3)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 4)
    assert "conv_general_dilated" not in _primitives(_conv, x, w3)  # Winograd: a batched dot
    assert "dot_general" in _primitives(_conv, x, w3)
    assert "conv_general_dilated" not in _primitives(lambda x, w: _conv(x, w, pad=0), x, w1)
    dims = jax.lax.conv_dimension_numbers(x.shape, w3.shape, ("NHWC", "HWIO", "NHWC"))
    others = {  # each of these keeps XLA's convolution
        "stride 2": lambda x, w: conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dims),
        "no padding": lambda x, w: conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims),
        "dilated": lambda x, w: conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                                     dimension_numbers=dims),
        "bfloat16": lambda x, w: _conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
        "NCHW": lambda x, w: conv_general_dilated(
            x.transpose(0, 3, 1, 2), w, (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=jax.lax.conv_dimension_numbers((2, 4, 8, 8), w.shape, ("NCHW", "HWIO", "NCHW"))),
    }
    for why, fn in others.items():
        assert "conv_general_dilated" in _primitives(fn, x, w3), why
    grouped = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 2, 4), ("NHWC", "HWIO", "NHWC"))
    assert "conv_general_dilated" in _primitives(
        lambda x, w: conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=grouped,
                                          feature_group_count=2), x, w3[:, :, :2])
    monkeypatch.setattr(layers, "WINOGRAD_MAX_BYTES", 4 * 4 * 2 * 8 * 8 * 4 - 1)  # just below this input's
    assert "conv_general_dilated" in _primitives(_conv, x, w3)
    monkeypatch.setattr(layers, "WINOGRAD_MAX_BYTES", 1 << 28)
    monkeypatch.setattr(layers, "WINOGRAD_ON_CPU", False)
    assert "conv_general_dilated" in _primitives(_conv, x, w3)
    assert "conv_general_dilated" in _primitives(lambda x, w: _conv(x, w, pad=0), x, w1)
    # what falls back gives lax's numbers
    for fn in others.values():
        monkeypatch.setattr(layers, "WINOGRAD_ON_CPU", True)
        a = fn(x, w3)
        monkeypatch.setattr(layers, "WINOGRAD_ON_CPU", False)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(fn(x, w3)))


def test_module_matches_flax_conv(winograd_everywhere):
    x = jnp.asarray(_data((2, 8, 8, 6), 1)[0])
    for kernel, padding in [((3, 3), ((1, 1), (1, 1))), ((1, 1), ((0, 0), (0, 0))), ((3, 3), "SAME")]:
        ours, theirs = Conv(5, kernel, padding=padding, name="c"), nn.Conv(5, kernel, padding=padding, name="c")
        assert isinstance(ours, nn.Conv)
        p = ours.init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))
        jax.tree.map(np.testing.assert_array_equal, p, theirs.init(jax.random.key(0), x))
        assert _rel(ours.apply(p, x), theirs.apply(p, x)) < 1e-5


def test_no_model_builds_flax_conv_directly():
    """Every convolution of fairjax's models is ``Conv`` (a plain ``nn.Conv`` would miss the CPU forms)."""
    import pathlib
    import re

    root = pathlib.Path(layers.__file__).resolve().parents[1]
    offenders = [f"{p.relative_to(root.parent)}:{i}" for p in sorted(root.rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bnn\.Conv\(", line)]
    assert not offenders, f"use fairjax.models.layers.Conv: {offenders}"
