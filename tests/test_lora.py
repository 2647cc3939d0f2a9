"""fairjax.lora: init / merge / training only the LoRA tree / save-load.

References come from outside fairjax.lora: numpy ``W + (alpha/r) a b`` built by
hand, torch ``conv2d`` / ``linear`` with hand-merged weights, PEFT's own LoRA
layers, torch's kaiming-uniform bound, and the numpy analytic LoRA gradient.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairjax import lora as L
from fairjax.io.tree import flatten
from fairjax.errors import CheckpointError
from fairjax.io.safetensors import write_safetensors
from fairjax.errors import UserError

ALPHA = 6.0
RANK = 4
TARGETS = [r"(conv_in|proj)/kernel$", r"attn1/to_(q|v)/kernel$"]


class Attn(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Dense(6, name="to_q")(h) + nn.Dense(6, name="to_v")(h) + nn.Dense(6, name="to_k")(h)


class Net(nn.Module):
    """3x3 conv -> 1x1 conv -> pool -> Dense attention-ish block (names like diffusers)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(5, (3, 3), padding="SAME", name="conv_in")(x)
        h = nn.Conv(7, (1, 1), name="proj")(h)
        h = h.mean(axis=(1, 2))
        return Attn(name="attn1")(h)


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3), jnp.float32)
    params = jax.jit(Net().init)(jax.random.PRNGKey(1), x)["params"]
    return x, params


def randomise_b(lora, seed=3):
    """Give every b a random value so that merge does something."""
    rng = np.random.default_rng(seed)
    return {p: {"a": e["a"], "b": jnp.asarray(rng.normal(0, 0.3, e["b"].shape), jnp.float32)} for p, e in lora.items()}


def hand_merged(w, a, b):
    w, a, b = (np.asarray(v, np.float64) for v in (w, a, b))
    return w + (ALPHA / a.shape[1]) * (a @ b).reshape(w.shape)


# ----------------------------------------------------------------------------- init

def test_init_selects_kernels_with_peft_init(setup):
    import torch
    _, params = setup
    lora = L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2))
    assert sorted(lora) == ["attn1/to_q/kernel", "attn1/to_v/kernel", "conv_in/kernel", "proj/kernel"]
    fan_in = {"conv_in/kernel": 3 * 3 * 3, "proj/kernel": 5, "attn1/to_q/kernel": 7, "attn1/to_v/kernel": 7}
    out = {"conv_in/kernel": 5, "proj/kernel": 7, "attn1/to_q/kernel": 6, "attn1/to_v/kernel": 6}
    for p, e in lora.items():
        assert e["a"].shape == (fan_in[p], RANK) and e["b"].shape == (RANK, out[p])
        assert e["a"].dtype == jnp.float32 and e["b"].dtype == jnp.float32
        assert np.all(np.asarray(e["b"]) == 0)
        # PEFT: kaiming_uniform_(lora_A.weight, a=sqrt(5)) -> bound = gain * sqrt(3 / fan_in)
        bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in[p])
        assert np.abs(np.asarray(e["a"])).max() <= bound * (1 + 1e-6)
    big = {"w": {"kernel": jnp.zeros((256, 64))}}
    a = np.asarray(L.init(big, "kernel", 64, 64.0, jax.random.PRNGKey(0))["w/kernel"]["a"])
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / 256)
    assert 0.99 * bound < np.abs(a).max() <= bound and abs(a.std() - bound / math.sqrt(3)) < 0.02 * bound
    # deterministic in rng, different for another rng
    again = L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2))
    other = L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(9))
    assert all(np.array_equal(lora[p]["a"], again[p]["a"]) for p in lora)
    assert not np.array_equal(lora["proj/kernel"]["a"], other["proj/kernel"]["a"])
    assert L.num_params(lora) == sum(fan_in[p] * RANK + RANK * out[p] for p in lora)


def test_target_errors(setup):
    _, params = setup
    msg = r"'attn2/to_q/kernel\$' selects no kernel: it matches no param.*conv_in/kernel"
    with pytest.raises(UserError, match=msg):
        L.init(params, r"attn2/to_q/kernel$", RANK, ALPHA, jax.random.PRNGKey(0))
    msg = r"'to_q/bias' selects no kernel: it only matches non-kernel leaves \(attn1/to_q/bias\)"
    with pytest.raises(UserError, match=msg):
        L.init(params, [r"to_q/kernel", r"to_q/bias"], RANK, ALPHA, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank"):
        L.init(params, TARGETS, 0, ALPHA, jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- merge

def test_zero_b_merge_is_identity(setup):
    x, params = setup
    lora = L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2))
    for merged in (L.merge(params, lora, ALPHA), jax.jit(lambda p, l: L.merge(p, l, ALPHA))(params, lora)):
        for (pa, va), (pb, vb) in zip(jax.tree_util.tree_leaves_with_path(params),
                                      jax.tree_util.tree_leaves_with_path(merged)):
            assert pa == pb and va.dtype == vb.dtype
            assert np.asarray(va).tobytes() == np.asarray(vb).tobytes()
    merged = L.merge(params, lora, ALPHA)
    # untouched leaves and subtrees are passed through as the same objects
    assert merged["attn1"]["to_k"] is params["attn1"]["to_k"]
    assert merged["conv_in"]["bias"] is params["conv_in"]["bias"]
    assert merged["attn1"]["to_q"]["bias"] is params["attn1"]["to_q"]["bias"]


def test_merge_matches_hand_and_torch(setup, rel):
    import torch
    x, params = setup
    lora = randomise_b(L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2)))
    merged = jax.jit(lambda p, l: L.merge(p, l, ALPHA))(params, lora)
    hand = {}
    for p, e in lora.items():
        mod = p.rsplit("/", 1)[0].split("/")
        w = params
        for k in mod:
            w = w[k]
        hand[p] = hand_merged(w["kernel"], e["a"], e["b"])
        got = merged
        for k in mod:
            got = got[k]
        assert rel(got["kernel"], hand[p]) < 1e-6
        assert np.abs(hand[p] - np.asarray(w["kernel"])).max() > 1e-2  # the delta is not negligible

    # module output vs torch with the hand-merged weights (HWIO -> OIHW, (in,out) -> (out,in))
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    xt = t(x).permute(0, 3, 1, 2)
    h = torch.nn.functional.conv2d(xt, t(hand["conv_in/kernel"]).permute(3, 2, 0, 1), t(params["conv_in"]["bias"]),
                                   padding=1)
    h = torch.nn.functional.conv2d(h, t(hand["proj/kernel"]).permute(3, 2, 0, 1), t(params["proj"]["bias"]))
    h = h.mean(dim=(2, 3))
    a1 = params["attn1"]
    y = (torch.nn.functional.linear(h, t(hand["attn1/to_q/kernel"]).T, t(a1["to_q"]["bias"]))
         + torch.nn.functional.linear(h, t(hand["attn1/to_v/kernel"]).T, t(a1["to_v"]["bias"]))
         + torch.nn.functional.linear(h, t(a1["to_k"]["kernel"]).T, t(a1["to_k"]["bias"])))
    out = Net().apply({"params": merged}, x)
    assert rel(out, y.numpy()) < 1e-5


def test_layout_matches_peft(setup, rel):
    """The documented PEFT layout: lora_A = a reshaped to (r, in, kh, kw) / (r, in), lora_B = b.T."""
    import torch
    import peft
    x, params = setup
    lora = randomise_b(L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2)), seed=4)

    class TNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(3, 5, 3, padding=1)
            self.proj = torch.nn.Conv2d(5, 7, 1)
            self.attn1 = torch.nn.Module()
            self.attn1.to_q, self.attn1.to_v, self.attn1.to_k = (torch.nn.Linear(7, 6) for _ in range(3))

        def forward(self, x):
            h = self.proj(self.conv_in(x)).mean(dim=(2, 3))
            return self.attn1.to_q(h) + self.attn1.to_v(h) + self.attn1.to_k(h)

    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    net = TNet()
    with torch.no_grad():
        for name in ("conv_in", "proj"):
            getattr(net, name).weight.copy_(t(params[name]["kernel"]).permute(3, 2, 0, 1))
            getattr(net, name).bias.copy_(t(params[name]["bias"]))
        for name in ("to_q", "to_v", "to_k"):
            getattr(net.attn1, name).weight.copy_(t(params["attn1"][name]["kernel"]).T)
            getattr(net.attn1, name).bias.copy_(t(params["attn1"][name]["bias"]))
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["conv_in", "proj", "attn1.to_q", "attn1.to_v"])
    net = peft.inject_adapter_in_model(cfg, net)
    flat = {"/".join(k): v for k, v in flatten(params).items()}
    with torch.no_grad():
        for p, e in lora.items():
            mod = net.get_submodule(p.rsplit("/", 1)[0].replace("/", "."))
            kshape = flat[p].shape
            a = np.asarray(e["a"])
            if len(kshape) == 4:
                kh, kw, cin, _ = kshape
                mod.lora_A["default"].weight.copy_(t(a.reshape(kh, kw, cin, RANK).transpose(3, 2, 0, 1)))
                mod.lora_B["default"].weight.copy_(t(np.asarray(e["b"]).T[:, :, None, None]))
            else:
                mod.lora_A["default"].weight.copy_(t(a.T))
                mod.lora_B["default"].weight.copy_(t(np.asarray(e["b"]).T))
        want = net(t(x).permute(0, 3, 1, 2)).numpy()
    got = Net().apply({"params": L.merge(params, lora, ALPHA)}, x)
    assert rel(got, want) < 1e-5


def test_conv1d_and_bf16_and_frozendict(rel):
    from flax.core import freeze

    k3 = np.random.default_rng(5).normal(0, 1, (3, 4, 6)).astype(np.float32)  # conv1d WIO
    params = {"c": {"kernel": jnp.asarray(k3)}, "d": {"kernel": jnp.asarray(k3[0]).astype(jnp.bfloat16)}}
    lora = randomise_b(L.init(params, r"kernel$", 2, ALPHA, jax.random.PRNGKey(0)))
    assert lora["c/kernel"]["a"].shape == (12, 2) and lora["d/kernel"]["a"].shape == (4, 2)
    merged = L.merge(freeze(params), lora, ALPHA)
    assert type(merged).__name__ == "FrozenDict"
    assert rel(merged["c"]["kernel"], hand_merged(k3, lora["c/kernel"]["a"], lora["c/kernel"]["b"])) < 1e-6
    d = merged["d"]["kernel"]
    assert d.dtype == jnp.bfloat16
    want = hand_merged(np.asarray(params["d"]["kernel"], np.float32), lora["d/kernel"]["a"], lora["d/kernel"]["b"])
    assert rel(np.asarray(d, np.float32), want) < 1e-2  # bf16 rounding of the sum


def test_merge_errors(setup):
    _, params = setup
    lora = L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2))
    bad = dict(lora, **{"attn9/to_q/kernel": lora["attn1/to_q/kernel"]})
    with pytest.raises(ValueError, match="LoRA paths not in the params: attn9/to_q/kernel"):
        L.merge(params, bad, ALPHA)
    wrong = dict(lora, **{"proj/kernel": lora["attn1/to_q/kernel"]})
    msg = r"'proj/kernel' has a\(7, 4\), b\(4, 6\); kernel \(1, 1, 5, 7\) needs a\(5, r\), b\(r, 7\)"
    with pytest.raises(UserError, match=msg):
        L.merge(params, wrong, ALPHA)


def test_trainable_mask(setup):
    _, params = setup
    mask = L.trainable_mask(params, r"attn1/to_q/")
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert mask["attn1"]["to_q"] == {"kernel": True, "bias": True}
    assert sum(jax.tree.leaves(mask)) == 2
    with pytest.raises(ValueError, match="'nothing' matches no param"):
        L.trainable_mask(params, "nothing")


# ----------------------------------------------------------------------------- scanned layers

LLAMA = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-5)
LLAMA_TARGETS = r"layers_\d+/(self_attn/(q|v)_proj|mlp/up_proj)/kernel$"


@pytest.fixture(scope="module")
def llama_setup():
    """A 3-layer LLaMA, unrolled and scanned, on the same params (stacked for the scanned one)."""
    from fairjax.models import llama

    module = llama.from_config(LLAMA)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 5)))
    params = jax.jit(module.init)(jax.random.PRNGKey(0), ids)["params"]
    return module, params, module.clone(scan_layers=True), llama.stack_params(params), ids


def test_init_on_scanned_params_is_the_unrolled_lora(llama_setup):
    """Same unrolled keys, per-layer shapes and values for the same rng, whatever the layout."""
    _, params, _, stacked, _ = llama_setup
    a = L.init(params, LLAMA_TARGETS, RANK, ALPHA, jax.random.PRNGKey(4))
    b = L.init(stacked, LLAMA_TARGETS, RANK, ALPHA, jax.random.PRNGKey(4))
    assert sorted(a) == sorted(b) == L.match_kernels(params, LLAMA_TARGETS) == L.match_kernels(stacked, LLAMA_TARGETS)
    assert "model/layers_2/mlp/up_proj/kernel" in a and len(a) == 9
    for k in a:
        for ab in ("a", "b"):
            assert a[k][ab].shape == b[k][ab].shape and np.array_equal(a[k][ab], b[k][ab]), k
    mask = L.trainable_mask(stacked, r"mlp/")
    assert mask["model"]["layers"]["mlp"]["up_proj"]["kernel"] is True
    assert mask["model"]["layers"]["self_attn"]["q_proj"]["kernel"] is False
    with pytest.raises(UserError, match="only some layers") as e:
        L.trainable_mask(stacked, r"layers_1/mlp/")
    assert "\n" not in str(e.value)


def _partial_lora(params, seed=7):
    """Random a and b on some layers of some kernels, rank 2 on layer 0's q_proj (mixed ranks in one stack)."""
    lora = randomise_b(L.init(params, LLAMA_TARGETS, RANK, ALPHA, jax.random.PRNGKey(seed)))
    del lora["model/layers_1/self_attn/q_proj/kernel"], lora["model/layers_0/mlp/up_proj/kernel"]
    q0 = "model/layers_0/self_attn/q_proj/kernel"
    lora[q0] = {"a": lora[q0]["a"][:, :2], "b": lora[q0]["b"][:2]}
    return lora


def test_merge_on_stacked_is_the_stacked_unrolled_merge(llama_setup):
    """Bit for bit, also for layers without an entry and mixed ranks; and the gradient w.r.t. the LoRA."""
    from fairjax.models import llama

    _, params, _, stacked, _ = llama_setup
    lora = _partial_lora(params)
    want = jax.jit(lambda p, l: llama.stack_params(L.merge(p, l, ALPHA)))(params, lora)
    got = jax.jit(lambda p, l: L.merge(p, l, ALPHA))(stacked, lora)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    k = stacked["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(got["model"]["layers"]["mlp"]["up_proj"]["kernel"][0], k[0])  # no entry: unchanged
    w = jax.random.normal(jax.random.PRNGKey(1), k.shape)
    f = lambda p, l: jnp.sum(L.merge(p, l, ALPHA)["model"]["layers"]["mlp"]["up_proj"]["kernel"] * w)  # noqa: E731
    g_un = jax.grad(lambda l: f(llama.stack_params(L.merge(params, l, ALPHA)), {}))(lora)
    g_st = jax.grad(lambda l: f(stacked, l))(lora)
    for p in lora:
        for ab in ("a", "b"):
            np.testing.assert_allclose(g_st[p][ab], g_un[p][ab], rtol=1e-6, atol=1e-6)


def test_unmerged_lora_on_scanned_layers(llama_setup, rel):
    """The interceptor reads each layer's 'lora' variables inside nn.scan: unmerged on the scanned model =
    unmerged on the unrolled one = the merged model; with dropout the two layouts draw the same masks."""
    module, params, scanned, stacked, ids = llama_setup
    lora = _partial_lora(params)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)

    def run(m, p, dropout=0.0, row_keys=None):
        with nn.intercept_methods(L.lora_interceptor(dropout, row_keys)):
            return m.apply({"params": p, "lora": L.lora_variables(lora, p, ALPHA)}, ids).logits

    merged = module.apply({"params": L.merge(params, lora, ALPHA)}, ids).logits
    base = module.apply({"params": params}, ids).logits
    un, sc = jax.jit(lambda: run(module, params))(), jax.jit(lambda: run(scanned, stacked))()
    assert rel(un, merged) < 1e-5 and rel(sc, merged) < 1e-5 and rel(base, merged) > 1e-3
    v = L.lora_variables(lora, stacked, ALPHA)["model"]["layers"]["self_attn"]["q_proj"]
    assert v["a"].shape == (3, 16, RANK) and list(v["scale"]) == [ALPHA / 2, 0.0, ALPHA / RANK]
    un_d = jax.jit(lambda: run(module, params, 0.3, keys))()
    sc_d = jax.jit(lambda: run(scanned, stacked, 0.3, keys))()
    assert rel(sc_d, un_d) < 1e-5 and rel(un_d, un) > 1e-3


# ----------------------------------------------------------------------------- training

def test_gradient_is_the_analytic_lora_gradient(rel):
    """y = x W', loss = 0.5 |y|^2, W' = W + s a b: dL/da = s G b^T, dL/db = s a^T G, G = x^T y."""
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (5, 8))
    params = {"lin": {"kernel": jnp.asarray(rng.normal(0, 1, (8, 3)), jnp.float32)}}
    for lora in (L.init(params, "lin", 2, ALPHA, jax.random.PRNGKey(1)),
                 randomise_b(L.init(params, "lin", 2, ALPHA, jax.random.PRNGKey(1)))):
        loss = lambda l: 0.5 * jnp.sum((jnp.asarray(x, jnp.float32) @ L.merge(params, l, ALPHA)["lin"]["kernel"]) ** 2)
        g = jax.jit(jax.grad(loss))(lora)["lin/kernel"]
        a, b = (np.asarray(lora["lin/kernel"][k], np.float64) for k in ("a", "b"))
        s = ALPHA / 2
        y = x @ hand_merged(params["lin"]["kernel"], a, b)
        G = x.T @ y
        assert rel(g["b"], s * a.T @ G) < 1e-5
        if not b.any():
            assert np.all(np.asarray(g["a"]) == 0)  # b = 0: no gradient reaches a yet
        else:
            assert rel(g["a"], s * G @ b.T) < 1e-5


def test_optax_trains_only_the_lora(setup):
    x, params = setup
    frozen = jax.tree.map(lambda v: np.asarray(v).copy(), params)
    lora = L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2))
    opt = optax.adamw(1e-2)
    state = opt.init(lora)
    # optimizer state exists only for the LoRA leaves
    assert jax.tree.structure(state[0].mu) == jax.tree.structure(lora)
    n_state = sum(v.size for v in jax.tree.leaves(state) if v.ndim > 0)
    assert n_state == 2 * L.num_params(lora)
    target = jnp.ones((2, 6))

    @jax.jit
    def step(lora, state, params):
        def loss(l):
            return jnp.mean((Net().apply({"params": L.merge(params, l, ALPHA)}, x) - target) ** 2)
        val, g = jax.value_and_grad(loss)(lora)
        upd, state = opt.update(g, state, lora)
        return optax.apply_updates(lora, upd), state, val

    vals = []
    for _ in range(5):
        lora, state, v = step(lora, state, params)
        vals.append(float(v))
    assert vals[-1] < vals[0]
    assert all(np.abs(np.asarray(e["b"])).max() > 0 for e in lora.values())
    for (pa, va), (pb, vb) in zip(jax.tree_util.tree_leaves_with_path(frozen),
                                  jax.tree_util.tree_leaves_with_path(params)):
        assert pa == pb and va.tobytes() == np.asarray(vb).tobytes()


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(setup, tmp_path):
    _, params = setup
    lora = randomise_b(L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2)))
    path = tmp_path / "adapter.safetensors"
    L.save(path, lora, alpha=ALPHA, targets=TARGETS, base_model="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no temp file left
    back, meta = L.load(path)
    assert sorted(back) == sorted(lora)
    for p in lora:
        for k in ("a", "b"):
            assert back[p][k].dtype == lora[p][k].dtype
            assert np.asarray(back[p][k]).tobytes() == np.asarray(lora[p][k]).tobytes()
    assert meta == {"alpha": ALPHA, "rank": RANK, "targets": TARGETS, "base_model": "tiny"}


def test_load_and_save_errors(setup, tmp_path):
    _, params = setup
    other = tmp_path / "model.safetensors"
    write_safetensors(other, {"w": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="is not a fairjax LoRA file") as e:
        L.load(other)
    assert "\n" not in str(e.value)
    lora = L.init(params, TARGETS, RANK, ALPHA, jax.random.PRNGKey(2))
    with pytest.raises(UserError, match="does not exist"):
        L.save(tmp_path / "missing" / "x.safetensors", lora, alpha=ALPHA)
    with pytest.raises(ValueError, match="reserved"):
        L.save(tmp_path / "x.safetensors", lora, alpha=ALPHA, rank=3)
