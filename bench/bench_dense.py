#!/usr/bin/env python
"""The weight gradient of a Dense layer on XLA:CPU: as JAX differentiates ``x @ W`` for an input with
leading (batch, token) axes, and with those axes flattened first (``fairjax.models.layers.dense_dot_general``).

    python bench/bench_dense.py            # all parts
    python bench/bench_dense.py --part dots|mlp|bmm

``dots``: ``dW`` (the VJP of ``x @ W`` w.r.t. ``W`` at cotangent ``g``) at the 50M UNet's shapes (batch, tokens,
in, out), jitted, median of ``--calls`` calls, ms and GFLOP/s, and the copies and transposes in the compiled
program: ``x`` as ``(B, T, in)``, ``x`` flattened to ``(B*T, in)``, and torch's ``x.T @ g`` beside them.

``mlp``: the gradient of a 4-layer pre-norm MLP stack (layer norm, Dense up, GELU, Dense down, residual)
with every Dense through ``lax.dot_general`` or through ``dense_dot_general``, interleaved, ms per call.

``bmm``: the batched products of the 50M UNet's forward (the attention's ``q k^T`` and ``p v`` with the heads
folded into the batch, and Winograd's 16 ``(tiles, C_in) x (C_in, C_out)`` products), as one batched
``dot_general``, as one dot per batch element, and torch's ``bmm``, ms and GFLOP/s. XLA picks its kernel with
``XLA_FLAGS`` (for example ``--xla_cpu_experimental_ynn_fusion_type=``), so compare flags by running it twice.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _torch_util import timeit  # noqa: E402

SHAPES = [(4, 64, 256, 256), (4, 1024, 128, 128), (4, 1024, 128, 1024), (4, 256, 256, 1024), (4, 256, 512, 256),
          (4, 1024, 512, 128), (4, 256, 1024, 256)]  # batch, tokens, in, out
BMM = [(16, 256, 32, 256, "16x16 self-attention q k^T"), (16, 256, 256, 32, "16x16 self-attention p v"),
       (16, 256, 32, 77, "16x16 cross-attention q k^T"), (32, 64, 32, 64, "8x8 self-attention q k^T"),
       (16, 1024, 64, 64, "Winograd 32x32x64"), (16, 256, 128, 128, "Winograd 16x16x128"),
       (16, 64, 256, 256, "Winograd 8x8x256")]  # batch, M, K, N
MLP = [(4, 256, 256, 1024), (4, 1024, 128, 512), (4, 64, 256, 1024)]  # batch, tokens, width, hidden


def _time(fn, calls):
    """Median milliseconds of ``calls`` calls after one warm-up call."""
    return timeit(fn, calls) * 1e3


def _cell(ms: float, gflop: float) -> str:
    """A table cell: milliseconds and the GFLOP/s they give."""
    return f"{ms:8.3f} ms {gflop / ms * 1e3:4.0f} GF"


def dots(calls: int):
    import re

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    print(f"dW of x @ W, ms, GFLOP/s and [copies + transposes compiled], median of {calls} calls; "
          f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    print(f"{'B,T,in,out':>18} {'x (B, T, in)':>26} {'x (B*T, in)':>26} {'torch x.T @ g':>18}")

    def dw(flat):
        def f(x, w, g):
            def y(w):
                xx = x.reshape(-1, x.shape[-1]) if flat else x
                return jax.lax.dot_general(xx, w, (((xx.ndim - 1,), (0,)), ((), ())))
            return jax.vjp(y, w)[1](g.reshape(-1, g.shape[-1]) if flat else g)[0]
        return jax.jit(f)

    for b, t, ci, co in SHAPES:
        x = rng.standard_normal((b, t, ci), dtype=np.float32)
        g = rng.standard_normal((b, t, co), dtype=np.float32)
        w = np.zeros((ci, co), np.float32)
        xj, gj, wj = (jax.numpy.asarray(v) for v in (x, g, w))
        xt_, gt_ = torch.from_numpy(x.reshape(-1, ci)), torch.from_numpy(g.reshape(-1, co))
        gflop = 2 * b * t * ci * co / 1e9
        cells = []
        for flat in (False, True):
            fn = dw(flat)
            hlo = fn.lower(xj, wj, gj).compile().as_text()
            copies = len(re.findall(r"= \S+ (?:copy|transpose)\(|copy_bitcast_fusion\S* = ", hlo))
            m = _time(lambda: fn(xj, wj, gj).block_until_ready(), calls)
            cells.append(f"{_cell(m, gflop)} [{copies}]")
        cells.append(_cell(_time(lambda: xt_.T @ gt_, calls), gflop))
        print(f"{f'{b},{t},{ci},{co}':>18} " + " ".join(f"{c:>26}" for c in cells), flush=True)


def bmm(calls: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    batched = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,)))))
    per_item = jax.jit(lambda a, b: jnp.stack([a[i] @ b[i] for i in range(a.shape[0])]))
    print(f"\nbatched products, ms and GFLOP/s, median of {calls} calls; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{'batch,M,K,N':>18} {'batched dot_general':>22} {'one dot per item':>22} {'torch bmm':>22}  "
          f"max relative difference to torch")
    for n, m, k, c, what in BMM:
        a = rng.standard_normal((n, m, k), dtype=np.float32)
        b = rng.standard_normal((n, k, c), dtype=np.float32)
        aj, bj, at, bt = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        gflop = 2 * n * m * k * c / 1e9
        want = torch.bmm(at, bt).numpy()
        cells, diff = [], 0.0
        for fn in (batched, per_item):
            diff = max(diff, float(np.abs(np.asarray(fn(aj, bj)) - want).max() / np.abs(want).max()))
            cells.append(_cell(_time(lambda fn=fn: fn(aj, bj).block_until_ready(), calls), gflop))
        cells.append(_cell(_time(lambda: torch.bmm(at, bt), calls), gflop))
        print(f"{f'{n},{m},{k},{c}':>18} " + " ".join(f"{x:>22}" for x in cells) + f"  {diff:.1e}  ({what})",
              flush=True)


def mlp(calls: int, rounds: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fairjax.models.layers import dense_dot_general, gelu

    def plain(x, w):
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))

    def ours(x, w):
        return dense_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))

    def model(params, h, dense):
        for w1, w2 in params:
            m = h.mean(-1, keepdims=True)
            x = (h - m) * jax.lax.rsqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-5)
            h = h + dense(gelu(dense(x, w1)), w2)
        return (h ** 2).mean()

    rng = np.random.default_rng(0)
    print(f"\ngradient of a 4-layer MLP stack, ms per call (median of {calls} calls, {rounds} interleaved rounds)")
    for b, t, c, f in MLP:
        params = [(jnp.asarray(rng.standard_normal((c, f), dtype=np.float32) * 0.05),
                   jnp.asarray(rng.standard_normal((f, c), dtype=np.float32) * 0.05)) for _ in range(4)]
        h = jnp.asarray(rng.standard_normal((b, t, c), dtype=np.float32))
        arms = {name: jax.jit(jax.grad(lambda p, h, d=d: model(p, h, d))) for name, d in
                [("lax.dot_general", plain), ("dense_dot_general", ours)]}
        got = {n: fn(params, h) for n, fn in arms.items()}
        diff = max(float(jnp.abs(a - b).max() / jnp.abs(a).max())
                   for a, b in zip(*(jax.tree.leaves(v) for v in got.values())))
        ms = {n: [] for n in arms}
        for _ in range(rounds):
            for n, fn in arms.items():
                ms[n].append(_time(lambda fn=fn: jax.block_until_ready(fn(params, h)), calls))
        base, new = (statistics.median(v) for v in ms.values())
        print(f"  batch {b}, {t} tokens, {c} -> {f} -> {c}: lax {base:7.2f} ms, dense_dot_general {new:7.2f} ms "
              f"({new / base:4.2f}x); max relative gradient difference {diff:.1e}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["dots", "mlp", "bmm", "all"], default="all")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if a.part in ("dots", "all"):
        dots(a.calls)
    if a.part in ("mlp", "all"):
        mlp(max(1, a.calls // 3), a.rounds)
    if a.part in ("bmm", "all"):
        bmm(a.calls)


if __name__ == "__main__":
    main()
