"""Pure pieces of the diffusion preference losses' implicit reward ``g = mse_ref - mse_policy``:
noise and timestep shared within a pair, per-sample denoising error, and the pair view of a batch."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def shared_noise(rng: jax.Array, slot: jax.Array, shape: Sequence[int], t_max: int, t_min: int = 0):
    """``(eps (B, *shape) float32, t (B,) int32)`` with ``t ~ U{t_min .. t_max - 1}`` (``t_max`` at
    most the scheduler's num_train_timesteps);
    row ``i`` draws from ``fold_in(rng, slot_i)``, so rows with the same slot (the two images of a
    pair) get the same noise and timestep, independently of how the batch is sharded."""

    def one(s):
        k_eps, k_t = jax.random.split(jax.random.fold_in(rng, s))
        return (jax.random.normal(k_eps, tuple(shape), jnp.float32),
                jax.random.randint(k_t, (), t_min, t_max, jnp.int32))

    return jax.vmap(one)(slot)


def per_sample_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``mean_{C,H,W} (pred - target)^2`` per row, in float32."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(d * d, axis=tuple(range(1, d.ndim)))


def by_slot(g: jax.Array, is_winner: jax.Array, slot: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(g_w, g_l)`` of shape (rows / 2,): the winner's and the loser's value of each slot in the
    batch, in increasing slot order. Every slot present holds one winner row and one loser row;
    the slots need not be ``0..rows/2-1`` (a micro-batch of a global batch holds some of its slots)."""
    win = is_winner.astype(bool)
    order = jnp.lexsort((slot, jnp.logical_not(win)))  # winners by slot, then losers by slot
    n = g.shape[0] // 2
    s = g[order]
    return s[:n], s[n:]
