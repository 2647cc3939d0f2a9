#!/usr/bin/env python
"""Host-side start-up of the SDXL PopAlign train step: trace and lower, at the real size, without weights.

    python bench/trace_step.py [--small | --tiny] [--lora] [--repeat 2]

The persistent compilation cache saves XLA's compile, not JAX's tracing and lowering, which run in
Python on every start. Those two do not need weights or a device: the step of
``fairjax.trainer.make_train_step`` (``bench/gpu_sdxl.py``'s ``step_full`` / ``step_lora``: bf16 compute,
remat ``nothing_saveable``, scanned transformer stacks, 1 pair at 1024 px) is traced here on abstract
params (``jax.ShapeDtypeStruct``) of full SDXL's 2.57B-parameter UNet and lowered to StableHLO. Prints
seconds per repeat (``jax.clear_caches()`` between them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_sdxl as g  # noqa: E402  (the device check: its config, task and sizes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the 50M SDXL-shaped UNet (bench/bench_unet.py's)")
    ap.add_argument("--tiny", action="store_true", help="the 3M SDXL-shaped UNet of the device check's smoke run")
    ap.add_argument("--lora", action="store_true", help="the LoRA r32 step instead of the full UNet's")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    g.ARGS = argparse.Namespace(small=args.small or args.tiny, tiny=args.tiny, out=tempfile.mkdtemp(),
                                budget=1e9, peak_tflops=0.0, attention="auto", remat="nothing_saveable",
                                scan_layers=True, stages=set())
    import jax
    import jax.numpy as jnp

    from fairjax import lora, parallel, trainer
    from fairjax.io.tree import unflatten
    from fairjax.models import unet as unet_mod

    cfg = g.unet_config()
    g.S.update(cfg=cfg, dev="gpu")  # bf16 compute, as on the device
    params = jax.eval_shape(unet_mod.stack_params, unflatten(
        {k: jax.ShapeDtypeStruct(tuple(v), jnp.float32) for k, v in unet_mod.config_shapes(cfg).items()}))
    rank = 32 if args.lora else 0
    task, c = g._task(rank, 1, g.latent_size())
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    tx, schedule = trainer.make_optimizer(c.optimizer, c.total_steps)
    trainable = (jax.eval_shape(lambda p: lora.init(p, str(c.lora.targets), rank, float(c.lora.alpha),
                                                    jax.random.key(1)), params) if rank else params)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": trainable,
             "opt_state": jax.eval_shape(tx.init, trainable),
             "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
    batch = jax.tree.map(jnp.asarray, task.batch(0, 0, 1))
    step = jax.jit(trainer.make_train_step(task, tx, schedule, 1, mesh), donate_argnums=(0,))
    n = sum(x.size for x in jax.tree.leaves(params))
    for _ in range(args.repeat):
        jax.clear_caches()
        t0 = time.perf_counter()
        traced = step.trace(state, params, batch)
        t1 = time.perf_counter()
        traced.lower()
        t2 = time.perf_counter()
        print(f"UNet {n / 1e6:.0f}M params, {'LoRA r32' if rank else 'full'} PopAlign step, latents "
              f"{g.latent_size()}x{g.latent_size()}, jax {jax.__version__}: trace {t1 - t0:.1f} s, lower "
              f"{t2 - t1:.1f} s", flush=True)


if __name__ == "__main__":
    main()
