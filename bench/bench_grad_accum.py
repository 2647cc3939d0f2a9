#!/usr/bin/env python
"""CPU cost of exact gradient accumulation: one PopAlign step on the same global batch with
``grad_accum_steps`` K = 1, 2, 4 (issue 19).

    python bench/bench_grad_accum.py [--preset tiny] [--steps 9] [--root /tmp/fairjax_bench_tiny]

The trainer's jitted step (``fairjax.trainer.make_train_step``, state donated, one CPU device) on
the tiny random SDXL-shaped UNet (``fairjax.diffusion.tiny``; built once under ``--root``), 8
winner/loser pairs (16 latents), float32, full UNet, AdamW:

* K = 1: one policy forward + backward and one reference forward over the 16 rows; PopAlign's
  centring term ``k`` is taken inside the loss;
* K > 1 (PopAlign): the batch-statistics pass (policy + reference forward over every micro-batch,
  no gradient) and then K gradient passes of 16/K rows that reuse the reference mse of the first
  pass and take ``k`` from the whole batch;
* K = 4 Diffusion-DPO (a per-pair mean: no statistics pass) for the plain cost of splitting.

Median and min of ``--steps`` interleaved steps after warm-up (compile excluded); prints each
variant's time and its ratio to K = 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def make_step(task, cfg, k: int):
    """``run()`` of the trainer's step with ``grad_accum_steps = k`` on one device, and its compile seconds."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fairjax import parallel, trainer

    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    tx, schedule = trainer.make_optimizer(cfg.optimizer, cfg.total_steps)
    init_key, train_key = jax.random.split(jax.random.key(0))
    trainable, frozen = task.init(init_key)
    trainable = jax.tree.map(jnp.asarray, trainable)
    frozen = jax.tree.map(jnp.asarray, frozen)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
             "rng": jax.random.key_data(train_key)}
    batch = jax.device_put(task.batch(0, 0, 1), NamedSharding(mesh, P()))
    step = jax.jit(trainer.make_train_step(task, tx, schedule, k, mesh), donate_argnums=(0,))
    box = [state]
    t0 = time.perf_counter()
    box[0], m = step(box[0], frozen, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0

    def run():
        box[0], metrics = step(box[0], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return run, compile_s


def main():
    from bench_train_step import build_task

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", help="tiny_sdxl preset (tiny | micro)")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--root", default="/tmp/fairjax_bench_tiny", help="where the tiny model/data are built (kept)")
    args = ap.parse_args()
    variants = [("popalign K=1", "popalign", 1), ("popalign K=2", "popalign", 2), ("popalign K=4", "popalign", 4),
                ("diffusion_dpo K=1", "diffusion_dpo", 1), ("diffusion_dpo K=4", "diffusion_dpo", 4)]
    runs = {}
    for name, loss, k in variants:
        task, cfg = build_task(args.root, args.preset, loss)
        cfg.grad_accum_steps = k
        task.k = k
        runs[name], c = make_step(task, cfg, k)
        runs[name]()  # warm-up
        print(f"{name}: compiled in {c:.1f} s", flush=True)
    times = {n: [] for n in runs}
    for _ in range(args.steps):
        for n, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[n].append(time.perf_counter() - t0)
    print(f"\npreset {args.preset}, {args.steps} interleaved steps, global batch 16 latents (8 pairs), 1 CPU device")
    print(f"{'variant':<20} {'median ms':>10} {'min ms':>8} {'median / K=1':>13}")
    for n, ts in times.items():
        base = times[("diffusion_dpo" if n.startswith("diffusion_dpo") else "popalign") + " K=1"]
        print(f"{n:<20} {1e3 * statistics.median(ts):>10.1f} {1e3 * min(ts):>8.1f} "
              f"{statistics.median(ts) / statistics.median(base):>13.2f}")


if __name__ == "__main__":
    main()
