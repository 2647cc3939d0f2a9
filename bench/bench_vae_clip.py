"""Benchmark: Flax VAE / CLIP text encoders vs the diffusers / transformers PyTorch modules.

Same random weights on both sides (converted through fairjax.convert), float32,
inference; prints the median time per call, the ratio torch/flax (> 1: Flax
faster) and the max relative difference of the outputs.

    python bench/bench_vae_clip.py                    # small configs (CPU-friendly)
    python bench/bench_vae_clip.py --size sdxl --res 512 --batch 1   # real SDXL shapes (GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _torch_util import rel, timeit  # noqa: E402

from fairjax.convert.clip import convert_clip_text  # noqa: E402
from fairjax.convert.vae import convert_vae  # noqa: E402
from fairjax.models import clip_text, vae  # noqa: E402

SMALL_VAE = dict(block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
                 up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, norm_num_groups=8,
                 latent_channels=4, scaling_factor=0.13025)
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, norm_num_groups=32,
                latent_channels=4, scaling_factor=0.13025, sample_size=1024)
SMALL_CLIP = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  projection_dim=256, hidden_act="gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)
SDXL_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)


def report(name, t_torch, t_flax, err):
    print(f"{name:28s} torch {1e3 * t_torch:9.2f} ms   flax {1e3 * t_flax:9.2f} ms   "
          f"torch/flax {t_torch / t_flax:5.2f}x   max rel diff {err:.1e}")


def bench_vae(cfg, batch, res, iters, device):
    import diffusers

    tm = diffusers.AutoencoderKL(**cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(os.path.join(d, "vae"))
        config, params = convert_vae(os.path.join(d, "vae"))
    tm = tm.to(device)
    model = vae.from_config(config)
    params = jax.device_put(params)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, res, res)).astype(np.float32)
    f = vae.downsample_factor(model.config)
    z = np.random.default_rng(1).normal(size=(batch, 4, res // f, res // f)).astype(np.float32)
    xt, zt = torch.from_numpy(x).to(device), torch.from_numpy(z).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    enc = jax.jit(lambda p, a: model.apply({"params": p}, a, method=model.encode)[0])
    dec = jax.jit(lambda p, a: model.apply({"params": p}, a, method=model.decode))
    with torch.no_grad():
        def t_enc():
            out = tm.encode(xt).latent_dist.mean
            sync()
            return out

        def t_dec():
            out = tm.decode(zt).sample
            sync()
            return out

        report(f"vae encode {batch}x{res}^2", timeit(t_enc, iters),
               timeit(lambda: enc(params, x).block_until_ready(), iters), rel(enc(params, x), t_enc().cpu()))
        report(f"vae decode {batch}x{res // f}^2", timeit(t_dec, iters),
               timeit(lambda: dec(params, z).block_until_ready(), iters), rel(dec(params, z), t_dec().cpu()))


def bench_clip(cfg, batch, iters, device):
    import transformers

    tm = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)).eval()
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(os.path.join(d, "te"))
        config, params = convert_clip_text(os.path.join(d, "te"))
    tm = tm.to(device)
    model = clip_text.from_config(config)
    ids = np.random.default_rng(2).integers(3, cfg.get("vocab_size", 49408) - 2, size=(batch, 77))
    ids[:, 0], ids[:, 40] = 49406, 49407
    idt = torch.from_numpy(ids).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn = jax.jit(lambda p, i: model.apply({"params": p}, i, output_hidden_states=True))
    ids32 = jnp.asarray(ids, jnp.int32)

    with torch.no_grad():
        def t_ref():
            out = tm(idt, output_hidden_states=True)
            sync()
            return out

        ref = t_ref()
        out = fn(params, ids32)
        err = max(rel(out.hidden_states[-2], ref.hidden_states[-2].cpu()), rel(out.text_embeds, ref.text_embeds.cpu()))
        report(f"clip text+proj b{batch} L{cfg['num_hidden_layers']}", timeit(t_ref, iters),
               timeit(lambda: jax.block_until_ready(fn(params, ids32)), iters), err)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["small", "sdxl"], default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--res", type=int, default=128, help="image side in pixels for the VAE")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {device}, "
          f"torch threads {torch.get_num_threads()}")
    bench_vae(SDXL_VAE if args.size == "sdxl" else SMALL_VAE, args.batch, args.res, args.iters, device)
    bench_clip(SDXL_CLIP_G if args.size == "sdxl" else SMALL_CLIP, args.batch, args.iters, device)


if __name__ == "__main__":
    main()
