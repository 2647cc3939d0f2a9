"""Pure preference losses over per-sample implicit-reward terms.

One interface for every model (docs/design.md): a model adapter turns a batch into
per-sample terms and a loss here turns those into ``(loss, metrics)``; a loss
never sees a model.

* diffusion models: ``g = mse_ref - mse_policy`` per sample (the policy beats
  the frozen reference on that sample when ``g > 0``);
* token models: ``g = logp_policy - logp_ref`` (summed or mean log-probs);
* exact-likelihood toys: ``g = log p_policy(x) - log p_ref(x)``.

Every function is pure, jittable, differentiable in its array arguments, and
returns ``(loss, metrics)`` with ``loss`` a float32 scalar and ``metrics`` a
dict of float32 scalars (already free of gradient: they are meant for logging).
Inputs are 1-D per-sample vectors of one length ``B`` (paired losses) unless a
docstring says otherwise; mismatched shapes are a ``ValueError`` at trace time (a bug in the adapter,
not user input); a bad option (e.g. an unknown BPO variant) is a ``UserError``.

Notation: ``ls = log_sigmoid``, ``sg = stop_gradient``, ``mean`` over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fairjax.errors import UserError

Metrics = dict[str, jax.Array]

__all__ = ["sft", "diffusion_dpo", "popalign", "popalign_rows", "dpo", "mdpo", "bpo", "log1mexp", "log_odds", "calibrate_beta"]


# ----------------------------------------------------------------------------- helpers

def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _same_shape(names: tuple[str, ...], *xs) -> None:
    shapes = [jnp.shape(x) for x in xs]
    if any(s != shapes[0] for s in shapes) or len(shapes[0]) != 1:
        got = ", ".join(f"{n}{s}" for n, s in zip(names, shapes))
        raise ValueError(f"expected 1-D per-sample vectors of one length, got {got}; "
                         "pass one value per sample (reduce over tokens/pixels first)")


def _metrics(**kw) -> Metrics:
    return {k: jax.lax.stop_gradient(_f32(v)) for k, v in kw.items()}


def _pair_metrics(g_w, g_l) -> Metrics:
    """accuracy = mean[g_w > g_l], g_w / g_l = batch means, margin = mean(g_w - g_l)."""
    return _metrics(accuracy=jnp.mean(g_w > g_l), g_w=jnp.mean(g_w), g_l=jnp.mean(g_l),
                    margin=jnp.mean(g_w - g_l))


# ----------------------------------------------------------------------------- diffusion

def sft(mse_w) -> tuple[jax.Array, Metrics]:
    """Supervised baseline on winners only, no reference model.

    ``loss = mean_i mse_w[i]``  (``mse_w`` = per-sample denoising mse of the policy).
    Metrics: ``mse``.
    """
    mse_w = _f32(mse_w)
    _same_shape(("mse_w",), mse_w)
    loss = jnp.mean(mse_w)
    return loss, _metrics(mse=loss)


def diffusion_dpo(g_w, g_l, beta) -> tuple[jax.Array, Metrics]:
    """Diffusion-DPO (Wallace et al. 2023) on pairs, ``g = mse_ref - mse_policy``.

    ``loss = mean_i -ls(0.5 * beta * (g_w[i] - g_l[i]))``

    which is the reference code's ``-ls(-0.5*beta*((m_w - m_l) - (r_w - r_l)))``
    with ``m`` the policy mse and ``r`` the reference mse
    (``g_w - g_l = (r_w - m_w) - (r_l - m_l)``).
    Metrics: ``accuracy`` (mean[g_w > g_l]), ``g_w``, ``g_l``, ``margin`` (mean g_w - g_l).
    """
    g_w, g_l = _f32(g_w), _f32(g_l)
    _same_shape(("g_w", "g_l"), g_w, g_l)
    loss = jnp.mean(-jax.nn.log_sigmoid(0.5 * beta * (g_w - g_l)))
    return loss, _pair_metrics(g_w, g_l)


def popalign_rows(g, is_winner) -> Metrics:
    """Per-sample terms whose sums over a batch are PopAlign's side statistics:
    ``g_w = g * [win]``, ``n_w = [win]``, ``g_l = g * [lose]``, ``n_l = [lose]`` (float32, no gradient).

    Summed over the whole global batch they give :func:`popalign`'s ``totals`` (what the trainer's
    batch-statistics pass hands a micro-batch under gradient accumulation).
    """
    g = jax.lax.stop_gradient(_f32(g))
    is_winner = jnp.asarray(is_winner)
    _same_shape(("g", "is_winner"), g, is_winner)
    win = is_winner.astype(bool)
    w = win.astype(jnp.float32)
    return {"g_w": g * w, "n_w": w, "g_l": g * (1.0 - w), "n_l": 1.0 - w}


def popalign(g, is_winner, beta, alpha=0.5, totals=None) -> tuple[jax.Array, Metrics]:
    """PopAlign (population-level preference) over a batch of winners and losers.

    ``g = mse_ref - mse_policy`` per sample, ``s = +1`` for winners, ``-1`` for losers,

    ``k = sg(alpha * mean(g[win]) + (1 - alpha) * mean(g[lose]))``,
    ``loss = mean_i -ls(s_i * beta * (g_i - k))``.

    The means are over the whole batch ``g`` as given; under ``jit`` with ``g``
    sharded over a mesh they are global (XLA inserts the reductions), so every
    device sees the same ``k``. Because ``k`` is a stop-gradient,
    ``d loss / d g_i = -s_i * beta * sigmoid(-s_i * beta * (g_i - k)) / B``.
    With one winner and one loser and ``alpha = 0.5`` this equals
    :func:`diffusion_dpo` with the same ``beta``.

    ``totals`` (``{g_w, n_w, g_l, n_l}``: the sums of :func:`popalign_rows` over a larger
    batch that ``g`` is one part of): the side means, hence ``k``, are those of the larger
    batch, ``mean(g[win]) = totals.g_w / totals.n_w``; the loss is still the mean over ``g``'s
    samples, so the mean of the parts' losses (equal sizes) is the larger batch's loss, and
    likewise its gradient (``k`` is held fixed either way). ``None``: ``g``'s own sums.

    Empty side: a batch with no winners (or no losers) takes that side's mean
    as 0, the value of ``g`` at the reference model, so ``k`` is ``(1-alpha)*mean(g[lose])``
    (or ``alpha*mean(g[win])``); the loss and its gradient stay finite and the
    metric ``one_sided`` is 1 (0 otherwise). ``g_w`` / ``g_l`` report 0 for an
    empty side too.

    Metrics: ``accuracy`` (fraction with ``s_i * (g_i - k) > 0``), ``g_w``, ``g_l``
    (side means), ``margin`` (``g_w - g_l``), ``k``, ``n_w``, ``n_l``, ``one_sided``
    (the side statistics of ``totals`` when given).
    """
    g = _f32(g)
    is_winner = jnp.asarray(is_winner)
    _same_shape(("g", "is_winner"), g, is_winner)
    win = is_winner.astype(bool)
    if totals is None:
        totals = {k: jnp.sum(v) for k, v in popalign_rows(g, is_winner).items()}
    n_w, n_l = _f32(totals["n_w"]), _f32(totals["n_l"])
    g_w = _f32(totals["g_w"]) / jnp.maximum(n_w, 1.0)
    g_l = _f32(totals["g_l"]) / jnp.maximum(n_l, 1.0)
    k = jax.lax.stop_gradient(alpha * g_w + (1.0 - alpha) * g_l)
    s = jnp.where(win, 1.0, -1.0)
    z = s * beta * (g - k)
    loss = jnp.mean(-jax.nn.log_sigmoid(z))
    return loss, _metrics(accuracy=jnp.mean(z > 0), g_w=g_w, g_l=g_l, margin=g_w - g_l, k=k,
                          n_w=n_w, n_l=n_l, one_sided=(n_w == 0) | (n_l == 0))


# ----------------------------------------------------------------------------- token models

def dpo(logp_w, logp_l, ref_w, ref_l, beta) -> tuple[jax.Array, Metrics]:
    """DPO (Rafailov et al. 2023) on response log-probs.

    ``g_w = logp_w - ref_w``, ``g_l = logp_l - ref_l``,
    ``loss = mean_i -ls(beta * (g_w[i] - g_l[i]))``.
    Metrics: ``accuracy`` (mean[g_w > g_l]), ``g_w``, ``g_l``, ``margin``.
    """
    xs = [_f32(x) for x in (logp_w, logp_l, ref_w, ref_l)]
    _same_shape(("logp_w", "logp_l", "ref_w", "ref_l"), *xs)
    logp_w, logp_l, ref_w, ref_l = xs
    g_w, g_l = logp_w - ref_w, logp_l - ref_l
    loss = jnp.mean(-jax.nn.log_sigmoid(beta * (g_w - g_l)))
    return loss, _pair_metrics(g_w, g_l)


def mdpo(c, r, c_corrupt, ref_c, ref_r, ref_c_corrupt, beta=0.1, anchor_delta=0.0) -> tuple[jax.Array, Metrics]:
    """mDPO (Wang et al. 2024, "mDPO: Conditional Preference Optimization for MLLMs").

    ``c`` / ``r`` = summed log-prob of the chosen / rejected response given the
    image, ``c_corrupt`` = chosen response given the corrupted image; ``ref_*`` the
    same under the reference. With ``g_c = c - ref_c``, ``g_r = r - ref_r``,
    ``g_x = c_corrupt - ref_c_corrupt``::

        loss = mean_i [ -ls(beta*(g_c - g_r))            # response preference
                        -ls(beta*(g_c - g_x))            # image-conditional preference
                        -ls(beta*g_c - anchor_delta) ]   # anchor: chosen reward > delta

    as in the released trainer (luka-group/mDPO ``mdpo_trainer.py``), whose anchor is
    ``-ls(beta*(c - ref_c))``, i.e. the paper's ``delta = 0`` (our default).
    Metrics: ``loss_response``, ``loss_image``, ``loss_anchor`` (batch means of each term),
    ``accuracy`` (mean[g_c > g_r]), ``image_accuracy`` (mean[g_c > g_x]), ``g_w`` (= g_c),
    ``g_l`` (= g_r), ``g_corrupt``, ``margin`` (mean g_c - g_r), ``image_margin``.
    """
    xs = [_f32(x) for x in (c, r, c_corrupt, ref_c, ref_r, ref_c_corrupt)]
    _same_shape(("c", "r", "c_corrupt", "ref_c", "ref_r", "ref_c_corrupt"), *xs)
    c, r, cx, ref_c, ref_r, ref_cx = xs
    g_c, g_r, g_x = c - ref_c, r - ref_r, cx - ref_cx
    l_resp = jnp.mean(-jax.nn.log_sigmoid(beta * (g_c - g_r)))
    l_img = jnp.mean(-jax.nn.log_sigmoid(beta * (g_c - g_x)))
    l_anchor = jnp.mean(-jax.nn.log_sigmoid(beta * g_c - anchor_delta))
    loss = l_resp + l_img + l_anchor
    m = _pair_metrics(g_c, g_r)
    m.update(_metrics(loss_response=l_resp, loss_image=l_img, loss_anchor=l_anchor,
                      image_accuracy=jnp.mean(g_c > g_x), g_corrupt=jnp.mean(g_x),
                      image_margin=jnp.mean(g_c - g_x)))
    return loss, m


# ----------------------------------------------------------------------------- BPO

def log1mexp(x) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012).

    ``log(-expm1(x))`` for ``x > -log 2``, ``log1p(-exp(x))`` otherwise; each branch
    is evaluated on an input that is safe for it so that gradients stay finite.
    ``x = 0`` gives ``-inf`` (callers clamp first).
    """
    x = jnp.asarray(x)
    near0 = x > -jnp.log(2.0).astype(x.dtype)
    a = jnp.log(-jnp.expm1(jnp.where(near0, x, -1.0)))
    b = jnp.log1p(-jnp.exp(jnp.where(near0, -1.0, x)))
    return jnp.where(near0, a, b)


def log_odds(lp, eps=1e-6) -> jax.Array:
    """Log-odds of a probability given as a log-prob ``lp <= 0``: ``lp - log(1 - exp(lp))``.

    ``lp`` is clamped to ``<= -eps`` first: at ``lp = 0`` the odds are infinite and
    the gradient ``1 / (1 - exp(lp))`` diverges; the clamp keeps both finite
    (``lp`` in ``(-eps, 0]`` then has zero gradient). ``eps = 1e-6`` bounds the
    log-odds by about 13.8.
    """
    lp = jnp.minimum(jnp.asarray(lp), -eps)
    return lp - log1mexp(lp)


_BPO_VARIANTS = ("v1", "v2", "squared")


def bpo(lp_a, lp_b, beta=1.0, variant="v1", eps=1e-6) -> tuple[jax.Array, Metrics]:
    """Balanced preference loss (BPO) on explicit pairs ``(a_i, b_i)``, no reference model.

    ``lp`` = mean log-prob of a sample's image tokens (``<= 0``), ``lo = log_odds(lp)``
    ``= lp - log(1 - exp(lp))``, ``d_i = sigmoid(lo_a[i] - lo_b[i]) - 0.5``:

    * ``"v1"`` (the released ``bpo_loss_v1`` of Unified_MLLM_Fairness):
      ``loss = beta * mean_i log1p(d_i ** 2)``;
    * ``"squared"`` (alias ``"v2"``): ``loss = beta * mean_i d_i ** 2``. Note: this is
      NOT the released code's ``bpo_loss_v2`` (a thresholded extra-penalty loss).

    Symmetric in ``a <-> b``, minimal (0) where ``lp_a = lp_b``, independent of the
    order of the pairs. ``eps`` is the clamp of :func:`log_odds`.
    Metrics: ``balance`` (mean |d|), ``accuracy`` (mean[lo_a > lo_b]), ``g_w`` / ``g_l``
    (mean lo_a / lo_b), ``margin`` (mean lo_a - lo_b).
    """
    if variant not in _BPO_VARIANTS:
        raise UserError(f"unknown BPO variant {variant!r}; use one of {', '.join(_BPO_VARIANTS)}")
    lp_a, lp_b = _f32(lp_a), _f32(lp_b)
    _same_shape(("lp_a", "lp_b"), lp_a, lp_b)
    lo_a, lo_b = log_odds(lp_a, eps), log_odds(lp_b, eps)
    d = jax.nn.sigmoid(lo_a - lo_b) - 0.5
    per = jnp.log1p(d * d) if variant == "v1" else d * d
    loss = beta * jnp.mean(per)
    m = _pair_metrics(lo_a, lo_b)
    m["balance"] = jax.lax.stop_gradient(jnp.mean(jnp.abs(d)))
    return loss, m


def calibrate_beta(ref_freqs, win_freqs, lose_freqs) -> float:
    """The beta at which PopAlign's fixed point is balanced across the groups.

    PopAlign's fixed point (docs/reference.md) is, for each group ``j`` present in
    both the winning and the losing sets,
    ``log p_j = log ref_j + k + d_j / beta`` with ``d_j = log(w_j / l_j)``.
    Balance asks ``log p_j`` to be equal for all ``j``, i.e.
    ``log ref_j + u d_j = c`` with ``u = 1/beta``. With two groups this has the
    exact solution ``beta = -(d_1 - d_2) / (log ref_1 - log ref_2)``; with more,
    ``(u, c)`` is the least-squares solution
    ``u = -cov(log ref, d) / var(d)`` over the groups.

    Args are frequencies over the same groups (any positive scale: only
    differences of logs matter): the base model's group frequencies, and the
    group frequencies among winners and among losers. Raises ``UserError``
    when a group is missing from a set, when the sets carry no signal, or when
    no positive beta moves the groups toward balance.
    """
    ref = np.asarray(ref_freqs, np.float64)
    win = np.asarray(win_freqs, np.float64)
    lose = np.asarray(lose_freqs, np.float64)
    if not (ref.shape == win.shape == lose.shape) or ref.ndim != 1 or ref.size < 2:
        raise UserError(f"calibrate_beta needs three 1-D frequency vectors over the same >= 2 groups, "
                        f"got shapes {ref.shape}, {win.shape}, {lose.shape}")
    for name, f in (("reference", ref), ("winner", win), ("loser", lose)):
        if np.any(~(f > 0)):
            bad = np.flatnonzero(~(f > 0)).tolist()
            raise UserError(f"calibrate_beta: group(s) {bad} have zero {name} frequency; "
                            f"pass only groups present in the reference, winning and losing sets")
    r = np.log(ref)
    d = np.log(win) - np.log(lose)
    dc, rc = d - d.mean(), r - r.mean()
    var = float(np.sum(dc * dc))
    if var <= 1e-12:
        raise UserError("calibrate_beta: winners and losers have the same group proportions; "
                        "the preference data carries no population signal to calibrate on")
    u = -float(np.sum(rc * dc)) / var
    if u <= 0:
        raise UserError("calibrate_beta: no positive beta moves the groups toward balance "
                        "(the winning set favours the groups the reference already over-represents)")
    return 1.0 / u
