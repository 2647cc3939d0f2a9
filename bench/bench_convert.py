#!/usr/bin/env python
"""Full-size SDXL UNet: a diffusers folder to a ready-to-run model, fairjax vs diffusers' from_pretrained.

    python bench/bench_convert.py [--workdir /tmp/fairjax_bench_convert] [--rounds 2] [--keep] [--tool]

Writes a random fp16 SDXL base UNet (2,567,463,684 params, ~5.1 GB; keys and
shapes from the Flax model's export mapping, config = SDXL base
``unet/config.json``) once into ``--workdir`` (reused when it is already there),
then, ``--rounds`` times, each in its own subprocess and in this order:

1. diffusers: ``UNet2DConditionModel.from_pretrained(src, torch_dtype=float16)`` (lazy: the
   weights stay memory-mapped until used),
2. the same, then one element read from every 4 KB page of every parameter (all of it resident),
3. fairjax cold: ``fairjax.convert.resolve.resolve_model(src)`` with an empty model cache
   (``$FAIRJAX_CACHE_DIR``): the conversion into the cache (no dtype change: a ``params.link.json``
   to the source file, :mod:`fairjax.io.linked`), then ``fairjax.models.unet.load`` of the entry
   (params as stored, float16: read-only views of the source's memory map, kernels transposed
   views, as diffusers maps it),
4. fairjax warm: the same command again: the cache is found and loaded,
5. fairjax warm, then every page read as in 2,
6. with ``--tool``: ``tools/convert_diffusers.py src out --dtype float16`` (the conversion alone, as
   BENCHMARKS.md measured it before the model cache: every tensor read, transposed and written).

and prints wall time and peak RSS (``ru_maxrss`` of the child) of each, with
ratios: time vs that round's diffusers run, RSS vs the checkpoint size. The
source file is in the page cache for all runs (it was just written or read).
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
import sys, time, torch, diffusers
t0 = time.perf_counter()
m = diffusers.UNet2DConditionModel.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
t1 = time.perf_counter()
if sys.argv[2:] == ["touch"]:  # read one element per 4 KB page: every page resident
    for p in m.parameters():
        float(p.data.reshape(-1)[::2048].float().sum())
print(sum(p.numel() for p in m.parameters()), f"load {t1 - t0:.1f}s, touch {time.perf_counter() - t1:.1f}s")
"""

_FAIRJAX = """
import sys, time
t0 = time.perf_counter()
from fairjax.convert.resolve import resolve_model
from fairjax.models import unet
d = resolve_model(sys.argv[1], log=lambda m: None)
t1 = time.perf_counter()
m, p = unet.load(d)
t2 = time.perf_counter()
import jax, numpy as np
if sys.argv[2:] == ["touch"]:  # read one element per 4 KB page: every page resident
    for x in jax.tree.leaves(p):
        float(np.asarray(x).reshape(-1)[::2048].astype(np.float32).sum())
print(sum(x.size for x in jax.tree.leaves(p)), f"resolve {t1 - t0:.1f}s, load {t2 - t1:.1f}s, "
      f"touch {time.perf_counter() - t2:.1f}s")
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


def measure(cmd: list[str], env: dict | None = None) -> tuple[int, float, int, str]:
    """(return code, wall seconds, peak RSS bytes, last stdout line) of ``cmd`` in a fresh child."""
    out = subprocess.run([sys.executable, "-c", _RUNNER, *cmd], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})))
    lines = out.stdout.splitlines()
    line = [x for x in lines if x.startswith("@@ ")][-1].split()
    if int(line[1]) != 0:
        print(out.stdout[-2000:], out.stderr[-2000:])
    said = [x for x in lines if not x.startswith("@@ ")]
    return int(line[1]), float(line[2]), int(line[3]) * 1024, said[-1] if said else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/fairjax_bench_convert")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--tool", action="store_true", help="also time tools/convert_diffusers.py --dtype float16")
    args = ap.parse_args()
    src = os.path.join(args.workdir, "unet")
    cache = os.path.join(args.workdir, "cache")
    weights = os.path.join(src, "diffusion_pytorch_model.safetensors")
    env = {"FAIRJAX_CACHE_DIR": cache, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    try:
        t0 = time.perf_counter()
        if os.path.isfile(weights) and os.path.isfile(os.path.join(src, "config.json")):
            from fairjax.io.safetensors import SafetensorsReader

            with SafetensorsReader(weights) as rd:
                n = sum(math.prod(rd.shape(k)) for k in rd.keys())
            print(f"reusing {src}")
        else:
            n = write_source(src)
            print(f"wrote random fp16 SDXL UNet ({n:,} params) in {time.perf_counter() - t0:.0f}s")
        size = os.path.getsize(weights)
        print(f"checkpoint: {n:,} params, {size / 1e9:.2f} GB; load average {os.getloadavg()[0]:.1f}")
        runs = {
            "diffusers from_pretrained fp16": [sys.executable, "-c", _DIFFUSERS, src],
            "diffusers + read every page": [sys.executable, "-c", _DIFFUSERS, src, "touch"],
            "fairjax cold (convert + load)": [sys.executable, "-c", _FAIRJAX, src],
            "fairjax warm (cached: load)": [sys.executable, "-c", _FAIRJAX, src],
            "fairjax warm + read every page": [sys.executable, "-c", _FAIRJAX, src, "touch"],
        }
        if args.tool:
            runs["convert_diffusers --dtype float16"] = [
                sys.executable, os.path.join(ROOT, "tools", "convert_diffusers.py"), src,
                os.path.join(args.workdir, "fj16"), "--dtype", "float16"]
        for r in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            base = None
            for name, cmd in runs.items():
                rc, wall, rss, said = measure(cmd, env)
                base = base or wall
                print(f"round {r + 1}: {name:34s} rc {rc}  wall {wall:6.1f}s ({wall / base:.2f}x diffusers)  peak RSS "
                      f"{rss / 1e9:5.2f} GB ({rss / size:.2f}x the checkpoint)  {said}", flush=True)
                shutil.rmtree(os.path.join(args.workdir, "fj16"), ignore_errors=True)
            print(f"load average {os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        else:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
