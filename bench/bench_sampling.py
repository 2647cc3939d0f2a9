#!/usr/bin/env python
"""Text -> image throughput: fairjax's SDXL pipeline vs diffusers' StableDiffusionXLPipeline.

    python bench/bench_sampling.py [--steps 20] [--cfg 5] [--prompts 2] [--per-prompt 2] [--repeats 3]

Both pipelines run the same tiny random SDXL-shaped components (UNet: DownBlock2D + two
CrossAttn blocks, block_out_channels (64, 128, 256), transformer layers (1, 2, 4), text_time
conditioning; two 4-layer CLIP text encoders of width 128; a 3-level VAE; 32x32 latents,
128x128 images), built with diffusers/transformers, saved, and converted to a fairjax model dir.
Euler sampling with classifier-free guidance, float32, the whole prompt -> uint8 image path
(text encoders, sampler loop, VAE decode) on the same prompts and initial latents.

Reports images/s (median over --repeats, after one warm-up/compile run for fairjax, whose
compile time is printed separately), the ratio fairjax / diffusers, and the largest pixel
difference between the two pipelines' images. Runs are interleaved so background load hits
both sides alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# torch runs with PyTorch's own OpenMP wait policy (libgomp spins a while at each barrier, then sleeps), as
# its users run it. Until 2026-12-07 this script set OMP_WAIT_POLICY=PASSIVE, which slowed torch 1.7x on a
# quiet 2-core machine (BENCHMARKS.md, "PyTorch's OpenMP wait policy"). On a machine shared with other jobs
# spinning hurts torch instead: export OMP_WAIT_POLICY=PASSIVE there. The header prints what was in effect.

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fairjax.diffusion import pipeline as pl  # noqa: E402
from test_pipeline import build_tiny_sdxl, convert_tiny_sdxl, noise_for  # noqa: E402

UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 128, cross_attention_dim=256,
)
VAE = dict(
    block_out_channels=(32, 64, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=128,
    scaling_factor=0.13025,
)
PROMPTS = ["a photo of a cat", "the nurse", "an astronaut's dog", "a photo of the dog"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompts = PROMPTS[: args.prompts]
    n_images = len(prompts) * args.per_prompt

    with tempfile.TemporaryDirectory(prefix="bench_sampling_") as root:  # the two ~200 MB model folders
        _run(args, prompts, n_images, root)


def _run(args, prompts, n_images, root) -> None:
    ref = build_tiny_sdxl(os.path.join(root, "diffusers"), unet=UNET, vae=VAE, text_hidden=128, text_layers=4)
    ref.set_progress_bar_config(disable=True)
    pipe = pl.load_pipeline(convert_tiny_sdxl(os.path.join(root, "diffusers"), os.path.join(root, "fairjax")))
    mesh = pl.local_mesh(jax.local_devices()[:1])
    options = pl.SampleOptions(sampler="euler", steps=args.steps, guidance_scale=args.cfg)
    t2i = pl.Text2Image(pipe, options, batch_size=n_images, mesh=mesh)
    jobs = [(p, i) for p in range(len(prompts)) for i in range(args.per_prompt)]
    noise = torch.from_numpy(np.array(noise_for(pipe, jobs)))

    def run_fairjax():
        return t2i([prompts[p] for p, _ in jobs], [p for p, _ in jobs], [i for _, i in jobs], 0)[0]

    def run_diffusers():
        with torch.no_grad():
            out = ref(prompts, num_images_per_prompt=args.per_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.cfg, latents=noise, output_type="pil")
        return np.stack([np.asarray(im) for im in out.images])

    t0 = time.perf_counter()
    got = run_fairjax()
    compile_s = time.perf_counter() - t0
    times = {"fairjax": [], "diffusers": []}
    want = None
    for _ in range(args.repeats):
        for name, fn in (("diffusers", run_diffusers), ("fairjax", run_fairjax)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "diffusers":
                want = out
            else:
                got = out
    diff = int(np.abs(got.astype(int) - want.astype(int)).max())
    ips = {k: n_images / statistics.median(v) for k, v in times.items()}
    print(f"devices: {jax.devices()[0].platform} x1 (jax), torch threads {torch.get_num_threads()} "
          f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}); "
          f"{n_images} images {got.shape[1]}x{got.shape[2]}, {args.steps} Euler steps, cfg {args.cfg}, float32")
    print(f"fairjax first call (compile + run): {compile_s:.1f} s")
    for k in ("diffusers", "fairjax"):
        print(f"{k:10s} {ips[k]:.3f} images/s   (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in times[k])} s per batch)")
    print(f"ratio fairjax / diffusers images/s: {ips['fairjax'] / ips['diffusers']:.2f}x   "
          f"max pixel diff {diff}/255")


if __name__ == "__main__":
    main()
