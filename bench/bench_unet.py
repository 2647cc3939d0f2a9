#!/usr/bin/env python
"""CPU speed of the Flax UNet vs diffusers' PyTorch UNet, same config, same weights, same script.

    python bench/bench_unet.py [--steps 5] [--batch 4] [--size 32] [--scan-layers] [--remat POLICY]
    python bench/bench_unet.py --omp-wait-policy default passive   # torch with both OpenMP wait policies
    python bench/bench_unet.py --compare-scan [--steps 5] [--remat POLICY]

SDXL-shaped config: block_out_channels (64, 128, 256), transformer layers
(1, 2, 4), heads (2, 4, 8), cross_attention_dim 256, text_time added embedding,
float32. Times (median of ``--steps`` after warm-up / compile):

* forward: ``jax.jit(unet.apply)`` vs ``torch.no_grad()`` forward,
* train step: forward + backward + AdamW update (jit, donated state) vs
  ``loss.backward(); opt.step()``.

Prints ``ratio = flax / torch`` (< 1: Flax faster). Runs are interleaved so
background load hits both sides alike. ``--scan-layers`` runs the Flax UNet with its
transformer stacks under ``nn.scan`` (params stacked).

``--compare-scan`` (no torch): the Flax train step unrolled vs ``scan_layers``, same weights,
in one process: trace + lower + XLA compile time of each (``jax.jit(step).lower(...).compile()``,
then the forward's), then the step times interleaved; prints ``ratio = scan / unrolled``.
``--objective popalign`` makes that step the PopAlign step the trainer runs on full SDXL: the
batch is winners and losers (alternating), a frozen reference UNet (its own copy of the weights)
runs forward beside the policy's forward + backward, ``fairjax.losses.popalign`` (beta 5000),
global-norm clip 1.0, AdamW. Its default config trains with ``--remat nothing_saveable``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# PyTorch's OpenMP (libgomp) threads spin-wait a while at each barrier before they sleep: that is its
# default, with OMP_WAIT_POLICY unset, what a PyTorch user gets, and what the torch side runs with unless
# --omp-wait-policy says otherwise. Until 2026-12-07 this script set PASSIVE (threads sleep at once) for
# torch, which made its forward and step 1.3-1.8x slower on a quiet 2-core machine (BENCHMARKS.md, "PyTorch's
# OpenMP wait policy"). Spinning hurts only on a machine shared with other jobs; pass --omp-wait-policy
# passive there. ACTIVE (spin for seconds) would keep the idle torch worker's threads busy while Flax runs.
WAIT_POLICIES = ("default", "passive", "active")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import diffusers  # noqa: E402

from _torch_util import DictReader  # noqa: E402
from fairjax import losses  # noqa: E402
from fairjax.convert import unet as unet_convert  # noqa: E402
from fairjax.convert.core import convert_checkpoint  # noqa: E402
from fairjax.io.host import tune_allocator  # noqa: E402
from fairjax.models import unet as unet_mod  # noqa: E402
from fairjax.models.unet import UNet2DConditionModel  # noqa: E402

CONFIG = {
    "_class_name": "UNet2DConditionModel", "block_out_channels": [64, 128, 256],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 4], "attention_head_dim": [2, 4, 8], "layers_per_block": 2,
    "cross_attention_dim": 256, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 32, "projection_class_embeddings_input_dim": 256 + 6 * 32, "sample_size": 32,
}


def _time(fn, steps):
    """[(wall seconds, process CPU seconds, system CPU seconds, minor page faults)] per call."""
    out = []
    for _ in range(steps):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out.append((t1 - t0, c1 - c0, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seq", type=int, default=77)
    ap.add_argument("--attention", default=None, help="attention_implementation (None, xla, einsum)")
    ap.add_argument("--scan-layers", action="store_true", help="nn.scan over each transformer stack")
    ap.add_argument("--remat", default="none", help="remat policy of each transformer block (default none)")
    ap.add_argument("--compare-scan", action="store_true", help="Flax unrolled vs scan_layers: compile and step")
    ap.add_argument("--objective", choices=("mse", "popalign"), default="mse",
                    help="--compare-scan's step: mse (plain regression) or popalign (policy + frozen reference)")
    ap.add_argument("--one-process", action="store_true",
                    help="run Flax and torch in this one process (default: one worker process each)")
    ap.add_argument("--omp-wait-policy", nargs="+", choices=WAIT_POLICIES, metavar="POLICY",
                    default=[os.environ.get("OMP_WAIT_POLICY", "default").lower()],
                    help="torch's OMP_WAIT_POLICY, one torch worker each, timed in the same interleaved rounds: default "
                         "(unset: libgomp spins, then sleeps; PyTorch as users run it), passive, active (default: "
                         "$OMP_WAIT_POLICY, else default)")
    ap.add_argument("--worker", choices=("flax", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare_scan:
        return compare_scan(args)
    if args.worker:
        return worker(args)
    if args.one_process:
        policy = os.environ.get("OMP_WAIT_POLICY", "default").lower()
        sides = {"flax": _Local(build("flax", args)), f"torch ({policy})": _Local(build("torch", args))}
        policies = {f"torch ({policy})": policy}
    else:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        sides = {"flax": _Remote(cmd + ["--worker", "flax"])}
        policies = {f"torch ({policy})": policy for policy in args.omp_wait_policy}  # side name -> policy
        for name, policy in policies.items():
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy.upper()
            sides[name] = _Remote(cmd + ["--worker", "torch"], env)
    info = {name: side.info for name, side in sides.items()}
    res = {what: {name: [] for name in sides} for what in ("fwd", "step")}
    for _ in range(args.steps):  # interleave
        for what in res:
            for name, side in sides.items():
                res[what][name].append(side.run(what))
    for side in sides.values():
        side.close()
    fi = info["flax"]
    torches = list(policies)
    ti = info[torches[0]]
    print(f"UNet {fi['n_params'] / 1e6:.1f}M params, batch {args.batch}, {args.size}x{args.size} latents, context "
          f"{args.seq}x256, float32, jax {fi['jax']} ({fi['platform']}), torch {ti['torch']} ({ti['threads']} threads, "
          f"OMP_WAIT_POLICY {' / '.join(policies.values())}); compile fwd {fi['compile_fwd']:.1f}s, "
          f"step {fi['compile_step']:.1f}s")
    print(f"attention_implementation={args.attention}, remat={args.remat}, scan_layers={args.scan_layers}; "
          f"{'one process' if args.one_process else 'one worker process per framework'} "
          f"(GLIBC_TUNABLES flax {fi['tunables']!r}, torch {ti['tunables']!r}); medians of {args.steps} "
          f"interleaved runs (wall, and process CPU time summed over threads)")
    for what, runs in res.items():
        wj, cj, sj, fj = (statistics.median(r[i] for r in runs["flax"]) for i in range(4))
        for name in torches:
            wp, cp, sp, fp = (statistics.median(r[i] for r in runs[name]) for i in range(4))
            label = name if len(torches) > 1 else "torch"
            print(f"{what:5s}: wall flax {wj * 1e3:7.1f} ms  {label} {wp * 1e3:7.1f} ms  ratio {wj / wp:.2f}  | "
                  f"cpu flax {cj * 1e3:7.1f} ms  {label} {cp * 1e3:7.1f} ms  ratio {cj / cp:.2f}  | "
                  f"sys flax {sj * 1e3:5.0f} ms  {label} {sp * 1e3:5.0f} ms  | page faults flax {fj:.0f}  {label} {fp:.0f}")


def _torch_unet():
    torch.manual_seed(0)
    tm = diffusers.UNet2DConditionModel.from_config({k: v for k, v in CONFIG.items() if not k.startswith("_")})
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return tm


def build(name, args):
    """(info, {"fwd": fn, "step": fn}) of one framework: same weights (seeded torch init), same inputs."""
    b = args.batch
    x, t, ctx, added, target = _inputs(b, args.size, args.seq)
    tm = _torch_unet()
    info = {"n_params": sum(p.numel() for p in tm.parameters()), "tunables": os.environ.get("GLIBC_TUNABLES", "")}
    if name == "torch":
        tx, tctx, tt, ttarget = (torch.from_numpy(a) for a in (x, ctx, t, target))
        tadded = {k: torch.from_numpy(v) for k, v in added.items()}

        def torch_fwd():
            with torch.no_grad():
                tm(tx, tt, tctx, added_cond_kwargs=tadded).sample

        topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
        tm.train()

        def torch_step():
            topt.zero_grad(set_to_none=True)
            loss = torch.mean((tm(tx, tt, tctx, added_cond_kwargs=tadded).sample - ttarget) ** 2)
            loss.backward()
            topt.step()

        torch_fwd()
        torch_step()
        info.update(torch=torch.__version__, threads=torch.get_num_threads())
        return info, {"fwd": torch_fwd, "step": torch_step}

    unet = UNet2DConditionModel.from_config(CONFIG, attention_implementation=args.attention, remat=args.remat,
                                            scan_layers=args.scan_layers)
    params = convert_checkpoint(DictReader(tm.state_dict()), unet_convert.target_shapes(CONFIG))
    params = jax.tree_util.tree_map(jnp.asarray, unet_mod.stack_params(params) if args.scan_layers else params)
    tm = None  # the flax worker keeps no torch model
    jx = [jnp.asarray(a) for a in (x, t, ctx)]
    jadded = {k: jnp.asarray(v) for k, v in added.items()}

    fwd = jax.jit(unet.apply)
    t0 = time.perf_counter()
    jax.block_until_ready(fwd({"params": params}, jx[0], jx[1], jx[2], jadded))
    compile_fwd = time.perf_counter() - t0

    def jax_fwd():
        jax.block_until_ready(fwd({"params": params}, jx[0], jx[1], jx[2], jadded))

    opt = optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=1e-2)

    def loss_fn(p):
        out = unet.apply({"params": p}, jx[0], jx[1], jx[2], jadded)
        return jnp.mean((out - target) ** 2)

    def step(p, st):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, loss

    # Donate the optimizer state only: donated params make XLA copy every kernel before
    # the in-place update (measured ~7% of the step on CPU); torch updates in place.
    jstep = jax.jit(step, donate_argnums=(1,))
    state = [jax.tree_util.tree_map(jnp.array, params), None]
    state[1] = opt.init(state[0])
    t0 = time.perf_counter()
    state[0], state[1], _ = jax.block_until_ready(jstep(state[0], state[1]))
    compile_step = time.perf_counter() - t0

    def jax_step():
        state[0], state[1], loss = jstep(state[0], state[1])
        jax.block_until_ready(loss)

    info.update(jax=jax.__version__, platform=jax.devices()[0].platform, compile_fwd=compile_fwd,
                compile_step=compile_step)
    # what bench/profile_unet.py lowers again to name the profiled kernels (same function, same arguments)
    JITTED.update(fwd=lambda: fwd.lower({"params": params}, jx[0], jx[1], jx[2], jadded),
                  step=lambda: jstep.lower(state[0], state[1]))
    return info, {"fwd": jax_fwd, "step": jax_step}


JITTED = {}


class _Local:
    def __init__(self, built):
        self.info, self.fns = built

    def run(self, what):
        return _time(self.fns[what], 1)[0]

    def close(self):
        pass


class _Remote:
    """A worker process that builds one side, then times one call per request line on stdin."""

    def __init__(self, cmd, env=None):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        raise SystemExit(f"bench worker {self.proc.args[-1]} exited with status {self.proc.wait()}")

    def run(self, what):
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return tuple(self._read())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


_REPLY = "@bench "


def worker(args):
    tune_allocator()  # what fairjax's entry points do; applied to both sides alike
    info, fns = build(args.worker, args)
    print(_REPLY + json.dumps(info), flush=True)
    for line in sys.stdin:
        print(_REPLY + json.dumps(_time(fns[line.strip()], 1)[0]), flush=True)


def _inputs(b, s, seq):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, 4, s, s)).astype(np.float32)
    ctx = rng.standard_normal((b, seq, 256)).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((b, 256)).astype(np.float32),
             "time_ids": np.tile(np.array([[256, 256, 0, 0, 256, 256]], np.float32), (b, 1))}
    return x, t, ctx, added, rng.standard_normal(x.shape).astype(np.float32)


def compare_scan(args):
    """Unrolled vs scan_layers Flax train step (AdamW, as in main): compile and step times, one process."""
    tm = _torch_unet()
    unrolled = convert_checkpoint(DictReader(tm.state_dict()), unet_convert.target_shapes(CONFIG))
    n_params = sum(p.numel() for p in tm.parameters())
    del tm
    x, t, ctx, added, target = (jax.tree_util.tree_map(jnp.asarray, a) for a in _inputs(args.batch, args.size,
                                                                                          args.seq))
    popalign = args.objective == "popalign"
    opt = optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=1e-2)
    if popalign:
        opt = optax.chain(optax.clip_by_global_norm(1.0), opt)
    is_winner = jnp.arange(args.batch) % 2 == 0
    variants = {}
    for name, scan in (("unrolled", False), ("scan_layers", True)):
        unet = UNet2DConditionModel.from_config(CONFIG, attention_implementation=args.attention, remat=args.remat,
                                                scan_layers=scan)
        params = jax.tree_util.tree_map(jnp.asarray, unet_mod.stack_params(unrolled) if scan else unrolled)
        ref = jax.tree_util.tree_map(jnp.copy, params) if popalign else None  # the frozen reference

        def mse(p, unet=unet):
            return jnp.mean((unet.apply({"params": p}, x, t, ctx, added) - target) ** 2, axis=(1, 2, 3))

        def step(p, st, ref, mse=mse):
            def loss_fn(p):
                if not popalign:
                    return jnp.mean(mse(p))
                g = jax.lax.stop_gradient(mse(ref)) - mse(p)
                return losses.popalign(g, is_winner, 5000.0)[0]

            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, st = opt.update(g, st, p)
            return optax.apply_updates(p, upd), st, loss

        state = opt.init(params)
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = jax.jit(step, donate_argnums=(1,)).lower(params, state, ref)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2, c2 = time.perf_counter(), time.process_time()
        fwd = jax.jit(lambda p, unet=unet: unet.apply({"params": p}, x, t, ctx, added)).lower(params)
        t3 = time.perf_counter()
        fwd.compile()
        t4 = time.perf_counter()
        params, state, _ = jax.block_until_ready(compiled(params, state, ref))  # warm-up
        variants[name] = dict(lower=t1 - t0, compile=t2 - t1, cpu=c2 - c0, fwd_lower=t3 - t2, fwd_compile=t4 - t3,
                              fn=compiled, state=[params, state], ref=ref, times=[])
        print(f"{name:11s}: train step trace+lower {t1 - t0:6.1f}s  XLA compile {t2 - t1:6.1f}s  total "
              f"{t2 - t0:6.1f}s (process CPU {c2 - c0:6.1f}s) | forward trace+lower {t3 - t2:5.1f}s  "
              f"compile {t4 - t3:5.1f}s", flush=True)
    for _ in range(args.steps):  # interleave
        for v in variants.values():
            t0 = time.perf_counter()
            v["state"][0], v["state"][1], loss = v["fn"](*v["state"], v["ref"])
            jax.block_until_ready(loss)
            v["times"].append(time.perf_counter() - t0)
    u, sc = variants["unrolled"], variants["scan_layers"]
    med = {k: statistics.median(v["times"]) for k, v in variants.items()}
    total = lambda v: v["lower"] + v["compile"]  # noqa: E731
    print(f"UNet {n_params / 1e6:.1f}M params, batch {args.batch}, {args.size}x{args.size} latents, context "
          f"{args.seq}x256, float32, objective={args.objective}, remat={args.remat}, jax {jax.__version__} ({jax.devices()[0].platform}); "
          f"step medians of {args.steps} interleaved runs")
    print(f"train step compile (trace+lower+XLA): unrolled {total(u):.1f}s  scan {total(sc):.1f}s  ratio "
          f"{total(sc) / total(u):.2f} (XLA compile alone {sc['compile'] / u['compile']:.2f}; process CPU time "
          f"{sc['cpu'] / u['cpu']:.2f})")
    print(f"forward compile (trace+lower+XLA): unrolled {u['fwd_lower'] + u['fwd_compile']:.1f}s  scan "
          f"{sc['fwd_lower'] + sc['fwd_compile']:.1f}s  ratio "
          f"{(sc['fwd_lower'] + sc['fwd_compile']) / (u['fwd_lower'] + u['fwd_compile']):.2f}")
    print(f"train step: unrolled {med['unrolled'] * 1e3:.1f} ms  scan {med['scan_layers'] * 1e3:.1f} ms  ratio "
          f"{med['scan_layers'] / med['unrolled']:.2f}")


if __name__ == "__main__":
    main()
