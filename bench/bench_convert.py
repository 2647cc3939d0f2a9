#!/usr/bin/env python
"""Full-size SDXL UNet conversion: tools/convert_diffusers.py vs diffusers' from_pretrained.

    python bench/bench_convert.py [--workdir /tmp/fairjax_bench_convert] [--keep]

Writes a random fp16 SDXL base UNet (2,567,463,684 params, ~5.1 GB; keys and
shapes from the Flax model's export mapping, config = SDXL base
``unet/config.json``) once into ``--workdir``, then runs, each in its own
subprocess and in this order:

1. ``UNet2DConditionModel.from_pretrained(src, torch_dtype=float16)`` (diffusers),
2. ``tools/convert_diffusers.py src out --dtype float16``,
3. ``tools/convert_diffusers.py src out --dtype float32``,

and prints wall time and peak RSS (``ru_maxrss`` of the child) of each, with
ratios: time vs diffusers, RSS vs the checkpoint size in the target dtype.
The source file is in the page cache for all runs (it was just written).
Everything under ``--workdir`` is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _torch_util import SDXL_UNET_CONFIG as SDXL_CONFIG  # noqa: E402  (the real SDXL base unet/config.json)

_RUNNER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
dt = time.perf_counter() - t0
print(f"@@ {rc} {dt:.3f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""

_DIFFUSERS = """
import sys, torch, diffusers
m = diffusers.UNet2DConditionModel.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
print(sum(p.numel() for p in m.parameters()))
"""


class _Random:
    """One random fp16 tensor, made when the writer asks for it."""

    def __init__(self, shape, seed):
        self.shape, self.dtype, self.seed = tuple(shape), np.dtype(np.float16), seed

    def __array__(self, dtype=None, copy=None):
        rng = np.random.default_rng(self.seed)
        scale = 1.0 / math.sqrt(max(1, math.prod(self.shape[1:])))
        return (rng.standard_normal(self.shape, dtype=np.float32) * scale).astype(np.float16)


def write_source(folder: str) -> int:
    from fairjax.convert import unet as unet_convert
    from fairjax.io.safetensors import write_safetensors

    os.makedirs(folder, exist_ok=True)
    shapes = unet_convert.target_shapes(SDXL_CONFIG)
    items = [(unet_convert.torch_key(p), _Random(unet_convert.torch_shape(s, p[-1]), i))
             for i, (p, s) in enumerate(sorted(shapes.items()))]
    write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), items)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SDXL_CONFIG, f)
    return sum(math.prod(s) for s in shapes.values())


def measure(cmd: list[str]) -> tuple[int, float, int]:
    """(return code, wall seconds, peak RSS bytes) of ``cmd`` in a fresh child."""
    out = subprocess.run([sys.executable, "-c", _RUNNER, *cmd], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("@@ ")][-1].split()
    if int(line[1]) != 0:
        print(out.stdout[-2000:], out.stderr[-2000:])
    return int(line[1]), float(line[2]), int(line[3]) * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/fairjax_bench_convert")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    src = os.path.join(args.workdir, "unet")
    try:
        t0 = time.perf_counter()
        n = write_source(src)
        size16 = os.path.getsize(os.path.join(src, "diffusion_pytorch_model.safetensors"))
        print(f"wrote random fp16 SDXL UNet ({n:,} params, {size16 / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s")
        runs = {
            "diffusers from_pretrained fp16": ([sys.executable, "-c", _DIFFUSERS, src], 2 * n),
            "convert_diffusers --dtype float16": ([sys.executable, os.path.join(ROOT, "tools", "convert_diffusers.py"),
                                                   src, os.path.join(args.workdir, "fj16")] + ["--dtype", "float16"],
                                                  2 * n),
            "convert_diffusers --dtype float32": ([sys.executable, os.path.join(ROOT, "tools", "convert_diffusers.py"),
                                                   src, os.path.join(args.workdir, "fj32")] + ["--dtype", "float32"],
                                                  4 * n),
        }
        base = None
        for name, (cmd, target_bytes) in runs.items():
            rc, wall, rss = measure(cmd)
            base = base or wall
            print(f"{name:36s} rc {rc}  wall {wall:6.1f}s ({wall / base:.2f}x diffusers)  peak RSS "
                  f"{rss / 1e9:5.2f} GB ({rss / target_bytes:.2f}x the {target_bytes / 1e9:.2f} GB target)")
            for d in ("fj16", "fj32"):
                shutil.rmtree(os.path.join(args.workdir, d), ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
