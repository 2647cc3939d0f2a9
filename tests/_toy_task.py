"""A small Task for the trainer tests: a 2-layer MLP scored with a PopAlign-like loss.

The "implicit reward" of example i is ``g_i = f_policy(x_i) - f_ref(x_i)`` (f = the MLP's
scalar output, the reference = the frozen initial copy), ``s_i = +1`` winners / ``-1``
losers, and with ``centre=True``

    k = stop_gradient(0.5 * mean(g[s=+1]) + 0.5 * mean(g[s=-1]))     (over the global batch)
    loss = mean(-log_sigmoid(s * beta * (g - k)))

``init_in_jit=False`` makes init eager (host numpy), ``with_ref=False`` leaves ``frozen = {}``
(then ``g = f_policy``).  ``signal_at_step`` sends SIGTERM to this process while drawing that batch (preemption).
With ``centre=False`` the loss is a plain per-example mean (k = 0).  ``noise`` adds
``noise * normal(fold_in(rng, row))`` to the inputs (``row`` = the example's position in the
global batch) so the step randomness is exercised.  ``k`` is declared a batch statistic
(``uses_batch_stats``): under gradient accumulation it stays the global batch's.
Data: global batch ``step`` is drawn from ``np.random.default_rng([seed, step])``;
process i of n takes rows ``[i*B/n, (i+1)*B/n)``.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


class MLP(nn.Module):
    hidden: int = 16
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        h = nn.gelu(h)
        return nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(h)[..., 0]


class ToyTask:
    def __init__(self, config=None, dim=8, hidden=16, beta=2.0, centre=True, noise=0.01, data_seed=1,
                 nan_at_step=None, sleep=0.0, out_dir=None, signal_at_step=None,
                 init_in_jit=True, with_ref=True):
        self.config = config if config is not None else ml_collections.ConfigDict()
        self.dim, self.beta, self.centre, self.noise = dim, beta, centre, noise
        self.data_seed, self.nan_at_step, self.sleep = data_seed, nan_at_step, sleep
        self.signal_at_step = signal_at_step
        self.init_in_jit, self.with_ref = init_in_jit, with_ref
        self.batches_drawn = []
        self.model = MLP(hidden)
        self.out_dir = out_dir
        self.final = None

    def init(self, rng):
        p = self.model.init(rng, jnp.zeros((1, self.dim), jnp.float32))["params"]
        if not self.init_in_jit:  # eager init, as a task reading weights from disk would: host numpy
            p = jax.tree.map(np.asarray, p)
        return p, ({"ref": p} if self.with_ref else {})

    def global_batch(self, step, batch_size):
        r = np.random.default_rng([self.data_seed, step])
        x = r.normal(size=(batch_size, self.dim)).astype(np.float32)
        s = np.where(np.arange(batch_size) % 2 == 0, 1.0, -1.0).astype(np.float32)
        if self.nan_at_step is not None and step == self.nan_at_step:
            x[0, 0] = np.nan
        return {"x": x, "s": s, "row": np.arange(batch_size, dtype=np.int32)}

    def batch(self, step, process_index, process_count):
        self.batches_drawn.append(step)
        if self.signal_at_step is not None and step == self.signal_at_step:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would, mid-run
        if self.sleep:
            import time

            time.sleep(self.sleep)
        b = self.global_batch(step, int(self.config.batch_size))
        per = b["x"].shape[0] // process_count
        return {k: v[process_index * per:(process_index + 1) * per] for k, v in b.items()}

    uses_batch_stats = True  # with centre=True, k is a statistic of the global batch

    def _g(self, trainable, frozen, batch, rng):
        """Per-row ``g``; row ``i``'s input noise is drawn from ``fold_in(rng, row_i)`` (its global row)."""
        noise = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(rng, r), (self.dim,), jnp.float32))(batch["row"])
        x = batch["x"] + self.noise * noise
        f = self.model.apply({"params": trainable}, x)
        f_ref = self.model.apply({"params": frozen["ref"]}, x) if self.with_ref else 0.0
        return f - f_ref, f

    @staticmethod
    def _rows(g, s):
        w, l = (s > 0).astype(g.dtype), (s < 0).astype(g.dtype)
        return {"gw": g * w, "nw": w, "gl": g * l, "nl": l}

    def batch_stats(self, trainable, frozen, batch, rng):
        return self._rows(self._g(trainable, frozen, batch, rng)[0], batch["s"])

    def loss(self, trainable, frozen, batch, rng, stats=None):
        g, f = self._g(trainable, frozen, batch, rng)
        s = batch["s"]
        if self.centre:
            t = stats["total"] if stats is not None else {k: jnp.sum(v) for k, v in self._rows(g, s).items()}
            k = 0.5 * t["gw"] / jnp.maximum(t["nw"], 1) + 0.5 * t["gl"] / jnp.maximum(t["nl"], 1)
            k = jax.lax.stop_gradient(k)
        else:
            k = 0.0
        loss = jnp.mean(-jax.nn.log_sigmoid(s * self.beta * (g - k)))
        return loss, {"g_mean": jnp.mean(g), "f_mean": jnp.mean(f)}

    def finish(self, trainable, frozen, workdir):
        from fairjax.trainer import params_on_host

        host = params_on_host(trainable)
        self.final = host
        if jax.process_index() == 0:
            flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                    for path, v in jax.tree_util.tree_flatten_with_path(host)[0]}
            np.savez(os.path.join(self.out_dir or workdir, "final_params.npz"), **flat)
        return {"finished": True}


def toy_config(**over):
    from fairjax.trainer import default_train_config

    c = default_train_config()
    c.total_steps = 3
    c.batch_size = 16
    c.optimizer.lr = 1e-2
    c.optimizer.grad_clip = 1.0
    c.optimizer.weight_decay = 1e-2
    c.checkpoint.every_steps = 0
    c.fsdp_min_size = 0  # the toy's params are tiny: shard them anyway, so the FSDP paths are exercised
    c.log_every_steps = 1
    c.progress_bar = False
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c
