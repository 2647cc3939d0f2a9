"""The generic sharded, multi-host, resumable training loop.

``train(config, task, workdir) -> summary`` runs any :class:`Task` on a
``('data', 'fsdp', 'tensor')`` mesh (see :mod:`fairjax.parallel`).

The contract with a task (built by ``fairjax.train`` from the config)::

    class Task(Protocol):
        config: ml_collections.ConfigDict
        def init(self, rng) -> tuple[trainable, frozen]
            # pytrees of arrays.  Only `trainable` gets optimizer state and gradients;
            # `frozen` may be {} (LoRA: the base params; full fine-tuning: the reference copy).
        def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]
            # this process's contiguous slice (batch_size / process_count rows) of global
            # batch `step`; a pure function of step, so the data position resumes exactly.
        def loss(self, trainable, frozen, batch, rng[, stats]) -> tuple[jax.Array, dict[str, jax.Array]]
            # pure and jittable; `batch` holds global (sharded) arrays; metrics are scalars.
            # Draw per-row randomness from `rng` keyed by the row's global identity carried in the
            # batch (a pair's position in the global batch, a record index), never by its position
            # in `batch`: then the draws do not depend on grad_accum_steps or on the devices.
        def finish(self, trainable, frozen, workdir: str) -> dict
            # once after training, on every process (writes outputs on process 0).

    Optional:
        init_in_jit: bool = True
            # True: `init` is traced under jit with the params' out_shardings (params are
            # created sharded; init must be jittable).  False: `init` runs eagerly (e.g. it
            # reads weights from disk) and its result is placed onto the shardings.
        def param_partition_rules(self) -> list[tuple[regex, spec]]
            # tried after config.sharding_rules, before the FSDP default.
        uses_batch_stats: bool = False
        def batch_stats(self, trainable, frozen, batch, rng) -> dict[str, jax.Array]
            # a loss that needs statistics of the whole global batch (PopAlign's centring term k)
            # declares uses_batch_stats = True and returns per-row values here (leading dim = the
            # rows of `batch`, no gradient needed); see "gradient accumulation" below.
        def data_fingerprint(self) -> str | None
            # a digest of the dataset files the task reads (None: no files, e.g. data made from the
            # config); ``fairjax.train`` refuses to resume a run whose dataset changed under it.

Step semantics (one jitted function, state donated):

* ``state = {step, trainable, opt_state, rng}``; ``step`` counts completed steps;
  the key of step ``s`` is ``fold_in(fold_in(rng, s), 0)`` (:func:`step_key`), the same for
  every micro-batch of the step, so a resumed run draws exactly what an uninterrupted one
  would, and (with the per-row keying above) the draws of a row do not depend on
  ``grad_accum_steps``, the mesh or the process count.
* gradient accumulation: the global batch ``B`` is split into ``K = grad_accum_steps``
  micro-batches ``batch[j::K]`` (strided, so each micro-batch stays spread over all
  devices without communication), ``lax.scan`` sums their gradients and the update uses
  ``g = (1/K) sum_j grad L_j``; for a loss that is a per-example mean this equals the
  gradient of the whole batch.  Metrics are averaged the same way.
* batch-global statistics (``uses_batch_stats``): with ``K = 1`` the loss sees the whole
  global batch and computes them itself (``loss`` is called without ``stats``).  With
  ``K > 1`` the step first runs ``batch_stats`` on every micro-batch (forward only, under
  ``stop_gradient``) and then the gradient passes, each called with
  ``stats = {'rows': batch_stats of its own micro-batch, 'total': every entry summed over
  all rows of all micro-batches}``.  The loss takes its batch statistics from ``total``
  and may reuse its own ``rows`` (e.g. a frozen reference's outputs) instead of recomputing
  them.  This is exact for statistics the reference objective holds fixed
  (``stop_gradient``, as PopAlign's ``k``): ``L = (1/B) sum_i l_i(theta; sg(k))`` with ``k``
  a function of the whole batch, so ``grad L = (1/K) sum_j grad L_j`` with every ``L_j``
  using the global ``k``.  It costs one more forward pass over the batch (BENCHMARKS.md).

Checkpoints: ``<workdir>/checkpoints`` (orbax, see :mod:`fairjax.checkpoint`); every
``checkpoint.every_steps``, at the end, and on SIGTERM/SIGINT (save, then return with
``summary['preempted'] = True``, ``summary['signal']`` and a one-line ``summary['message']``
for the caller to print; ``task.finish`` is not called, so no output says the run finished).  Running again with the same workdir resumes.  With several processes the workdir must be
one directory they all see (shared filesystem): each writes its own shards there.
Metrics: TensorBoard events in ``<workdir>/tb`` and one JSON line per logged step in
``<workdir>/metrics.jsonl`` (process 0).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fairjax import config as config_lib
from fairjax import parallel
from fairjax.checkpoint import Checkpointer, PreemptionGuard
from fairjax.errors import ConfigError, NonFiniteLossError
from fairjax.progress import format_seconds

log = logging.getLogger(__name__)


class Task(Protocol):  # pragma: no cover - documentation of the contract
    config: ml_collections.ConfigDict

    def init(self, rng) -> tuple[Any, Any]: ...

    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]: ...

    def loss(self, trainable, frozen, batch, rng, stats=None) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def finish(self, trainable, frozen, workdir: str) -> dict: ...


# ----------------------------------------------------------------------------- config


def default_train_config() -> ml_collections.ConfigDict:
    """Defaults of every key the trainer reads; each ``configs/*.py`` starts from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8  # global, over all processes and devices
    c.grad_accum_steps = 1
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",  # adamw | adam | sgd
            lr=1e-4,
            schedule="constant",  # constant | cosine (both after linear warm-up)
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,  # adamw only
            momentum=0.0,  # sgd only
            grad_clip=1.0,  # global-norm clipping; 0 = off
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # (regex over '/'-joined param path, partition spec tuple); first match wins, then the task's
    # param_partition_rules() (the models' tensor-axis rules); unmatched params: FSDP over their
    # largest dim divisible by mesh.fsdp.
    c.sharding_rules = []
    # params with fewer elements stay replicated rather than FSDP-sharded (the default and the
    # rules' "fsdp?" entries): splitting a bias or a norm scale saves nothing and costs a gather
    c.fsdp_min_size = 4096
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500, "keep": 3, "async": False})
    c.log_every_steps = 50
    c.progress_bar = True
    return c


#: the valid values of every key :func:`default_train_config` sets (:func:`fairjax.config.validate`
#: checks them, and each task's ``RANGES``, before anything is built or compiled)
TRAIN_RANGES = {
    "seed": config_lib.SEED,
    "total_steps": config_lib.ints(1),
    "batch_size": config_lib.ints(1),
    "grad_accum_steps": config_lib.ints(1),
    "optimizer.name": config_lib.one_of("adamw", "adam", "sgd"),
    "optimizer.lr": config_lib.floats(0, lo_open=True),
    "optimizer.schedule": config_lib.one_of("constant", "cosine"),
    "optimizer.warmup_steps": config_lib.ints(0),
    "optimizer.b1": config_lib.floats(0, 1, hi_open=True),
    "optimizer.b2": config_lib.floats(0, 1, hi_open=True),
    "optimizer.eps": config_lib.floats(0, lo_open=True),
    "optimizer.weight_decay": config_lib.floats(0),
    "optimizer.momentum": config_lib.floats(0, 1, hi_open=True),
    "optimizer.grad_clip": config_lib.floats(0),  # 0 = off
    "mesh.data": config_lib.ints(1, also=(-1,)),  # -1: every device the other axes leave
    "mesh.fsdp": config_lib.ints(1, also=(-1,)),
    "mesh.tensor": config_lib.ints(1, also=(-1,)),
    "checkpoint.every_steps": config_lib.ints(0),  # 0 = only the final (and preemption) saves
    "checkpoint.keep": config_lib.ints(0),  # 0 = keep all
    "checkpoint.async": config_lib.BOOL,
    "log_every_steps": config_lib.ints(1),
    "progress_bar": config_lib.BOOL,
}


def validate_config(config, *task_ranges) -> None:
    """:data:`TRAIN_RANGES` and the task's tables (which win for the same key) over ``config``: one
    :class:`ConfigError` naming every bad key, its value and its range."""
    config_lib.validate(config, TRAIN_RANGES, *task_ranges)


def check_mesh(config) -> None:
    """The mesh fits the devices and the global batch divides over it (x ``grad_accum_steps``) and over the
    processes: :class:`_Setup`'s checks, run by ``fairjax.train`` before the task is built or the workdir
    written (one-line :class:`ShardingError`)."""
    mesh = parallel.make_mesh(dict(_get(config, "mesh")))
    parallel.check_batch_size(int(config.batch_size), mesh, int(_get(config, "grad_accum_steps")))
    parallel.host_batch_slice(int(config.batch_size))


def _get(cfg, key: str, section: tuple[str, ...] = ()):
    """``cfg[key]``; when ``cfg`` lacks it (or holds None), :func:`default_train_config`'s value at
    ``section/key``: the only fallback, so it can never differ from the documented default."""
    try:
        v = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    except (AttributeError, KeyError):
        v = None
    if v is None:
        node = default_train_config()
        for part in section:
            node = node[part]
        v = node[key]
    return v


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """``lr(s)``: ``lr * s / warmup`` for ``s < warmup``, then ``lr`` (constant) or
    ``lr * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))`` (cosine)."""
    lr = float(opt_cfg.lr)
    warmup = int(_get(opt_cfg, "warmup_steps", ("optimizer",)))
    kind = str(_get(opt_cfg, "schedule", ("optimizer",)))
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(int(total_steps) - warmup, 1))
    else:
        raise ConfigError(f"optimizer.schedule={kind!r} is not one of constant, cosine")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``optax.chain(clip_by_global_norm?, adamw|adam|sgd(schedule))`` and the schedule."""
    schedule = make_schedule(opt_cfg, total_steps)
    name = str(_get(opt_cfg, "name", ("optimizer",)))
    b1, b2, eps = float(_get(opt_cfg, "b1", ("optimizer",))), float(_get(opt_cfg, "b2", ("optimizer",))), float(_get(opt_cfg, "eps", ("optimizer",)))
    if name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=float(_get(opt_cfg, "weight_decay", ("optimizer",))))
    elif name == "adam":
        opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    elif name == "sgd":
        m = float(_get(opt_cfg, "momentum", ("optimizer",)))
        opt = optax.sgd(schedule, momentum=m if m > 0 else None)
    else:
        raise ConfigError(f"optimizer.name={name!r} is not one of adamw, adam, sgd")
    clip = float(_get(opt_cfg, "grad_clip", ("optimizer",)))
    parts = ([optax.clip_by_global_norm(clip)] if clip > 0 else []) + [opt]
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- the step


def step_key(rng, step):
    """The key of step ``step``, handed to every micro-batch of it: ``fold_in(fold_in(rng, step), 0)``
    (the trailing 0 is the key a run without accumulation always used, so its draws are unchanged)."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), 0)


def split_micro(batch: dict[str, jax.Array], k: int, mesh) -> dict[str, jax.Array]:
    """``(B, ...) -> (k, B/k, ...)`` with micro-batch ``j = batch[j::k]`` (stays device-local)."""
    sh = NamedSharding(mesh, P(None, parallel.BATCH_AXES))

    def one(x):
        y = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, sh)

    return jax.tree.map(one, batch)


def _zeros_like_shapes(shapes):
    """Zeros of ``jax.eval_shape`` results (floating leaves in float32: accumulators)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
                        shapes)


def uses_batch_stats(task) -> bool:
    """Whether ``task`` declares batch-global statistics (``uses_batch_stats`` and ``batch_stats``)."""
    return bool(getattr(task, "uses_batch_stats", False)) and hasattr(task, "batch_stats")


def batch_stats_pass(task, trainable, frozen, micro, key):
    """The no-gradient pass over the micro-batches ``micro`` (leading axis ``k``):
    ``(rows, total)`` with ``rows`` = ``task.batch_stats`` of each micro-batch stacked on a new
    leading axis and ``total`` = every entry summed over all rows of all micro-batches (the
    whole global batch: the arrays are global, so the sum covers every device and process)."""

    def stats(mb):
        return jax.lax.stop_gradient(task.batch_stats(trainable, frozen, mb, key))

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = _zeros_like_shapes(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                                            jax.eval_shape(stats, first)))

    def body(total, mb):
        rows = stats(mb)
        return jax.tree.map(lambda t, r: t + jnp.sum(r, axis=0).astype(t.dtype), total, rows), rows

    total, rows = jax.lax.scan(body, zeros, micro)
    return rows, total


def make_train_step(task, tx: optax.GradientTransformation, schedule, grad_accum_steps: int, mesh):
    """The pure step ``(state, frozen, batch) -> (state, metrics)`` (see module docstring)."""
    k = int(grad_accum_steps)
    global_stats = uses_batch_stats(task) and k > 1

    def grads_of(trainable, frozen, batch, key):
        def f(p, b, r, stats):
            extra = {"stats": stats} if stats is not None else {}
            return task.loss(p, frozen, b, r, **extra)

        vg = jax.value_and_grad(f, has_aux=True)
        if k == 1:  # the loss sees the whole global batch: it computes any batch statistic itself
            (loss, metrics), grads = vg(trainable, batch, key, None)
            return loss, metrics, grads
        micro = split_micro(batch, k, mesh)
        if global_stats:
            rows, total = batch_stats_pass(task, trainable, frozen, micro, key)
        else:
            rows = total = None

        def body(carry, xs):
            mb, rows_j = xs
            stats = None if total is None else {"rows": rows_j, "total": total}
            (loss, metrics), grads = vg(trainable, mb, key, stats)
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        first = jax.tree.map(lambda x: x[0], (micro, rows))
        st0 = None if total is None else {"rows": first[1], "total": total}
        zeros = _zeros_like_shapes(jax.eval_shape(lambda p, b: vg(p, b, key, st0), trainable, first[0]))
        zeros = (zeros[0][0], zeros[0][1], zeros[1])
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, rows))
        scale = lambda x: (x / k).astype(x.dtype)  # noqa: E731
        grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, trainable)
        return scale(loss), jax.tree.map(scale, metrics), grads

    def step_fn(state, frozen, batch):
        step = state["step"]
        key = step_key(jax.random.wrap_key_data(state["rng"]), step)
        loss, metrics, grads = grads_of(state["trainable"], frozen, batch, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # No select on `ok` here (it would cost a temporary copy of the state): the loop checks
        # `finite` before any checkpoint and stops, so a poisoned state is never saved.
        new = {"step": step + 1, "trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
        out = {k_: jnp.asarray(v, jnp.float32) for k_, v in dict(metrics).items()}
        out.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                   lr=jnp.asarray(schedule(step), jnp.float32), finite=ok)
        return new, out

    return step_fn


# ----------------------------------------------------------------------------- state set-up


def _rules(config, task) -> list[tuple[str, Any]]:
    rules = [tuple(r) for r in list(_get(config, "sharding_rules") or [])]
    if hasattr(task, "param_partition_rules"):
        rules += [tuple(r) for r in task.param_partition_rules()]
    return rules


def _state_shardings(abstract, tx, mesh, rules, min_size):
    tr_sh = parallel.param_shardings(abstract["trainable"], mesh, rules, min_size)
    rep = parallel.replicated(mesh)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract["opt_state"], tr_sh, transform_non_params=lambda _: rep
    )
    return {"step": rep, "trainable": tr_sh, "opt_state": opt_sh, "rng": rep}


class _Setup:
    """Mesh, shardings and the initial/restored state of a run."""

    def __init__(self, config, task, workdir):
        self.mesh = parallel.make_mesh(dict(_get(config, "mesh")))
        self.k = int(_get(config, "grad_accum_steps"))
        if self.k < 1:
            raise ConfigError(f"grad_accum_steps={self.k} must be >= 1")
        self.batch_size = int(config.batch_size)
        parallel.check_batch_size(self.batch_size, self.mesh, self.k)
        parallel.host_batch_slice(self.batch_size)  # divides over processes
        self.total_steps = int(config.total_steps)
        self.tx, self.schedule = make_optimizer(config.optimizer, self.total_steps)
        self.rules = _rules(config, task)
        self.min_size = int(_get(config, "fsdp_min_size"))
        base = jax.random.key(int(_get(config, "seed")))
        self.init_key, self.train_key = jax.random.split(base)
        self.task = task

        tr_abs, fr_abs = jax.eval_shape(task.init, self.init_key) if getattr(task, "init_in_jit", True) else (None, None)
        self._eager = None
        if tr_abs is None:  # eager init (task reads weights from disk)
            self._eager = task.init(self.init_key)
            tr_abs, fr_abs = jax.tree.map(_sds, self._eager)
        opt_abs = jax.eval_shape(self.tx.init, tr_abs)
        rng_abs = jax.ShapeDtypeStruct(jax.random.key_data(self.train_key).shape, jnp.uint32)
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": tr_abs, "opt_state": opt_abs, "rng": rng_abs}
        self.state_sh = _state_shardings(abstract, self.tx, self.mesh, self.rules, self.min_size)
        self.frozen_sh = parallel.param_shardings(fr_abs, self.mesh, self.rules, self.min_size)
        self.abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sh)

    def initial(self, fresh: bool) -> tuple[dict | None, Any]:
        """``(state or None, frozen)``: a fresh train state (when ``fresh``) and the frozen params.

        With ``init_in_jit`` both come out of one jitted call, already sharded.
        """
        rep = self.state_sh["step"]
        extras = {
            "step": parallel.put_global(np.zeros((), np.int32), rep),
            "rng": parallel.put_global(np.asarray(jax.random.key_data(self.train_key)), rep),
        }
        if self._eager is not None:
            frozen = parallel.put_global(self._eager[1], self.frozen_sh)
            if not fresh:
                return None, frozen
            trainable = parallel.put_global(self._eager[0], self.state_sh["trainable"])
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh["opt_state"])(trainable)
            return {"trainable": trainable, "opt_state": opt_state, **extras}, frozen
        if not fresh:
            return None, jax.jit(lambda k: self.task.init(k)[1], out_shardings=self.frozen_sh)(self.init_key)

        def init_all(k):
            trainable, frozen = self.task.init(k)
            return trainable, self.tx.init(trainable), frozen

        out_sh = (self.state_sh["trainable"], self.state_sh["opt_state"], self.frozen_sh)
        trainable, opt_state, frozen = jax.jit(init_all, out_shardings=out_sh)(self.init_key)
        return {"trainable": trainable, "opt_state": opt_state, **extras}, frozen


def _sds(x):
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)


# ----------------------------------------------------------------------------- logging


def _summary_writer(logdir: str):
    """``tensorboardX.SummaryWriter`` without tensorboardX's optional ``import torch``
    (3 s, and training never needs torch); scalars only."""
    import sys

    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes tensorboardX's `try: import torch` take its ImportError path
        try:
            pass
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)


def _drop_rows_after(path: str, step: int) -> None:
    """On resume from checkpoint ``step``, forget logged rows of later steps (they are redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if len(keep) != len(lines):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


class _Logger:
    """TensorBoard + metrics.jsonl + tqdm, process 0 only."""

    def __init__(self, workdir, total, start, progress_bar):
        self.main = jax.process_index() == 0
        self.total = total
        self.tb = self.jsonl = self.bar = None
        if not self.main:
            return
        self.tb = _summary_writer(os.path.join(workdir, "tb"))
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_rows_after(path, start)
        self.jsonl = open(path, "a")
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def step(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    compile_s: float | None = None  # set by the loop; goes into the first row this run writes

    def write(self, step, metrics):
        if not self.main:
            return
        if self.compile_s is not None:
            metrics = {**metrics, "compile_s": self.compile_s}
            self.compile_s = None
        for k, v in metrics.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "grad_norm") if k in metrics})
        else:  # no bar: one line per logged step, with the time left at the current rate
            rate = metrics.get("steps_per_sec", 0.0)
            left = f", {format_seconds((self.total - step) / rate)} left" if rate > 0 and step < self.total else ""
            shown = " ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "grad_norm") if k in metrics)
            self.message(f"  step {step}/{self.total}: {shown} ({rate:.2f} steps/s{left})")

    def message(self, text):
        if not self.main:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


# ----------------------------------------------------------------------------- the loop


def train(config, task, workdir: str) -> dict:
    """Train ``task`` as ``config`` says, checkpointing in ``workdir``; resume if it holds checkpoints.

    Returns ``task.finish(...)``'s summary plus ``step``, ``preempted`` and the last
    logged metrics.  Raises :class:`NonFiniteLossError` on a NaN/inf loss.
    """
    validate_config(config)  # the trainer's keys (fairjax.train checks the task's too, before building it)
    os.makedirs(workdir, exist_ok=True)
    s = _Setup(config, task, workdir)
    ck_cfg = _get(config, "checkpoint")
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every_steps=int(_get(ck_cfg, "every_steps", ("checkpoint",))),
        keep=_get(ck_cfg, "keep", ("checkpoint",)),
        async_save=bool(_get(ck_cfg, "async", ("checkpoint",))),
    )
    restored = ckpt.restore(s.abstract)
    state, frozen = s.initial(fresh=restored is None)
    start = 0
    if restored is not None:
        start, state = restored
        if int(jax.device_get(state["step"])) != start:
            raise RuntimeError(f"checkpoint {ckpt.directory}/{start} holds step {int(jax.device_get(state['step']))}")
    step_fn = make_train_step(task, s.tx, s.schedule, s.k, s.mesh)
    rep = parallel.replicated(s.mesh)
    p_step = jax.jit(
        step_fn,
        in_shardings=(s.state_sh, s.frozen_sh, parallel.batch_sharding(s.mesh)),
        out_shardings=(s.state_sh, rep),
        donate_argnums=(0,),
    )
    log_every = int(_get(config, "log_every_steps"))
    logger = _Logger(workdir, s.total_steps, start, bool(_get(config, "progress_bar")))
    if start:
        logger.message(f"resumed from {ckpt.directory}/{start}")
    pidx, pcount = jax.process_index(), jax.process_count()
    last_metrics: dict[str, float] = {}
    preempted = None
    t_last, n_last = time.perf_counter(), start
    pending = None  # (step_number_completed, device metrics) awaiting the finite check
    compile_s = None  # seconds from the step's first call to its first result (written into the first row)

    def settle(pend):
        """Fetch a step's metrics, stop on non-finite, log on schedule."""
        nonlocal last_metrics, t_last, n_last
        done, m = pend
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not m.pop("finite"):
            ckpt.wait()
            last = ckpt.latest_step()
            kept = f"the last good checkpoint {ckpt.directory}/{last} is kept" if last is not None else "no checkpoint had been written"
            raise NonFiniteLossError(
                f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step {done - 1}: training stopped, {kept}; "
                "lower optimizer.lr, enable optimizer.grad_clip or check the data"
            )
        logger.step()
        if done % log_every == 0 or done == s.total_steps:
            now = time.perf_counter()
            m["steps_per_sec"] = (done - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            logger.write(done, m)
        last_metrics = m

    with PreemptionGuard() as guard:
        try:
            for step in range(start, s.total_steps):
                local = task.batch(step, pidx, pcount)
                batch = parallel.global_batch(local, s.mesh, global_size=s.batch_size)
                if compile_s is None:
                    t_first = time.perf_counter()
                state, metrics = p_step(state, frozen, batch)
                if compile_s is None:  # the first call compiles (or loads from the compilation cache)
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t_first
                    logger.compile_s = compile_s
                    logger.message(f"train step ready in {compile_s:.1f} s (compile or compilation-cache load + first "
                                   "step)")
                    t_last, n_last = time.perf_counter(), step + 1
                if pending is not None:
                    settle(pending)
                pending = (step + 1, metrics)
                stop = guard.should_stop()
                if stop or ckpt.due(step + 1) or step + 1 == s.total_steps:
                    settle(pending)
                    pending = None
                    ckpt.save(step + 1, state)
                if stop:
                    preempted = step + 1
                    break
            if pending is not None:
                settle(pending)
            ckpt.wait()
        finally:
            logger.close()
            ckpt.close()
    summary: dict[str, Any] = {"step": int(jax.device_get(state["step"])), "preempted": preempted is not None}
    if preempted is not None:  # the caller says so (entry points: one line, exit 128 + signal number)
        name = guard.signal_name or "SIGTERM"  # another process's signal: this one stops with it
        summary["signal"] = name
        summary["message"] = (f"stopped by {name} at step {preempted}: checkpoint saved in "
                              f"{ckpt.directory}/{preempted}; run the same command again to resume")
        summary.update(last_metrics)
        return summary
    summary.update(last_metrics)
    summary.update(task.finish(state["trainable"], frozen, workdir) or {})
    return summary


def params_on_host(tree: Any) -> Any:
    """Numpy copy of a (possibly multi-host sharded) tree, identical on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)

