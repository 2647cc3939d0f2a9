#!/usr/bin/env python
"""The toy world's sampling throughput against the images per call (``sample.batch_size``).

    python bench/toy_sampling_batch.py [--sizes 64 128 256 512 1024] [--images 2048]

Samples ``--images`` images of one prompt with the toy main job's sampler (the shipped toy model,
``configs/toy_world.py``'s DDIM steps, no guidance) through :class:`fairjax.diffusion.generator.Generator`
at each call size, in one process with the entry points' malloc tunables, and prints the first call's
time (compile + run) and images/s over the rest. Images do not depend on the call size beyond float
rounding (``tests/test_pipeline.py``), so the size is a speed setting only. A job whose image count is
not a multiple of it pays for padding rows in its last call; this benchmark does not when ``--images`` is a
multiple of every size given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--images", type=int, default=2048)
    args = ap.parse_args(argv)
    from fairjax.io.host import tune_allocator

    tune_allocator()  # the same process setup as python -m fairjax.toy.run
    import jax

    from fairjax.data.build_prefs import sample_options
    from fairjax.diffusion.generator import Generator, load_any_pipeline
    from fairjax.toy.config import make_config
    from fairjax.toy.model import default_model_dir

    c = make_config(None)
    pipe = load_any_pipeline(default_model_dir())
    print(f"toy model, {c.sample.sampler} {c.sample.steps} steps, {args.images} images per size, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device(s))")
    for bs in args.sizes:
        gen = Generator(pipe, sample_options(c), batch_size=bs)
        t0 = time.perf_counter()
        list(gen.run(["a doctor"], [bs], 0))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(gen.run(["a doctor"], [args.images], 0))
        rate = args.images / (time.perf_counter() - t0)
        print(f"images per call {bs:5d}: first call {first:5.1f} s, {rate:6.0f} images/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
