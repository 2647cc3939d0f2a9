"""Benchmark: VILA-U's vision side in Flax vs PyTorch, same random weights, float32, inference.

* encoder: SigLIP layers 0..L-2 (what VILA-U runs) vs transformers ``SiglipVisionModel`` cut to L-1 layers;
* tokenize: encoder + depth-4 residual quantization (Flax) -- no PyTorch twin, time only;
* decode: ``post_quant_conv`` + taming decoder vs the torch port of vila-u's decoder (tests/_vila_u_torch.py).

Prints the median time per call, torch/flax (> 1: Flax faster) and the max relative difference.

    python bench/bench_vila_u_vision.py                      # small shapes (CPU-friendly)
    python bench/bench_vila_u_vision.py --size full --batch 1  # SigLIP-large-256 + rq-vae 256px decoder (GPU)
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import _vila_u_torch as ref  # noqa: E402
from _torch_util import DictReader, randomize_, rel, timeit  # noqa: E402

from fairjax.convert.core import convert_checkpoint  # noqa: E402
from fairjax.convert.vila_u import SIGLIP_VISION_CONFIGS, vision_tower_rules  # noqa: E402
from fairjax.models import rqvae  # noqa: E402

SIZES = {
    "small": dict(siglip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=7, num_attention_heads=4,
                              image_size=128, patch_size=16),
                  dec=dict(ch=64, out_ch=3, ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
                           resolution=64, z_channels=64), n_embed=1024),
    "full": dict(siglip=SIGLIP_VISION_CONFIGS["siglip-large-patch16-256"],
                 dec=dict(ch=128, out_ch=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                          resolution=256, z_channels=256), n_embed=16384),
}


def report(name, t_torch, t_flax, err):
    tt = f"torch {1e3 * t_torch:9.2f} ms" if t_torch else "torch       n/a   "
    ratio = f"torch/flax {t_torch / t_flax:5.2f}x" if t_torch else " " * 17
    diff = f"max rel diff {err:.1e}" if err is not None else ""
    print(f"{name:10s} {tt}   flax {1e3 * t_flax:9.2f} ms   {ratio}   {diff}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    s = SIZES[args.size]
    sg, dec_cfg = dict(s["siglip"]), dict(s["dec"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    print(f"jax {jax.default_backend()}  torch {dev}  size {args.size}  batch {args.batch}")

    g = sg["image_size"] // sg["patch_size"]
    c = sg["hidden_size"]
    rq = dict(embed_dim=c, n_embed=s["n_embed"], latent_shape=[g, g, c], code_shape=[g, g, 4], shared_codebook=True,
              ddconfig=dec_cfg)
    cut = transformers.SiglipVisionConfig(**dict(sg, num_hidden_layers=sg["num_hidden_layers"] - 1))
    cut._attn_implementation = "sdpa"
    tsig = randomize_(transformers.SiglipVisionModel(cut), 0).to(dev)
    tdec = randomize_(ref.Decoder(**dec_cfg), 1).to(dev)
    rng = np.random.default_rng(2)
    codebook = (rng.normal(size=(s["n_embed"] + 1, c)) / np.sqrt(c)).astype(np.float32)
    pq_w = (rng.normal(size=(dec_cfg["z_channels"], c, 1, 1)) / np.sqrt(c)).astype(np.float32)
    pq_b = np.zeros(dec_cfg["z_channels"], np.float32)

    sd = {f"rqvaesiglip.siglip_model.vision_model.{k}": v.cpu().numpy() for k, v in tsig.state_dict().items()}
    sd.update({f"rqvaesiglip.decoder.{k}": v.cpu().numpy() for k, v in tdec.state_dict().items()})
    sd.update({"rqvaesiglip.quantizer.codebooks.0.weight": codebook, "rqvaesiglip.post_quant_conv.weight": pq_w,
               "rqvaesiglip.post_quant_conv.bias": pq_b})
    model = rqvae.from_config(rq, sg)
    ignore, rename = vision_tower_rules(sd.keys(), model)

    shapes = {("rqvaesiglip",) + p: v for p, v in rqvae.param_shapes(model).items()}
    params = jax.device_put(convert_checkpoint(DictReader(sd), shapes, ignore=ignore, rename=rename)["rqvaesiglip"])

    x = rng.uniform(-1, 1, size=(args.batch, 3, sg["image_size"], sg["image_size"])).astype(np.float32)
    xt = torch.from_numpy(x).to(dev)
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_features))
    tok = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def t_enc():
        out = tsig.encoder(inputs_embeds=tsig.embeddings(xt)).last_hidden_state
        sync()
        return out

    feats = enc(params, x)
    err = rel(feats.reshape(args.batch, g * g, c), t_enc().cpu().numpy())
    report("encoder", timeit(t_enc, args.iters), timeit(lambda: enc(params, x).block_until_ready(), args.iters), err)
    report("tokenize", None, timeit(lambda: jax.block_until_ready(tok(params, x)), args.iters), None)

    z = (rng.normal(size=(args.batch, g, g, c)) * 0.5).astype(np.float32)
    zt = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous().to(dev)
    wt, bt = torch.from_numpy(pq_w).to(dev), torch.from_numpy(pq_b).to(dev)

    def t_dec():
        out = tdec(torch.nn.functional.conv2d(zt, wt, bt))
        sync()
        return out

    err = rel(dec(params, z), t_dec().cpu().numpy())
    report("decode", timeit(t_dec, args.iters), timeit(lambda: dec(params, z).block_until_ready(), args.iters), err)


if __name__ == "__main__":
    main()
