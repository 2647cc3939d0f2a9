#!/usr/bin/env python
"""The convolutions of the 50M SDXL-shaped UNet on XLA:CPU: XLA's direct convolution
(``lax.conv_general_dilated``) against fairjax's (``fairjax.models.layers.conv_general_dilated``: Winograd
F(2x2, 3x3) for 3x3 kernels, a matrix product for 1x1) and PyTorch's ``conv2d`` (oneDNN), forward and
gradient, side by side in one process.

    python bench/bench_conv.py                 # forward and gradient at every shape
    python bench/bench_conv.py --calls 50 --rounds 3
    python bench/bench_conv.py --sdxl          # forward only, at full-size SDXL shapes (1024x1024 images)
    python bench/bench_conv.py --vae 256       # the SDXL VAE's decode to 256x256, fairjax's Conv on and off

Each shape is (batch, height, width, in channels, out channels, kernel size, stride) with a count of how often one forward of
``bench/bench_unet.py``'s UNet runs it; the table gives the median ms per call over ``--rounds`` interleaved
rounds of ``--calls`` calls, the gradient as ``jax.grad`` / ``torch.autograd`` of ``sum(y * g)`` w.r.t. input and
kernel, and the largest relative difference of each Flax form from torch's output. The gradient's ``fairjax``
column is what fairjax runs (``WINOGRAD_DIFFERENTIATED = "direct"``: XLA's direct convolution, so the same as
``lax`` up to noise, but for 1x1 kernels), ``wino-fwd`` the Winograd forward with the direct convolution's
derivatives, ``wino-bwd`` differentiating through the Winograd transforms. The
last line weights each shape by its count: the convolutions' share of one UNet forward and train step.

``--sdxl``: the forward alone at the full-size SDXL UNet's 3x3 convolutions (128x128 latents, batch 2 as with
classifier-free guidance) and one VAE decoder convolution, 5 calls each.

``--vae RES``: the full-size SDXL VAE decoder (random weights) decoding one latent to RES x RES pixels, with
``WINOGRAD_ON_CPU`` off and on, interleaved over ``--rounds`` rounds; median seconds per call and the largest
relative difference between the two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _torch_util import rel, timeit  # noqa: E402

# (B, H, W, C_in, C_out, kernel, stride): count per forward of bench_unet's CONFIG at batch 4, 32x32 latents
# (read from the jaxpr of one forward)
SHAPES = [((4, 8, 8, 256, 256, 3, 1), 10), ((4, 32, 32, 64, 64, 3, 1), 7), ((4, 16, 16, 128, 128, 3, 1), 6),
          ((4, 8, 8, 512, 256, 3, 1), 2), ((4, 32, 32, 128, 64, 3, 1), 2), ((4, 32, 32, 4, 64, 3, 1), 1),
          ((4, 16, 16, 64, 128, 3, 1), 1), ((4, 8, 8, 128, 256, 3, 1), 1), ((4, 8, 8, 384, 256, 3, 1), 1),
          ((4, 16, 16, 256, 256, 3, 1), 1), ((4, 16, 16, 384, 128, 3, 1), 1), ((4, 16, 16, 256, 128, 3, 1), 1),
          ((4, 16, 16, 192, 128, 3, 1), 1), ((4, 32, 32, 128, 128, 3, 1), 1), ((4, 32, 32, 192, 64, 3, 1), 1),
          ((4, 32, 32, 64, 4, 3, 1), 1), ((4, 32, 32, 64, 64, 3, 2), 1), ((4, 16, 16, 128, 128, 3, 2), 1),
          ((4, 8, 8, 512, 256, 1, 1), 2), ((4, 32, 32, 128, 64, 1, 1), 2), ((4, 16, 16, 64, 128, 1, 1), 1),
          ((4, 8, 8, 128, 256, 1, 1), 1), ((4, 8, 8, 384, 256, 1, 1), 1), ((4, 16, 16, 384, 128, 1, 1), 1),
          ((4, 16, 16, 256, 128, 1, 1), 1), ((4, 16, 16, 192, 128, 1, 1), 1), ((4, 32, 32, 192, 64, 1, 1), 1)]


def _conv(conv, x, w, stride=1, pad=1):
    """``conv`` (``lax.conv_general_dilated`` or fairjax's) of NHWC ``x`` with HWIO ``w``."""
    import jax

    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return conv(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=dims)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=None, help="calls per timing (default 30; 5 with --sdxl)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sdxl", action="store_true", help="forward only, full-size SDXL shapes")
    p.add_argument("--shapes", type=int, default=None, help="only the first N shapes (a quick check)")
    p.add_argument("--vae", type=int, default=None, metavar="RES", help="A/B of the SDXL VAE decode to RES px")
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from fairjax.io.host import tune_allocator

    tune_allocator()
    from fairjax.models import layers

    torch.set_num_threads(os.cpu_count() or 1)
    if a.sdxl:
        return sdxl(a.calls or 5)
    if a.vae:
        return vae_decode(a.vae, a.rounds)
    calls = a.calls or 30

    print(f"convolutions, ms per call (median of {calls} calls x {a.rounds} interleaved rounds); "
          f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    print(f"{'B,H,W,Cin,Cout,k,s':>22} {'n':>3} | {'fwd lax':>8} {'fairjax':>8} {'torch':>8} | "
          f"{'grad lax':>8} {'fairjax':>8} {'wino-fwd':>8} {'wino-bwd':>8} {'torch':>8} | "
          "rel. diff to torch (lax, fairjax)")
    rng = np.random.default_rng(0)
    total = np.zeros(8)
    for (b, h, wd, ci, co, ks, st), n in SHAPES[:a.shapes]:
        pad = (ks - 1) // 2

        def direct(x, w):
            return _conv(jax.lax.conv_general_dilated, x, w, st, pad)

        def ours(x, w):
            return _conv(layers.conv_general_dilated, x, w, st, pad)

        def grad_of(conv, differentiated="direct"):
            def f(x, w, g):
                layers.WINOGRAD_DIFFERENTIATED = differentiated  # read while tracing
                try:
                    return jax.grad(lambda x, w: jnp.vdot(conv(x, w), g), (0, 1))(x, w)
                finally:
                    layers.WINOGRAD_DIFFERENTIATED = "direct"
            return jax.jit(f)

        x = rng.standard_normal((b, h, wd, ci), dtype=np.float32)
        k = (rng.standard_normal((ks, ks, ci, co)) / np.sqrt(ks * ks * ci)).astype(np.float32)
        g = rng.standard_normal((b, h // st, wd // st, co), dtype=np.float32)
        xj, kj, gj = (jnp.asarray(v) for v in (x, k, g))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            want = torch.nn.functional.conv2d(xt, kt, stride=st, padding=pad).permute(0, 2, 3, 1).numpy()

        def t_fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, kt, stride=st, padding=pad)

        def t_grad():
            torch.autograd.grad((torch.nn.functional.conv2d(xt, kt, stride=st, padding=pad) * gt).sum(), (xt, kt))

        fd, fw = jax.jit(direct), jax.jit(ours)
        grads = [grad_of(direct), grad_of(ours), grad_of(ours, "winograd-forward"), grad_of(ours, "winograd")]
        arms = [lambda: fd(xj, kj).block_until_ready(), lambda: fw(xj, kj).block_until_ready(), t_fwd,
                *[lambda gf=gf: jax.block_until_ready(gf(xj, kj, gj)) for gf in grads], t_grad]
        ms = [[] for _ in arms]
        for _ in range(a.rounds):
            for i, fn in enumerate(arms):
                ms[i].append(timeit(fn, calls) * 1e3)
        med = np.array([statistics.median(v) for v in ms])
        total += n * med
        diffs = (rel(fd(xj, kj), want), rel(fw(xj, kj), want))
        print(f"{f'{b},{h},{wd},{ci},{co},{ks},{st}':>22} {n:>3} | {med[0]:8.3f} {med[1]:8.3f} {med[2]:8.3f} | "
              f"{med[3]:8.3f} {med[4]:8.3f} {med[5]:8.3f} {med[6]:8.3f} {med[7]:8.3f} | {diffs[0]:.1e}, {diffs[1]:.1e}",
              flush=True)
    print(f"{'sum weighted by n':>22} {'':>3} | {total[0]:8.1f} {total[1]:8.1f} {total[2]:8.1f} | "
          f"{total[3]:8.1f} {total[4]:8.1f} {total[5]:8.1f} {total[6]:8.1f} {total[7]:8.1f} |")


# (B, H, W, C_in, C_out): the full-size SDXL UNet's 3x3 convolutions at each resolution (128x128 latents, batch 2),
# and a VAE decoder convolution at 256x256
SDXL_SHAPES = [(2, 128, 128, 320, 320), (2, 64, 64, 640, 640), (2, 32, 32, 1280, 1280), (1, 256, 256, 128, 128)]


def sdxl(calls: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from fairjax.models import layers

    print(f"3x3 convolutions at full SDXL sizes, forward, ms per call (median of {calls} calls); "
          f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    print(f"{'B,H,W,Cin,Cout':>20} | {'lax':>8} {'fairjax':>8} {'torch':>8} | rel. diff to torch (lax, fairjax)")
    rng = np.random.default_rng(0)
    for b, h, wd, ci, co in SDXL_SHAPES:
        x = rng.standard_normal((b, h, wd, ci), dtype=np.float32)
        k = (rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
        xj, kj = jnp.asarray(x), jnp.asarray(k)
        fd = jax.jit(lambda x, w: _conv(jax.lax.conv_general_dilated, x, w))
        fo = jax.jit(lambda x, w: _conv(layers.conv_general_dilated, x, w))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()

        def t_fwd():
            with torch.no_grad():
                return torch.nn.functional.conv2d(xt, kt, padding=1)

        want = t_fwd().permute(0, 2, 3, 1).numpy()
        ms = [timeit(lambda: fd(xj, kj).block_until_ready(), calls) * 1e3,
              timeit(lambda: fo(xj, kj).block_until_ready(), calls) * 1e3, timeit(t_fwd, calls) * 1e3]
        print(f"{f'{b},{h},{wd},{ci},{co}':>20} | {ms[0]:8.1f} {ms[1]:8.1f} {ms[2]:8.1f} | "
              f"{rel(fd(xj, kj), want):.1e}, {rel(fo(xj, kj), want):.1e}", flush=True)


def vae_decode(res: int, rounds: int):
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_vae_clip import SDXL_VAE
    from fairjax.models import layers, vae

    model = vae.from_config(SDXL_VAE)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, res // 8, res // 8), dtype=np.float32))
    params = jax.jit(lambda: model.init(jax.random.key(0), z, method=model.decode))()["params"]
    arms, default = {}, layers.WINOGRAD_ON_CPU
    for on in (False, True):
        layers.WINOGRAD_ON_CPU = on  # read while tracing
        arms["fairjax Conv" if on else "lax"] = jax.jit(
            lambda p, z: model.apply({"params": p}, z, method=model.decode)).lower(params, z).compile()
    layers.WINOGRAD_ON_CPU = default
    out = {k: np.asarray(f(params, z), np.float64) for k, f in arms.items()}
    a, b = out.values()
    times = {k: [] for k in arms}
    for _ in range(rounds):
        for k, f in arms.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, z))
            times[k].append(time.perf_counter() - t0)
    (n0, t0), (n1, t1) = ((k, statistics.median(v)) for k, v in times.items())
    print(f"SDXL VAE decode to {res}x{res}, batch 1, median of {rounds} interleaved rounds; jax {jax.__version__}: "
          f"{n0} {t0:.2f} s, {n1} {t1:.2f} s ({t1 / t0:.2f}x); max relative difference "
          f"{np.abs(a - b).max() / np.abs(a).max():.1e}")


if __name__ == "__main__":
    main()
