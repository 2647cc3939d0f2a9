#!/usr/bin/env python
"""A/B of the 50M SDXL-shaped UNet's Flax train step (``bench/bench_unet.py``'s config and weights) under
XLA compiler options or buffer donations, in one process, interleaved, so the VM's drift hits every arm alike.

    python bench/ab_unet_step.py --options xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED \\
        xla_cpu_multi_thread_eigen=false            # each argument one arm (k=v[,k=v...]), beside the default
    python bench/ab_unet_step.py --donate none state both   # what the step donates: nothing, the optimizer
                                                            # state (bench_unet), params and state (the trainer)
    python bench/ab_unet_step.py --dense plain flat          # Dense's product on its input as it is, or
                                                            # flattened (fairjax.models.layers.dense_dot_general)
    python bench/ab_unet_step.py --conv lax winograd winograd-fwd winograd-bwd   # convolutions as XLA's,
                  # or as fairjax.models.layers.conv_general_dilated, differentiated as the direct convolution
                  # (fairjax's default), with the Winograd forward only, or through the Winograd transforms

``--options``: one ``jit(step).lower(...)`` compiled once per arm with ``compiler_options``, each call on
the same (undonated) arguments. ``--donate``: each arm threads its own params and AdamW state through its
own jitted step. ``--dense``: each arm traces its own step with
``fairjax.models.layers.FLATTEN_ON_CPU`` off (``plain``) or on (``flat``); ``--conv`` likewise with
``WINOGRAD_ON_CPU`` and ``WINOGRAD_DIFFERENTIATED``. ``--forward`` times the UNet's forward instead of the step
(with ``--options``, ``--dense`` or ``--conv``). Prints median and min per
arm over ``--rounds`` interleaved calls. The host is set up as
``fairjax.train`` sets it (glibc malloc tunables, synchronous CPU dispatch). No PyTorch side: the ratios to
torch are ``bench/bench_unet.py``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fairjax.io.host import tune_allocator  # noqa: E402

DONATE = {"none": (), "state": (1,), "both": (0, 1)}


def _value(text: str):
    return {"true": True, "false": False}.get(text, int(text) if text.lstrip("-").isdigit() else text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--options", nargs="+", metavar="K=V[,K=V]", help="XLA compiler options, one arm each")
    g.add_argument("--donate", nargs="+", choices=sorted(DONATE), help="donation arms")
    g.add_argument("--dense", nargs="+", choices=["plain", "flat"], help="Dense product arms")
    g.add_argument("--conv", nargs="+", choices=["lax", "winograd", "winograd-fwd", "winograd-bwd"],
                   help="convolution arms")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--forward", action="store_true", help="time the forward instead of the train step")
    p.add_argument("--remat", default="none", help="remat policy of each transformer block (default none)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seq", type=int, default=77)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    import bench_unet as bu
    from _torch_util import DictReader
    from fairjax.convert import unet as unet_convert
    from fairjax.convert.core import convert_checkpoint
    from fairjax.models.unet import UNet2DConditionModel

    weights = convert_checkpoint(DictReader(bu._torch_unet().state_dict()), unet_convert.target_shapes(bu.CONFIG))
    x, t, ctx, added, target = (jax.tree.map(jnp.asarray, v) for v in bu._inputs(a.batch, a.size, a.seq))
    unet = UNet2DConditionModel.from_config(bu.CONFIG, remat=a.remat)
    opt = optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=1e-2)

    def make_step():  # a new function object per arm, so that no arm reuses another's trace
        def step(params, state):
            def loss_fn(q):
                return jnp.mean((unet.apply({"params": q}, x, t, ctx, added) - target) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss
        return step

    step = make_step()

    def forward(params, state):  # the step's signature, so that every arm below can time it instead
        return params, state, unet.apply({"params": params}, x, t, ctx, added)

    if a.forward:
        if a.donate:
            p.error("--forward times the forward, which donates nothing: use it with --options, --dense or --conv")
        make_step = lambda: lambda params, state: forward(params, state)  # noqa: E731
        step = make_step()

    arms = {}  # name -> callable running one step
    if a.options:
        params = jax.tree.map(jnp.asarray, weights)
        state = opt.init(params)
        lowered = jax.jit(step).lower(params, state)
        for name, opts in [("default", {})] + [(o, dict(kv.split("=", 1) for kv in o.split(","))) for o in a.options]:
            t0 = time.perf_counter()
            compiled = lowered.compile(compiler_options={k: _value(v) for k, v in opts.items()})
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            arms[name] = (lambda c=compiled: jax.block_until_ready(c(params, state)[2]))
    elif a.dense or a.conv:
        from fairjax.models import layers

        # each arm: the fairjax.models.layers switches it traces its own step with
        if a.dense:
            switches = {f"dense {n}": {"FLATTEN_ON_CPU": n == "flat"} for n in a.dense}
        else:
            switches = {f"conv {n}": {"WINOGRAD_ON_CPU": n != "lax", "WINOGRAD_DIFFERENTIATED": {
                "winograd-fwd": "winograd-forward", "winograd-bwd": "winograd"}.get(n, "direct")} for n in a.conv}
        defaults = {k: getattr(layers, k) for values in switches.values() for k in values}
        params = jax.tree.map(jnp.asarray, weights)
        state = opt.init(params)
        for name, values in switches.items():
            for k, v in values.items():
                setattr(layers, k, v)
            t0 = time.perf_counter()
            compiled = jax.jit(make_step()).lower(params, state).compile()
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            arms[name] = (lambda c=compiled: jax.block_until_ready(c(params, state)[2]))
        for k, v in defaults.items():
            setattr(layers, k, v)
    else:
        for name in a.donate:
            fn = jax.jit(step, donate_argnums=DONATE[name])
            box = [jax.tree.map(jnp.array, weights), None]
            box[1] = opt.init(box[0])

            def run(fn=fn, box=box):
                box[0], box[1], loss = fn(box[0], box[1])
                jax.block_until_ready(loss)

            t0 = time.perf_counter()
            run()
            print(f"donate {name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            arms[f"donate {name}"] = run
    for fn in arms.values():  # one warm call each
        fn()
    times = {n: [] for n in arms}
    for _ in range(a.rounds):
        for n, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    what = "forward" if a.forward else "train step"
    print(f"\n50M SDXL-shaped UNet {what}, batch {a.batch}, {a.size}x{a.size} latents, {a.rounds} interleaved "
          f"rounds, remat={a.remat}; jax {jax.__version__}")
    base = statistics.median(next(iter(times.values())))
    for n, v in times.items():
        med = statistics.median(v)
        print(f"  {n:<70} median {med * 1e3:8.1f} ms  min {min(v) * 1e3:8.1f} ms  {med / base:5.2f}x the first")


if __name__ == "__main__":
    tune_allocator()  # glibc malloc tunables (re-executes once), synchronous CPU dispatch
    main()
