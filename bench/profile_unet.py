#!/usr/bin/env python
"""Where the 50M SDXL-shaped UNet's CPU time goes, Flax and PyTorch, by kind of operation.

    python bench/profile_unet.py [--what fwd|step] [--calls 3] [--top 20]

Builds both sides as ``bench/bench_unet.py`` does (same config, weights, inputs, train step; the malloc
tunables and synchronous CPU dispatch of fairjax's entry points), warms up, then traces ``--calls`` calls:

* Flax: a ``jax.profiler`` trace. Each kernel is named by the compiled HLO of the same function (lowered
  again with the same arguments): matmul (a ``dot``, in a YNN fusion or alone), convolution, reduction,
  copy/transpose, or other elementwise fusion. Matmuls and convolutions get their FLOPs from their shapes,
  so the table shows GFLOP/s per shape.
* PyTorch: ``torch.profiler``'s self CPU time per aten op, grouped the same way.

Times are per call and summed over threads: XLA runs independent kernels on both cores at once, so the
Flax sum can exceed the wall time. Timings drift with the machine; compare the two sides of one run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fairjax.io.host import tune_allocator  # noqa: E402

if __name__ == "__main__":
    tune_allocator()

import bench_unet  # noqa: E402
import jax  # noqa: E402
import torch  # noqa: E402

TORCH_KIND = {"mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
              "_scaled_dot_product_flash_attention_for_cpu": "attention",
              "_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
              "mkldnn_convolution": "convolution", "convolution_backward": "convolution",
              "copy_": "copy/transpose", "clone": "copy/transpose", "contiguous": "copy/transpose",
              "native_group_norm": "norm", "native_layer_norm": "norm", "native_group_norm_backward": "norm",
              "native_layer_norm_backward": "norm"}


def _dims(text):
    return [int(d) for d in text.split(",") if d]


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def hlo_kernels(hlo: str) -> dict:
    """{instruction name: (kind, shape description, FLOPs)} for the ENTRY's kernels of compiled HLO text."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
    out = {}
    entry = hlo[hlo.index("ENTRY"):]
    entry_shapes = {q.group(1): q.group(2) for q in re.finditer(r"\n\s+(?:ROOT )?%?([\w.\-]+) = f32\[([\d,]*)\]", entry)}
    for m in re.finditer(r"\n\s+(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(([^\n]*)", entry):
        name, op, rest = m.group(1), m.group(3), m.group(4)
        body = rest
        if op == "fusion":
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            body = bodies.get(calls.group(1), "") if calls else ""
        shapes = {q.group(1): q.group(2) for q in re.finditer(r"%?([\w.\-]+) = f32\[([\d,]*)\]", body)}
        if op != "fusion":  # a kernel on its own: its operands are ENTRY instructions
            shapes = entry_shapes
            body = f"%{name} = f32[{shapes.get(name, '')}] {op}({rest}"
        dot = re.search(r"%?([\w.\-]+) = f32\[([\d,]*)\][^\n]* dot\(%?([\w.\-]+), %?([\w.\-]+)\)[^\n]*"
                        r"lhs_contracting_dims=\{([\d,]*)\}", body)
        conv = re.search(r"%?([\w.\-]+) = f32\[([\d,]*)\][^\n]* convolution\(%?([\w.\-]+), %?([\w.\-]+)\)", body)
        if dot and dot.group(3) in shapes:
            lhs, k = _dims(shapes[dot.group(3)]), 1
            for c in _dims(dot.group(5)):
                k *= lhs[c]
            o = _dims(dot.group(2))
            out[name] = ("matmul", f"{shapes[dot.group(3)]} x {shapes.get(dot.group(4), '?')} -> {dot.group(2)}",
                         2 * _prod(o) * k)
        elif conv and conv.group(4) in shapes:
            o, w = _dims(conv.group(2)), _dims(shapes[conv.group(4)])
            out[name] = ("convolution", f"{shapes.get(conv.group(3), '?')} * {shapes[conv.group(4)]} -> "
                         f"{conv.group(2)}", 2 * _prod(o) * _prod(w) // max(o[-1], 1))
        elif "transpose" in name or name.startswith("copy") or " copy(" in body:
            out[name] = ("copy/transpose", "", 0)
        elif " reduce(" in body:
            out[name] = ("reduction", "", 0)
        else:
            out[name] = ("elementwise/other", "", 0)
    return out


def profile_flax(args):
    info, fns = bench_unet.build("flax", args)
    fn = fns[args.what]
    for _ in range(2):
        fn()
    kernels = hlo_kernels(bench_unet.JITTED[args.what]().compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        jax.profiler.start_trace(d)
        for _ in range(args.calls):
            fn()
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - t0) / args.calls
        trace = json.load(gzip.open(sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))[-1]))
    kinds, shapes = collections.Counter(), collections.defaultdict(lambda: [0.0, 0, 0])
    counts = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or e["name"] not in kernels:
            continue
        kind, shape, flops = kernels[e["name"]]
        kinds[kind] += e["dur"] / 1e3 / args.calls
        counts[kind] += 1
        if flops:
            s = shapes[(kind, shape)]
            s[0] += e["dur"] / 1e3 / args.calls
            s[1] += 1
            s[2] += flops / args.calls
    return wall, {k: (v, counts[k] // args.calls) for k, v in kinds.items()}, shapes


def profile_torch(args):
    info, fns = bench_unet.build("torch", args)
    fn = fns[args.what]
    fn()
    t0 = time.perf_counter()
    with torch.profiler.profile() as prof:
        for _ in range(args.calls):
            fn()
    wall = (time.perf_counter() - t0) / args.calls
    kinds, counts = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        op = ev.key.removeprefix("aten::")
        if not ev.key.startswith("aten::") or ev.self_cpu_time_total <= 0:
            continue
        kind = TORCH_KIND.get(op, "in-place elementwise" if op.endswith("_") else "elementwise/other")
        kinds[kind] += ev.self_cpu_time_total / 1e3 / args.calls
        counts[kind] += ev.count // args.calls
    return wall, {k: (v, counts[k]) for k, v in kinds.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", choices=("fwd", "step"), default="fwd")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=20, help="matmul/convolution shapes listed (by time)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seq", type=int, default=77)
    args = ap.parse_args()
    args.attention, args.remat, args.scan_layers = None, "none", False
    fwall, fk, shapes = profile_flax(args)
    twall, tk = profile_torch(args)
    print(f"{args.what}: wall per call (profiled) flax {fwall * 1e3:.1f} ms, torch {twall * 1e3:.1f} ms; "
          f"kernel time per call, summed over threads:")
    print(f"{'kind':20s} {'flax ms':>9s} {'kernels':>8s} {'torch ms':>9s} {'ops':>6s}")
    for kind in sorted(set(fk) | set(tk), key=lambda k: -max(fk.get(k, (0,))[0], tk.get(k, (0,))[0])):
        f, t = fk.get(kind, (0.0, 0)), tk.get(kind, (0.0, 0))
        print(f"{kind:20s} {f[0]:9.1f} {f[1]:8d} {t[0]:9.1f} {t[1]:6d}")
    print(f"{'total':20s} {sum(v[0] for v in fk.values()):9.1f} {'':8s} {sum(v[0] for v in tk.values()):9.1f}")
    for kind in ("matmul", "convolution"):
        ms = sum(v[0] for (k, _), v in shapes.items() if k == kind)
        gf = sum(v[2] for (k, _), v in shapes.items() if k == kind) / 1e9
        if ms:
            print(f"flax {kind}: {gf:.2f} GFLOP per call at {gf / ms * 1e3:.0f} GFLOP/s")
    print("flax matmul/convolution shapes, slowest first (ms per call, kernels, GFLOP/s):")
    for (kind, shape), (ms, n, fl) in sorted(shapes.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {ms:7.2f} ms x{n // args.calls:4d} {fl / ms / 1e6:6.0f}  {kind:11s} {shape}")


if __name__ == "__main__":
    main()
