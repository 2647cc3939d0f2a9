#!/usr/bin/env python
"""CPU speed of one SDXL preference training step: fairjax PopAlign vs a PyTorch Diffusion-DPO step.

    python bench/bench_train_step.py [--preset tiny] [--steps 7] [--root /tmp/fairjax_bench_tiny]

Both sides train the same tiny random SDXL-shaped UNet (``fairjax.diffusion.tiny`` preset,
built once under ``--root``) on the same batch of 8 winner/loser pairs (16 latents, their
precomputed text embeddings, SDXL time_ids), float32, one CPU process:

* fairjax: the trainer's jitted step (``fairjax.trainer.make_train_step`` of the task, state
  donated): shared noise/timesteps per pair, policy forward + backward, frozen-reference
  forward, PopAlign loss, global-norm clip 1.0, AdamW;
* PyTorch: the DiffusionDPO reference recipe with diffusers' ``UNet2DConditionModel`` and a
  frozen copy as reference (``torch.no_grad``), ``DDPMScheduler.add_noise``, the Diffusion-DPO
  loss, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW``.

Median of ``--steps`` interleaved steps after warm-up; prints ``ratio = fairjax / torch``
(< 1: fairjax faster; the goal is <= 0.8).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

# torch runs with PyTorch's own OpenMP wait policy (libgomp spins a while at each barrier, then sleeps), as
# its users run it. Until 2026-12-07 this script set OMP_WAIT_POLICY=PASSIVE, which slowed torch 2.3x on a
# quiet 2-core machine (BENCHMARKS.md, "PyTorch's OpenMP wait policy"). On a machine shared with other jobs
# spinning hurts torch instead: export OMP_WAIT_POLICY=PASSIVE there. The header prints what was in effect.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def build_task(root: str, preset: str, loss: str):
    from fairjax.tasks import diffusion_pref as dp
    from fairjax.diffusion import tiny as tiny_sdxl

    model_dir, data_dir = tiny_sdxl.ensure(os.path.join(root, preset), preset)
    c = dp.make_config(loss, "tiny")
    c.tiny = ""
    c.model.dir, c.data.path = model_dir, data_dir
    c.text_embeds.path = os.path.join(root, f"{preset}_text_embeds.safetensors")
    c.mesh = dict(data=1)
    return dp.DiffusionPrefTask(c), c


def fairjax_step(task, cfg):
    """(run(), compile seconds): the trainer's step on one device."""
    import jax.numpy as jnp
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
    step = jax.jit(trainer.make_train_step(task, tx, schedule, 1, mesh), donate_argnums=(0,))
    box = [state]
    t0 = time.perf_counter()
    box[0], m = step(box[0], frozen, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0

    def run():
        box[0], metrics = step(box[0], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return run, compile_s, batch


def torch_step(task, cfg, batch):
    """run(): the DiffusionDPO reference step with diffusers' UNet and a frozen reference copy."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fairjax.convert import unet as unet_convert
    from fairjax.convert.core import export_state
    from fairjax.diffusion import tiny as tiny_sdxl

    trainable, frozen = task.init(jax.random.key(0))
    base = frozen if task.rank else trainable
    model = UNet2DConditionModel.from_config({k: v for k, v in task.unet_config.items() if not k.startswith("_")})
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                           export_state(base, literal=unet_convert.LITERAL)}, strict=True)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    sched = DDPMScheduler.from_config(tiny_sdxl.SDXL_SCHEDULER)
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    latents = torch.from_numpy(np.array(batch["latents"]))
    ehs = torch.from_numpy(np.array(batch["encoder_hidden_states"]))
    n = latents.shape[0]
    added = {"text_embeds": torch.from_numpy(np.array(batch["text_embeds"])),
             "time_ids": torch.from_numpy(np.tile(task.time_ids, (n, 1)))}
    beta = float(cfg.beta)
    gen = torch.Generator().manual_seed(0)

    def run():
        noise = torch.randn(latents[: n // 2].shape, generator=gen).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (n // 2,), generator=gen).repeat(2)
        noisy = sched.add_noise(latents, noise, t)
        pred = model(noisy, t, ehs, added_cond_kwargs=added).sample
        model_losses = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        with torch.no_grad():
            ref_pred = ref(noisy, t, ehs, added_cond_kwargs=added).sample
            ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        mw, ml = model_losses.chunk(2)
        rw, rl = ref_losses.chunk(2)
        loss = -F.logsigmoid(-0.5 * beta * ((mw - ml) - (rw - rl))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run, sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", help="tiny_sdxl preset (tiny | micro)")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--root", default="/tmp/fairjax_bench_tiny", help="where the tiny model/data are built (kept)")
    ap.add_argument("--loss", default="popalign", help="fairjax side: popalign | diffusion_dpo")
    args = ap.parse_args()

    task, cfg = build_task(args.root, args.preset, args.loss)
    fj, compile_s, batch = fairjax_step(task, cfg)
    pt, n_params = torch_step(task, cfg, batch)
    fj()
    pt()
    t_fj, t_pt = [], []
    for _ in range(args.steps):  # interleaved, so background load hits both alike
        for fn, out in ((fj, t_fj), (pt, t_pt)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    mj, mp = statistics.median(t_fj), statistics.median(t_pt)
    shape = tuple(np.shape(batch["latents"]))
    ctx = tuple(np.shape(batch["encoder_hidden_states"])[1:])
    print(f"tiny SDXL-shaped UNet ({args.preset}: {n_params / 1e6:.2f}M params), batch {shape[0]} = "
          f"{shape[0] // 2} pairs of {shape[1:]} latents, context {ctx}, "
          f"float32; jax {jax.__version__} ({jax.devices()[0].platform}, compile {compile_s:.1f}s), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    print(f"step (policy fwd+bwd, reference fwd, clip, AdamW): fairjax {args.loss} {mj * 1e3:.1f} ms "
          f"(min {min(t_fj) * 1e3:.1f})   torch diffusion-dpo {mp * 1e3:.1f} ms (min {min(t_pt) * 1e3:.1f})   "
          f"ratio fairjax/torch {mj / mp:.2f}")


if __name__ == "__main__":
    main()
