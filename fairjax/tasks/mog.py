"""The PopAlign paper's 1-D population experiment (sec. 5), with exact likelihoods.

The "model" is a 1-D Gaussian mixture ``p(x) = sum_j softmax(logits)_j N(x; mu_j, sigma_j)``
with trainable logits, means and log-sigmas, initialised at the reference
(weights softmax(1, 0, -1), means (-7, 0, 7), sigmas 1). The preference data
has no sample from the middle component: winners are balanced between the
outer components, losers are drawn from the reference restricted to them.

The model adapter produces the per-sample implicit reward of the one loss
interface, ``g = log p_policy(x) - log p_ref(x)`` (exact log-densities); SFT
gets the per-sample negative log-likelihood of winners in place of the
diffusion mse.

Fixed point (docs/reference.md): PopAlign drives ``log(p_j / ref_j) = k + log(w_j / l_j) / beta``
for the groups in the data, so ``p_1/p_3 = (ref_1/ref_3) exp((log(w_1/l_1) - log(w_3/l_3)) / beta)``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fairjax import config as config_lib
from fairjax import losses
from fairjax.errors import ConfigError, UserError


def mixture_log_prob(params: dict, x: jax.Array) -> jax.Array:
    """``log sum_j w_j N(x; mu_j, sigma_j)`` with ``w = softmax(logits)``, ``sigma = exp(log_sigmas)``."""
    log_w = jax.nn.log_softmax(params["logits"])
    z = (x[:, None] - params["means"]) / jnp.exp(params["log_sigmas"])
    comp = -0.5 * z**2 - params["log_sigmas"] - 0.5 * jnp.log(2 * jnp.pi)
    return jax.scipy.special.logsumexp(log_w + comp, axis=-1)


def reference_params(c: ml_collections.ConfigDict) -> dict:
    return {
        "logits": jnp.asarray(c.ref_logits, jnp.float32),
        "means": jnp.asarray(c.means, jnp.float32),
        "log_sigmas": jnp.log(jnp.asarray(c.sigmas, jnp.float32)),
    }


def check_mixture(c: ml_collections.ConfigDict) -> None:
    """One entry per component in ``ref_logits``, ``means`` and ``sigmas`` (finite numbers, sigmas > 0), and
    ``winner_components`` distinct indices of them: a one-line :class:`ConfigError` naming the key otherwise."""
    def numbers(key):
        try:
            v = np.asarray(c[key], np.float64)
        except (TypeError, ValueError):
            v = None
        if v is None or v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
            raise ConfigError(f"config.mog.{key}={c[key]!r} must be a non-empty list of finite numbers, one per "
                              "mixture component")
        return v

    sizes = {key: len(numbers(key)) for key in ("ref_logits", "means", "sigmas")}
    if len(set(sizes.values())) > 1:
        raise ConfigError("config.mog.ref_logits, means and sigmas need one entry per mixture component, got "
                          + ", ".join(f"{n} {k}" for k, n in sizes.items()) + "; give the three the same length")
    if (numbers("sigmas") <= 0).any():
        raise ConfigError(f"config.mog.sigmas={c.sigmas!r} is out of range: every sigma must be > 0")
    k = sizes["means"]
    comps = c.winner_components
    if not all(isinstance(j, (int, np.integer)) and not isinstance(j, bool) and 0 <= j < k for j in comps) or \
            len(set(comps)) != len(comps):
        raise ConfigError(f"config.mog.winner_components={comps!r} must be distinct component indices in [0, {k})")


def make_dataset(c: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Winners balanced over ``winner_components``; losers from the reference restricted to them.

    Returns ``x``, ``is_winner`` and the generating ``component`` of each sample
    (the "demographic group" a classifier would report), winners first.
    """
    check_mixture(c)
    comps = np.asarray(c.winner_components)
    if c.n_samples < 4 or len(comps) < 2:
        raise UserError(f"mog: need n_samples >= 4 and >= 2 winner_components, got {c.n_samples}, {tuple(comps)}")
    rng = np.random.default_rng(c.data_seed)
    ref_w = np.exp(np.asarray(c.ref_logits, np.float64))
    ref_w /= ref_w.sum()
    n_win = c.n_samples // 2
    n_lose = c.n_samples - n_win
    win_c = rng.permutation(comps[np.arange(n_win) % len(comps)])  # exactly balanced
    lose_p = ref_w[comps] / ref_w[comps].sum()
    lose_c = comps[rng.choice(len(comps), n_lose, p=lose_p)]
    comp = np.concatenate([win_c, lose_c])
    means = np.asarray(c.means, np.float64)
    sigmas = np.asarray(c.sigmas, np.float64)
    x = rng.normal(means[comp], sigmas[comp]).astype(np.float32)
    is_winner = np.arange(c.n_samples) < n_win
    return {"x": x, "is_winner": is_winner, "component": comp.astype(np.int32)}


def group_frequencies(data: dict[str, np.ndarray], comps) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies of each winner component among winners and among losers."""
    w = np.array([np.mean(data["component"][data["is_winner"]] == j) for j in comps])
    l = np.array([np.mean(data["component"][~data["is_winner"]] == j) for j in comps])
    return w, l


def fixed_point_log_ratios(ref_w: np.ndarray, win_f: np.ndarray, lose_f: np.ndarray, beta: float) -> np.ndarray:
    """``log(p_j) - log(p_0)`` at PopAlign's fixed point for the groups in the data."""
    lp = np.log(ref_w) + np.log(win_f / lose_f) / beta
    return lp - lp[0]


#: valid values of the keys ``configs/popalign_mog.py`` adds to the trainer's (checked with
#: :data:`fairjax.trainer.TRAIN_RANGES` before anything is built)
RANGES = {
    "loss": config_lib.one_of("popalign", "sft"),
    "beta": config_lib.floats(0, lo_open=True),
    "alpha": config_lib.floats(0, 1),
    "calibrate_beta": config_lib.BOOL,
    "mog.n_samples": config_lib.ints(4),
    "mog.data_seed": config_lib.SEED,
}


class MogTask:
    """Task for :func:`fairjax.trainer.train` (see its docstring for the contract)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        c = config.mog
        if config.loss not in ("popalign", "sft"):
            raise UserError(f"mog: config.loss must be 'popalign' or 'sft', got {config.loss!r}")
        self.data = make_dataset(c)
        comps = list(c.winner_components)
        self.ref_w = np.asarray(jax.nn.softmax(jnp.asarray(c.ref_logits, jnp.float32)), np.float64)
        self.win_f, self.lose_f = group_frequencies(self.data, comps)
        self.beta = float(config.beta)
        if config.calibrate_beta:
            self.beta = float(losses.calibrate_beta(self.ref_w[comps], self.win_f, self.lose_f))
        if config.loss == "sft":
            keep = self.data["is_winner"]
            self.train_data = {k: v[keep] for k, v in self.data.items()}
        else:
            self.train_data = self.data
        n = len(self.train_data["x"])
        if config.batch_size > n:
            raise UserError(f"mog: batch_size {config.batch_size} exceeds the {n} training samples")

    def init(self, rng):
        ref = reference_params(self.config.mog)
        return jax.tree.map(jnp.array, ref), ref

    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        """Global batch ``step`` of an epoch-wise permutation, this host's contiguous slice."""
        bs = self.config.batch_size
        n = len(self.train_data["x"])
        per_epoch = n // bs
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(n) if bs < n else np.arange(n)
        idx = order[i * bs:(i + 1) * bs]
        local = bs // process_count
        idx = idx[process_index * local:(process_index + 1) * local]
        return {"x": self.train_data["x"][idx], "is_winner": self.train_data["is_winner"][idx]}

    @property
    def uses_batch_stats(self) -> bool:
        """PopAlign's ``k`` is a statistic of the whole global batch (trainer contract)."""
        return self.config.loss == "popalign"

    def batch_stats(self, trainable, frozen, batch, rng) -> dict:
        g = mixture_log_prob(trainable, batch["x"]) - mixture_log_prob(frozen, batch["x"])
        return losses.popalign_rows(g, batch["is_winner"])

    def loss(self, trainable, frozen, batch, rng, stats=None):
        logp = mixture_log_prob(trainable, batch["x"])
        if self.config.loss == "sft":
            return losses.sft(-logp)
        g = logp - mixture_log_prob(frozen, batch["x"])
        totals = None if stats is None else stats["total"]
        return losses.popalign(g, batch["is_winner"], self.beta, alpha=self.config.alpha, totals=totals)

    def finish(self, trainable, frozen, workdir: str) -> dict:
        comps = list(self.config.mog.winner_components)
        w = np.asarray(jax.nn.softmax(trainable["logits"]), np.float64)
        fp = fixed_point_log_ratios(self.ref_w[comps], self.win_f, self.lose_f, self.beta)
        summary = {
            "loss": self.config.loss,
            "beta": self.beta,
            "alpha": float(self.config.alpha),
            "reference": _describe(frozen),
            "trained": _describe(trainable),
            "winner_group_freqs": self.win_f.tolist(),
            "loser_group_freqs": self.lose_f.tolist(),
            "outer_ratio_trained": float(w[comps[0]] / w[comps[-1]]),
            "outer_ratio_fixed_point": float(np.exp(fp[0] - fp[-1])),
            "outer_ratio_reference": float(self.ref_w[comps[0]] / self.ref_w[comps[-1]]),
            "calibrated_beta": float(losses.calibrate_beta(self.ref_w[comps], self.win_f, self.lose_f)),
        }
        if jax.process_index() == 0:
            _write_json(os.path.join(workdir, "mixture.json"), summary)
            plot_densities(frozen, trainable, self.data, os.path.join(workdir, "density.png"),
                           title=f"{self.config.loss} (beta={self.beta:.3g})")
            summary["outputs"] = [os.path.join(workdir, "mixture.json"), os.path.join(workdir, "density.png")]
        return summary


def _describe(p) -> dict:
    return {
        "weights": np.asarray(jax.nn.softmax(p["logits"])).round(6).tolist(),
        "means": np.asarray(p["means"]).round(6).tolist(),
        "sigmas": np.asarray(jnp.exp(p["log_sigmas"])).round(6).tolist(),
    }


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def plot_densities(ref, trained, data, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = jnp.linspace(-12.0, 12.0, 1200)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(xs, np.exp(mixture_log_prob(ref, xs)), label="reference", color="0.4", lw=2)
    ax.plot(xs, np.exp(mixture_log_prob(trained, xs)), label="trained", color="C3", lw=2)
    win = data["is_winner"]
    ax.hist(data["x"][win], bins=80, density=True, alpha=0.25, color="C2", label="winners")
    ax.hist(data["x"][~win], bins=80, density=True, alpha=0.25, color="C0", label="losers")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
