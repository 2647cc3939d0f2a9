#!/usr/bin/env python
"""Per-call time of fairjax's attention implementations on the 50M SDXL-shaped UNet's attention shapes, CPU.

    python bench/bench_attention.py [--calls 30]

For each shape (batch, queries, keys, heads, head width), the median of 5 rounds of ``--calls`` jitted calls:
the forward, and the gradient of ``sum(out ** 2)`` with respect to q, k and v. The UNet at batch 4 has
self- and cross-attention (77 context tokens) at 16x16 (4 heads of 32) and 8x8 (8 heads of 32).
``xla`` is ``jax.nn.dot_product_attention``'s XLA path; ``batched`` folds the heads into the batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fairjax.models.attention import dot_product_attention  # noqa: E402

SHAPES = [(4, 256, 256, 4, 32), (4, 256, 77, 4, 32), (4, 64, 64, 8, 32), (4, 64, 77, 8, 32)]
IMPLEMENTATIONS = ("xla", "einsum", "batched")


def _median_ms(f, args, calls):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - t0) / calls)
    return sorted(rounds)[2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}); ms per call, forward / gradient")
    print(f"{'(B, T, S, N, H)':22s} " + " ".join(f"{i:>16s}" for i in IMPLEMENTATIONS))
    for b, t, s, n, h in SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, t, n, h))
        k = jax.random.normal(keys[1], (b, s, n, h))
        v = jax.random.normal(keys[2], (b, s, n, h))
        cells = []
        for impl in IMPLEMENTATIONS:
            def fwd(q, k, v, impl=impl):
                return dot_product_attention(q, k, v, implementation=impl)

            grad = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) ** 2), argnums=(0, 1, 2))
            cells.append(f"{_median_ms(fwd, (q, k, v), args.calls):6.3f} / {_median_ms(grad, (q, k, v), args.calls):6.3f}")
        print(f"{str((b, t, s, n, h)):22s} " + " ".join(f"{c:>16s}" for c in cells))


if __name__ == "__main__":
    main()
