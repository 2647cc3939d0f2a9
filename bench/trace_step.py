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
    with tempfile.TemporaryDirectory(prefix="trace_step_") as scratch:  # the task's model folder (no weights)
        g.ARGS = argparse.Namespace(small=args.small or args.tiny, tiny=args.tiny, out=scratch, scratch=scratch,
                                    budget=1e9, peak_tflops=0.0, attention="auto", remat="nothing_saveable",
                                    scan_layers=True, stages=set())
        trace(args)


def trace(args):
    import jax
    import jax.numpy as jnp

    from fairjax.io.tree import unflatten
    from fairjax.models import unet as unet_mod

    cfg = g.unet_config()
    g.S.update(cfg=cfg, dev="gpu")  # bf16 compute, as on the device
    params = jax.eval_shape(unet_mod.stack_params, unflatten(
        {k: jax.ShapeDtypeStruct(tuple(v), jnp.float32) for k, v in unet_mod.config_shapes(cfg).items()}))
    rank = 32 if args.lora else 0
    step, state, params, batch, _ = g._step_fn(rank, 1, g.latent_size(), params=params)
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
