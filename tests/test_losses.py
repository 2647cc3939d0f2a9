"""fairjax.losses against float64 numpy re-derivations of each formula (values and gradients).

Every reference below is written from the papers / released code independently of
fairjax.losses; gradients are compared with central finite differences of those
numpy formulas (or with the analytic gradient where the stop-gradient matters).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fairjax import losses
from fairjax.errors import UserError

B = 8


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fd_grads(f, xs, h=1e-6):
    """Central finite differences of the float64 scalar function f(*xs) w.r.t. every element."""
    xs = [np.asarray(x, np.float64) for x in xs]
    grads = []
    for i, x in enumerate(xs):
        g = np.zeros_like(x)
        for j in np.ndindex(x.shape):
            up = [y.copy() for y in xs]
            dn = [y.copy() for y in xs]
            up[i][j] += h
            dn[i][j] -= h
            g[j] = (f(*up) - f(*dn)) / (2 * h)
        grads.append(g)
    return grads


def jax_grads(fn, xs):
    """Gradients of the loss part of fn(*xs) -> (loss, metrics), under jit."""
    argnums = tuple(range(len(xs)))
    g = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=argnums))(*[jnp.asarray(x, jnp.float32) for x in xs])
    return [np.asarray(x) for x in g]


def check(fn, ref, xs, rel, vtol=2e-6, gtol=2e-5):
    xs = [np.asarray(x, np.float32).astype(np.float64) for x in xs]  # both sides see the same inputs
    loss, metrics = jax.jit(fn)(*[jnp.asarray(x, jnp.float32) for x in xs])
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert all(v.shape == () for v in metrics.values())
    assert rel(loss, ref(*xs)) < vtol
    for gj, gn in zip(jax_grads(fn, xs), fd_grads(ref, xs)):
        assert rel(gj, gn) < gtol, (gj, gn)
    return metrics


# ----------------------------------------------------------------------------- sft

def test_sft(rel):
    mse = np.random.default_rng(0).uniform(0.0, 2.0, B)
    m = check(losses.sft, lambda x: np.mean(x), [mse], rel)
    assert rel(m["mse"], mse.mean()) < 1e-6


# ----------------------------------------------------------------------------- diffusion-dpo

def test_diffusion_dpo_matches_reference_code_form(rel):
    """Reference (DiffusionDPO train.py): inside = -0.5*beta*((m_w - m_l) - (r_w - r_l))."""
    rng = np.random.default_rng(1)
    beta = 5000.0
    m_w, m_l, r_w, r_l = (rng.uniform(0.05, 0.15, B) + rng.normal(0, 2e-4, B) for _ in range(4))

    def ref(m_w, m_l, r_w, r_l):
        inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
        return np.mean(-np_logsigmoid(inside))

    def ours(m_w, m_l, r_w, r_l):
        return losses.diffusion_dpo(r_w - m_w, r_l - m_l, beta)

    # mse values of ~0.1 are differenced in float32 (error ~1e-8) and then scaled by 2500
    m = check(ours, ref, [m_w, m_l, r_w, r_l], rel, vtol=1e-4, gtol=1e-4)
    g_w, g_l = r_w - m_w, r_l - m_l
    assert m["accuracy"] == np.mean(g_w > g_l)
    assert rel(m["margin"], np.mean(g_w - g_l)) < 1e-3


def test_diffusion_dpo_on_g(rel):
    rng = np.random.default_rng(2)
    g_w, g_l = rng.normal(0, 1e-3, B), rng.normal(0, 1e-3, B)
    beta = 2000.0
    m = check(lambda a, b: losses.diffusion_dpo(a, b, beta),
              lambda a, b: np.mean(-np_logsigmoid(0.5 * beta * (a - b))), [g_w, g_l], rel)
    assert rel(m["g_w"], g_w.mean()) < 1e-6 and rel(m["g_l"], g_l.mean()) < 1e-6


# ----------------------------------------------------------------------------- popalign

def np_popalign(g, win, beta, alpha):
    g = np.asarray(g, np.float64)
    mw = g[win].mean() if win.any() else 0.0
    ml = g[~win].mean() if (~win).any() else 0.0
    k = alpha * mw + (1 - alpha) * ml
    s = np.where(win, 1.0, -1.0)
    return np.mean(-np_logsigmoid(s * beta * (g - k))), k


def np_popalign_grad_stopped(g, win, beta, alpha):
    """d/dg_i of mean(-ls(s beta (g - k))) with k held constant: -s_i beta sigmoid(-s_i beta (g_i - k)) / n."""
    _, k = np_popalign(g, win, beta, alpha)
    s = np.where(win, 1.0, -1.0)
    return -s * beta * np_sigmoid(-s * beta * (g - k)) / g.size


@pytest.mark.parametrize("alpha", [0.5, 0.75])
def test_popalign_value_and_stop_gradient(rel, alpha):
    rng = np.random.default_rng(3)
    n = 12
    g = rng.normal(0, 1e-3, n)
    win = np.arange(n) % 3 == 0  # 4 winners, 8 losers
    beta = 1500.0
    fn = jax.jit(lambda g, w: losses.popalign(g, w, beta, alpha))
    loss, m = fn(jnp.asarray(g, jnp.float32), jnp.asarray(win))
    ref, k = np_popalign(g, win, beta, alpha)
    assert rel(loss, ref) < 2e-6
    assert rel(m["k"], k) < 1e-5
    assert m["n_w"] == 4 and m["n_l"] == 8 and m["one_sided"] == 0
    assert rel(m["g_w"], g[win].mean()) < 1e-5 and rel(m["g_l"], g[~win].mean()) < 1e-5
    s = np.where(win, 1.0, -1.0)
    assert m["accuracy"] == np.mean(s * (g - k) > 0)

    grad = np.asarray(jax.grad(lambda g: fn(g, jnp.asarray(win))[0])(jnp.asarray(g, jnp.float32)))
    want = np_popalign_grad_stopped(g, win, beta, alpha)
    assert rel(grad, want) < 2e-5
    # ...and the gradient through k (no stop-gradient) is measurably different, so the
    # check above can fail.
    (full,) = fd_grads(lambda g: np_popalign(g, win, beta, alpha)[0], [g])
    assert rel(full, want) > 1e-2


def test_popalign_one_pair_equals_diffusion_dpo(rel):
    beta = 5000.0
    g_w, g_l = 3e-4, -1e-4
    pop = jax.jit(lambda g: losses.popalign(g, jnp.array([True, False]), beta)[0])
    dd = jax.jit(lambda g: losses.diffusion_dpo(g[:1], g[1:], beta)[0])
    g = jnp.array([g_w, g_l], jnp.float32)
    assert rel(pop(g), dd(g)) < 1e-6
    assert rel(pop(g), -np_logsigmoid(0.5 * beta * (g_w - g_l))) < 1e-5
    assert rel(jax.jit(jax.grad(pop))(g), jax.jit(jax.grad(dd))(g)) < 1e-6


def test_popalign_parts_with_global_totals_equal_the_whole_batch(rel):
    """Gradient accumulation's contract: the batch split into 4 parts (one of them with no loser),
    each part's loss with ``totals`` = the sums of ``popalign_rows`` over the whole batch; the mean
    of the parts' losses and gradients == the numpy loss and stop-gradient gradient of the whole
    batch, and the metrics are the whole batch's."""
    rng = np.random.default_rng(8)
    n, beta, alpha = 16, 800.0, 0.5
    g = rng.normal(0, 1e-3, n)
    win = np.r_[np.ones(4, bool), rng.random(n - 4) < 0.4]  # part 0 (rows 0..3) has winners only
    rows = jax.jit(losses.popalign_rows)(jnp.asarray(g, jnp.float32), jnp.asarray(win))
    totals = {k: jnp.sum(v) for k, v in rows.items()}
    part = jax.jit(jax.value_and_grad(lambda g, w, t: losses.popalign(g, w, beta, alpha, totals=t), has_aux=True))
    outs = [part(jnp.asarray(g[j:j + 4], jnp.float32), jnp.asarray(win[j:j + 4]), totals) for j in range(0, n, 4)]
    loss = np.mean([float(l) for (l, _), _ in outs])
    grad = np.concatenate([np.asarray(d) for _, d in outs]) / 4  # each part's mean is over its 4 rows
    ref, k = np_popalign(g, win, beta, alpha)
    assert rel(loss, ref) < 2e-6
    assert rel(grad, np_popalign_grad_stopped(g, win, beta, alpha)) < 2e-5
    m = outs[0][0][1]
    assert rel(m["k"], k) < 1e-5 and m["n_w"] == win.sum() and m["n_l"] == (~win).sum() and m["one_sided"] == 0
    # the same part with its own statistics (no totals) is another objective, so the check can fail
    own = np.mean([float(losses.popalign(jnp.asarray(g[j:j + 4], jnp.float32), win[j:j + 4], beta, alpha)[0])
                   for j in range(0, n, 4)])
    assert rel(own, ref) > 1e-3


@pytest.mark.parametrize("side", ["no_losers", "no_winners"])
def test_popalign_one_sided_batch(rel, side):
    """Documented guard: the empty side's mean counts as 0 (g at the reference) and one_sided = 1."""
    g = np.random.default_rng(4).normal(0, 1e-3, 6)
    win = np.ones(6, bool) if side == "no_losers" else np.zeros(6, bool)
    beta, alpha = 1000.0, 0.5
    loss, m = jax.jit(lambda g, w: losses.popalign(g, w, beta, alpha))(jnp.asarray(g, jnp.float32), jnp.asarray(win))
    ref, k = np_popalign(g, win, beta, alpha)
    assert rel(loss, ref) < 2e-6 and rel(m["k"], k) < 1e-5
    assert m["one_sided"] == 1
    grad = jax.jit(jax.grad(lambda g: losses.popalign(g, win, beta, alpha)[0]))(jnp.asarray(g, jnp.float32))
    assert np.all(np.isfinite(grad))
    assert rel(grad, np_popalign_grad_stopped(g, win, beta, alpha)) < 2e-5


def test_popalign_centring_is_global_under_sharding(rel):
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py should provide 8 virtual CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    n = 32
    rng = np.random.default_rng(5)
    g = rng.normal(0, 1e-3, n).astype(np.float32)
    win = rng.permutation(np.arange(n) < 11)  # uneven split across shards
    beta = 2000.0
    fn = jax.jit(lambda g, w: losses.popalign(g, w, beta))
    single = fn(jax.device_put(g, devices[0]), jax.device_put(win, devices[0]))
    shard = NamedSharding(mesh, P("data"))
    gs, ws = jax.device_put(g, shard), jax.device_put(win, shard)
    assert len(gs.sharding.device_set) == 8 and gs.addressable_shards[0].data.shape == (n // 8,)
    sharded = fn(gs, ws)
    _, k = np_popalign(g, win, beta, 0.5)
    assert rel(sharded[1]["k"], k) < 1e-5
    assert rel(sharded[1]["k"], single[1]["k"]) < 1e-6
    assert rel(sharded[0], single[0]) < 1e-6
    gsh = jax.jit(jax.grad(lambda g, w: losses.popalign(g, w, beta)[0]))(gs, ws)
    assert rel(gsh, np_popalign_grad_stopped(g.astype(np.float64), win, beta, 0.5)) < 2e-5


# ----------------------------------------------------------------------------- dpo / mdpo

def test_dpo(rel):
    rng = np.random.default_rng(6)
    xs = [rng.normal(-40, 3, B) for _ in range(4)]
    beta = 0.1

    def ref(pw, pl, rw, rl):
        return np.mean(-np_logsigmoid(beta * ((pw - rw) - (pl - rl))))

    m = check(lambda *a: losses.dpo(*a, beta), ref, xs, rel, vtol=1e-5, gtol=1e-4)
    pw, pl, rw, rl = xs
    assert m["accuracy"] == np.mean((pw - rw) > (pl - rl))
    assert rel(m["margin"], np.mean((pw - rw) - (pl - rl))) < 1e-4


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_mdpo(rel, delta):
    """mDPO (luka-group/mDPO mdpo_trainer.py): response + image-conditional + anchor terms."""
    rng = np.random.default_rng(7)
    xs = [rng.normal(-30, 4, B) for _ in range(6)]
    beta = 0.1

    def terms(c, r, cx, rc, rr, rcx):
        t1 = -np_logsigmoid(beta * ((c - rc) - (r - rr)))
        t2 = -np_logsigmoid(beta * ((c - rc) - (cx - rcx)))
        t3 = -np_logsigmoid(beta * (c - rc) - delta)
        return t1.mean(), t2.mean(), t3.mean()

    m = check(lambda *a: losses.mdpo(*a, beta=beta, anchor_delta=delta), lambda *a: sum(terms(*a)), xs, rel,
              vtol=1e-5, gtol=1e-4)
    t1, t2, t3 = terms(*xs)
    assert rel(m["loss_response"], t1) < 1e-5 and rel(m["loss_image"], t2) < 1e-5 and rel(m["loss_anchor"], t3) < 1e-5
    c, r, cx, rc, rr, rcx = xs
    assert m["accuracy"] == np.mean((c - rc) > (r - rr))
    assert m["image_accuracy"] == np.mean((c - rc) > (cx - rcx))


# ----------------------------------------------------------------------------- bpo

def np_bpo(lp_a, lp_b, beta, variant):
    lo = lambda lp: lp - np.log1p(-np.exp(lp))  # released form, float64
    d = np_sigmoid(lo(lp_a) - lo(lp_b)) - 0.5
    per = np.log1p(d**2) if variant == "v1" else d**2
    return beta * per.mean()


@pytest.mark.parametrize("variant", ["v1", "squared", "v2"])
def test_bpo_values_and_gradients(rel, variant):
    rng = np.random.default_rng(8)
    lp_a, lp_b = rng.uniform(-6.0, -0.05, B), rng.uniform(-6.0, -0.05, B)
    ref_variant = "v1" if variant == "v1" else "squared"
    check(lambda a, b: losses.bpo(a, b, beta=1.5, variant=variant),
          lambda a, b: np_bpo(a, b, 1.5, ref_variant), [lp_a, lp_b], rel, vtol=1e-5, gtol=1e-4)


def test_bpo_symmetric_minimal_and_order_free(rel):
    rng = np.random.default_rng(9)
    a = jnp.asarray(rng.uniform(-5.0, -0.1, B), jnp.float32)
    b = jnp.asarray(rng.uniform(-5.0, -0.1, B), jnp.float32)
    f = jax.jit(lambda a, b: losses.bpo(a, b)[0])
    assert rel(f(a, b), f(b, a)) < 1e-6
    df = jax.jit(jax.grad(f, argnums=(0, 1)))
    ga, gb = df(a, b)
    ha, hb = df(b, a)
    assert rel(ga, hb) < 1e-6 and rel(gb, ha) < 1e-6
    # minimal (zero, flat) at equal likelihoods, positive elsewhere
    assert f(a, a) == 0.0
    assert np.all(np.asarray(df(a, a)[0]) == 0.0)
    assert f(a, b) > 0 and f(a, a + 0.01) > 0 and f(a, a - 0.01) > 0
    # order of the pairs in the batch does not matter
    perm = rng.permutation(B)
    assert rel(f(a[perm], b[perm]), f(a, b)) < 1e-6


def test_bpo_finite_near_zero_logprob():
    lp_a = jnp.array([0.0, -1e-12, -1e-8, -1e-7, -1e-6, -1e-3, -20.0, -80.0], jnp.float32)
    lp_b = jnp.array([-0.5, 0.0, -1e-7, -2.0, 0.0, -1e-9, -80.0, -1e-30], jnp.float32)
    for variant in ("v1", "squared"):
        f = functools.partial(losses.bpo, variant=variant)
        loss, m = jax.jit(f)(lp_a, lp_b)
        ga, gb = jax.jit(jax.grad(lambda a, b: f(a, b)[0], argnums=(0, 1)))(lp_a, lp_b)
        assert np.isfinite(loss) and all(np.all(np.isfinite(v)) for v in m.values())
        assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))


def test_log1mexp_accuracy(rel):
    x = -np.logspace(-6, 1.5, 200)
    got = np.asarray(jax.jit(losses.log1mexp)(jnp.asarray(x, jnp.float32)))
    import mpmath
    mpmath.mp.dps = 40  # float64 log(-expm1(x)) itself loses digits for x << 0
    want = np.array([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(float(v))))) for v in x.astype(np.float32)])
    assert np.max(np.abs(got - want) / np.abs(want)) < 1e-5
    grad = jax.jit(jax.vmap(jax.grad(losses.log1mexp)))(jnp.asarray(x, jnp.float32))
    assert np.all(np.isfinite(grad))
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x)
    xs = x.astype(np.float32).astype(np.float64)
    assert rel(grad, -1.0 / np.expm1(-xs)) < 1e-5


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs():
    with pytest.raises(UserError, match="unknown BPO variant 'v9'"):
        losses.bpo(jnp.zeros(2) - 1, jnp.zeros(2) - 1, variant="v9")
    with pytest.raises(ValueError, match=r"g_w\(3,\), g_l\(4,\)"):
        losses.diffusion_dpo(jnp.zeros(3), jnp.zeros(4), 1.0)
    with pytest.raises(ValueError, match="1-D per-sample"):
        losses.popalign(jnp.zeros((2, 2)), jnp.ones((2, 2), bool), 1.0)
