#!/usr/bin/env python
"""Per-device memory of SDXL PopAlign training, on paper: full UNet vs LoRA r32, fsdp = 1, 4, 8, 16.

    python bench/memory_sdxl.py [--calibrate] [--lower-full] [--latent 128] [--pairs-per-device 1]

Setting: 1024 px (128x128 latents), one winner/loser pair (2 images) per device, remat on
every transformer block, bf16 compute with float32 master params (the configs' defaults), the
frozen reference = a float32 copy sharded like the policy (full) or the base tree itself (LoRA).

* state (exact): param / optimizer sizes from ``jax.eval_shape`` of the real SDXL UNet config
  and of ``fairjax.lora.init`` on it -- full: policy + reference + AdamW mu, nu (16 B/param)
  and float32 gradients (4 B/param) all / fsdp; LoRA: the base (4 B/param) / fsdp plus
  16 + 4 B per LoRA value, plus the merged float32 copies of the adapted kernels (/ fsdp).
* bf16 copies: the compute-dtype casts of the weights (2 B/param for the policy and again for
  the reference), counted whole / fsdp as an upper bound (XLA usually fuses them per layer).
* activations (a model): walking the UNet config, per image, elements saved for the backward
  pass (resnet: 3 C_in + 3 C_out per pixel; transformer stage with remat: (4 + L) C per pixel;
  samplers: C) plus the transient peak of recomputing one transformer block, 2 x (26 C +
  heads x (HW_attn + 77)) per pixel (``HW_attn = 0`` with a flash attention kernel, ``HW`` when
  XLA materialises the scores).  Not divided by fsdp (activations belong to the local batch).
* ``--calibrate`` compiles the real task step (``fairjax.trainer.make_train_step`` of the
  SDXL preference task, float32, CPU) for the tiny SDXL-shaped preset at 64x64 latents and
  prints ``memory_analysis().temp_size`` next to the model's activations + gradients for the
  same config (the check of the activation model; minutes of CPU).
* ``--lower-full`` lowers the full-size sharded step (policy + reference + AdamW) for a
  virtual mesh of 16 CPU devices (fsdp 16) with abstract inputs (``jax.jit(...).lower``;
  no memory).  Compiling the full model on CPU for ``memory_analysis`` is not attempted: the
  tiny model's step already compiles for minutes on a 2-core machine and the full graph is
  ~50x larger.

Prints a table with the per-device total and which accelerator sizes (16/24/40/80/96 GB,
with 10% headroom) fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GB = 1e9
SIZES = (16, 24, 40, 80, 96)

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                     "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}


# ----------------------------------------------------------------------------- activation model


def activation_elements(cfg, h: int, w: int, flash: bool, ctx_len: int = 77) -> tuple[int, int]:
    """``(saved, block_peak)`` elements per image (see the module docstring)."""
    ch = list(cfg["block_out_channels"])
    n = len(ch)
    layers = cfg.per_block("layers_per_block")
    tls = cfg.per_block("transformer_layers_per_block")
    heads = cfg.heads
    rev_tls = cfg.reverse_transformer_layers()

    def resnet(c_in, c_out, px):
        return (3 * c_in + 3 * c_out) * px

    def stage(c, px, n_layers):
        return (4 + n_layers) * c * px

    def peak(c, px, nh):
        return 2 * (26 * c * px + nh * px * ((0 if flash else px) + ctx_len))

    def _int(x):
        return x if isinstance(x, int) else x[0]

    px = h * w
    saved = cfg["in_channels"] * px + ch[0] * px
    top = 0
    c_prev, skips = ch[0], [ch[0]]
    for i, kind in enumerate(cfg["down_block_types"]):
        for _ in range(layers[i]):
            saved += resnet(c_prev, ch[i], px)
            c_prev = ch[i]
            if kind.startswith("CrossAttn"):
                saved += stage(ch[i], px, _int(tls[i]))
                top = max(top, peak(ch[i], px, heads[i]))
            skips.append(c_prev)
        if i < n - 1:
            saved += c_prev * px
            px //= 4
            skips.append(c_prev)
    if cfg["mid_block_type"]:
        saved += 2 * resnet(ch[-1], ch[-1], px) + stage(ch[-1], px, _int(tls[-1]))
        top = max(top, peak(ch[-1], px, heads[-1]))
    for i, kind in enumerate(cfg["up_block_types"]):
        c_out = ch[n - 1 - i]
        for _ in range(layers[n - 1 - i] + 1):
            saved += resnet(c_prev + skips.pop(), c_out, px)
            c_prev = c_out
            if kind.startswith("CrossAttn"):
                saved += stage(c_out, px, _int(rev_tls[i]))
                top = max(top, peak(c_out, px, heads[n - 1 - i]))
        if i < n - 1:
            px *= 4
            saved += c_prev * px
    saved += 3 * ch[0] * px
    return saved, top


def self_attention_blocks(cfg, h: int, w: int) -> list[tuple[int, int]]:
    """``(pixels, heads)`` of every self-attention (BasicTransformerBlock.attn1) in the UNet."""
    n = cfg.num_blocks
    layers = cfg.per_block("layers_per_block")
    tls, rev = cfg.per_block("transformer_layers_per_block"), cfg.reverse_transformer_layers()
    heads = cfg.heads
    _int = lambda x: x if isinstance(x, int) else x[0]  # noqa: E731
    out = []
    px = h * w
    for i, kind in enumerate(cfg["down_block_types"]):
        if kind.startswith("CrossAttn"):
            out += [(px, heads[i])] * (layers[i] * _int(tls[i]))
        if i < n - 1:
            px //= 4
    if cfg["mid_block_type"]:
        out += [(px, heads[-1])] * _int(tls[-1])
    for i, kind in enumerate(cfg["up_block_types"]):
        if kind.startswith("CrossAttn"):
            out += [(px, heads[n - 1 - i])] * ((layers[n - 1 - i] + 1) * _int(rev[i]))
        if i < n - 1:
            px *= 4
    return out


def score_elements(cfg, h: int, w: int) -> int:
    """Elements of all self-attention score matrices of one image: sum of heads x px^2."""
    return sum(nh * px * px for px, nh in self_attention_blocks(cfg, h, w))


# ----------------------------------------------------------------------------- exact sizes


def state_sizes(cfg_dict, lora_rank: int, targets: str):
    """``(params, lora values, adapted kernel values)`` of the UNet config (eval_shape only)."""
    import jax
    import numpy as np

    from fairjax import lora as lora_lib
    from fairjax.models import unet as unet_mod

    model = unet_mod.UNet2DConditionModel.from_config(cfg_dict)
    shapes = unet_mod.param_shapes(model)
    n_params = int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))
    lora_abs = jax.eval_shape(lambda p, k: lora_lib.init(p, targets, lora_rank, float(lora_rank), k), shapes,
                              jax.random.key(0))
    n_lora = int(sum(np.prod(s.shape) for s in jax.tree.leaves(lora_abs)))
    n_adapted = int(sum(e["a"].shape[0] * e["b"].shape[1] for e in lora_abs.values()))
    return model, n_params, n_lora, n_adapted


def estimate(n_params, n_lora, n_adapted, act_bytes_per_image, images, fsdp, lora: bool):
    """Per-device bytes by part for one configuration."""
    parts = {}
    if lora:
        parts["base (=reference) f32"] = 4 * n_params / fsdp
        parts["LoRA params+grads+AdamW"] = 16 * n_lora / fsdp
        parts["merged adapted kernels f32"] = 4 * n_adapted / fsdp
        parts["bf16 weight casts"] = 2 * n_params / fsdp
    else:
        parts["policy + reference f32"] = 8 * n_params / fsdp
        parts["AdamW mu, nu f32"] = 8 * n_params / fsdp
        parts["gradients f32"] = 4 * n_params / fsdp
        parts["bf16 weight casts"] = 4 * n_params / fsdp
    parts["activations"] = act_bytes_per_image * images
    return parts


# ----------------------------------------------------------------------------- compiled checks


def _paper_model_dir(root: str, unet_cfg: dict) -> str:
    """A model dir with the UNet config and the SDXL scheduler but no weights: the task's
    constructor only reads configs; params.safetensors is an empty placeholder never read."""
    from fairjax.io.model_dir import write_json
    from fairjax.diffusion import tiny as tiny_sdxl

    os.makedirs(os.path.join(root, "unet"), exist_ok=True)
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    write_json(os.path.join(root, "unet", "config.json"), unet_cfg)
    open(os.path.join(root, "unet", "params.safetensors"), "wb").close()
    write_json(os.path.join(root, "scheduler", "scheduler_config.json"), tiny_sdxl.SDXL_SCHEDULER)
    return root


def abstract_step(unet_cfg: dict, latent: int, pairs: int, lora_rank: int, dtype: str, mesh_spec: dict,
                  text_dims: tuple[int, int], time_ids):
    """``(jitted step, abstract args, task)`` of the SDXL preference task's trainer step with abstract
    (ShapeDtypeStruct) state, reference and batch, sharded over ``mesh_spec``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from fairjax import parallel, trainer
    from fairjax.data import pairs as pairs_lib
    from fairjax.diffusion import text_embeds
    from fairjax.models import unet as unet_mod
    from fairjax.tasks import diffusion_pref as dp

    root = _paper_model_dir(tempfile.mkdtemp(prefix="fairjax_paper_"), unet_cfg)
    c = dp.make_config("popalign")
    c.model.dir, c.model.dtype, c.batch_size = root, dtype, 2 * pairs
    c.model.remat = os.environ.get("FJ_REMAT", "nothing_saveable")
    c.time_ids, c.lora.rank, c.lora.alpha = tuple(time_ids), lora_rank, float(max(lora_rank, 1))
    c.mesh = mesh_spec
    ctx_d, pooled = text_dims
    n = 2 * pairs
    src = pairs_lib.ArrayPrefs(np.zeros((n, 4, latent, latent), np.float32), ["x"] * n, [True, False] * pairs,
                        np.repeat(np.arange(pairs), 2))
    table = text_embeds.TextTable(["", "x"], np.zeros((2, 77, ctx_d), np.float32), np.zeros((2, pooled), np.float32))
    task = dp.DiffusionPrefTask(c, source=src, table=table)
    n_dev = int(np.prod([v for v in mesh_spec.values()]))
    mesh = parallel.make_mesh(mesh_spec, jax.devices()[:n_dev])
    shapes = unet_mod.param_shapes(task.unet)
    if lora_rank:
        from fairjax import lora as lora_lib

        trainable = jax.eval_shape(lambda p, k: lora_lib.init(p, c.lora.targets, lora_rank, c.lora.alpha, k),
                                   shapes, jax.random.key(0))
    else:
        trainable = shapes
    frozen = shapes
    tx, schedule = trainer.make_optimizer(c.optimizer, c.total_steps)
    opt = jax.eval_shape(tx.init, trainable)
    tr_sh = parallel.param_shardings(trainable, mesh)
    rep = parallel.replicated(mesh)
    opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, s: s, opt, tr_sh, transform_non_params=lambda _: rep)
    state_sh = {"step": rep, "trainable": tr_sh, "opt_state": opt_sh, "rng": rep}
    fr_sh = parallel.param_shardings(frozen, mesh)
    bsh = parallel.batch_sharding(mesh)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": trainable, "opt_state": opt,
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    host = task.batch(0, 0, 1)
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in host.items()}
    step = jax.jit(trainer.make_train_step(task, tx, schedule, 1, mesh),
                   in_shardings=(state_sh, fr_sh, bsh), out_shardings=(state_sh, rep), donate_argnums=(0,))
    return step, (state, frozen, batch), task


def calibrate(latent: int = 64):
    """Compile the tiny SDXL-shaped step (float32, 1 CPU device, one pair) and compare its
    temp memory with the activation model + gradients."""
    import time

    import jax
    import numpy as np

    from fairjax.models.unet import UNetConfig
    from fairjax.diffusion import tiny as tiny_sdxl

    cfg = tiny_sdxl.unet_config("tiny")
    t = tiny_sdxl.PRESETS["tiny"]["text"]
    px = 8.0 * latent
    step, args, task = abstract_step(cfg, latent, 1, 0, "float32", {"data": 1},
                                     (sum(t["widths"]), t["projection_dim"]), (px, px, 0.0, 0.0, px, px))
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    secs = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    n_params = int(sum(np.prod(s.shape) for s in jax.tree.leaves(args[1])))
    ucfg = UNetConfig.from_dict(cfg)
    grads = 4 * n_params
    print(f"calibration: tiny SDXL-shaped UNet ({n_params / 1e6:.2f}M params), {latent}x{latent} latents, one pair, "
          f"float32, remat; compile {secs:.0f}s")
    print(f"  compiled memory_analysis: arguments {ma.argument_size_in_bytes / 1e6:.1f} MB, outputs "
          f"{ma.output_size_in_bytes / 1e6:.1f} MB, temp {ma.temp_size_in_bytes / 1e6:.1f} MB")
    for flash in (False, True):
        saved, top = activation_elements(ucfg, latent, latent, flash=flash)
        act = 4 * (2 * saved + top)
        print(f"  model ({'flash' if flash else 'XLA'} attention): activations {act / 1e6:.1f} MB + gradients "
              f"{grads / 1e6:.1f} MB = {(act + grads) / 1e6:.1f} MB  (temp / model = "
              f"{ma.temp_size_in_bytes / (act + grads):.2f})")
    saved, top = activation_elements(ucfg, latent, latent, flash=True)
    scores = 4 * 2 * score_elements(ucfg, latent, latent)
    k = (ma.temp_size_in_bytes - 4 * (2 * saved + top) - grads) / scores
    print(f"  the rest of temp = {k:.1f} x the bytes of all self-attention score matrices ({scores / 1e6:.1f} MB): "
          f"the CPU-compiled XLA attention keeps ~{k:.0f} score-sized buffers per self-attention block")
    return k


def lower_full(latent: int):
    import time

    step, args, _ = abstract_step(SDXL_UNET, latent, 16, 0, "bfloat16", {"data": 1, "fsdp": 16}, (2048, 1280),
                                  (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0))
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    text = lowered.as_text()
    print(f"full SDXL step (16 pairs over fsdp=16 virtual CPU devices, bf16 compute, remat) lowered in "
          f"{time.perf_counter() - t0:.0f}s: {len(text.splitlines())} StableHLO lines (not compiled)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--pairs-per-device", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--calibrate", action="store_true", help="compile the tiny SDXL-shaped step and compare")
    ap.add_argument("--score-buffers", type=float, default=4.0,
                    help="score-sized buffers per self-attention block for the XLA-attention table "
                         "(4.0 = --calibrate's measurement on this machine; --calibrate replaces it)")
    ap.add_argument("--lower-full", action="store_true", help="lower the full SDXL step for 16 virtual devices")
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.lower_full and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=16"

    from fairjax.models.unet import UNetConfig
    from fairjax.tasks.diffusion_pref import DEFAULT_LORA_TARGETS

    _, n_params, n_lora, n_adapted = state_sizes(SDXL_UNET, a.lora_rank, DEFAULT_LORA_TARGETS)
    ucfg = UNetConfig.from_dict(SDXL_UNET)
    images = 2 * a.pairs_per_device
    print(f"SDXL UNet: {n_params:,} params; LoRA r{a.lora_rank} on attention q/k/v/out: {n_lora:,} values "
          f"on kernels holding {n_adapted:,}; {a.latent}x{a.latent} latents, {images} images per device, bf16 "
          f"activations, remat on transformer blocks")
    k = a.score_buffers
    if a.calibrate:
        print()
        k = calibrate()
    saved_f, top_f = activation_elements(ucfg, a.latent, a.latent, True)
    saved_x, top_x = activation_elements(ucfg, a.latent, a.latent, False)
    scores = 2 * score_elements(ucfg, a.latent, a.latent) * images  # bf16
    variants = [
        ("flash attention (cuDNN; config.model.attention='cudnn')", 2 * (saved_f * images + top_f)),
        (f"XLA attention, {k:.1f} score-sized buffers per self-attention block live at once (as the CPU "
         f"compile of the tiny model does; one block's scores would add only {2 * (top_x - top_f) / GB:.1f} GB)",
         2 * (saved_x * images + top_x) + k * scores),
    ]
    for title, act_total in variants:
        print(f"\n{title}: activations {act_total / GB:.1f} GB per device")
        print(f"{'mode':5s} {'fsdp':>4s} {'state+grads':>11s} {'bf16 casts':>10s} {'activ.':>7s} {'total':>7s}   fits")
        for lora in (False, True):
            for fsdp in (1, 4, 8, 16):
                parts = estimate(n_params, n_lora, n_adapted, act_total / images, images, fsdp, lora)
                total = sum(parts.values())
                casts = parts["bf16 weight casts"]
                state = total - casts - parts["activations"]
                fits = [f"{s}GB" for s in SIZES if total <= 0.9 * s * GB]
                print(f"{'lora' if lora else 'full':5s} {fsdp:4d} {state / GB:9.1f}GB {casts / GB:8.1f}GB "
                      f"{parts['activations'] / GB:5.1f}GB {total / GB:5.1f}GB   {', '.join(fits) or 'none'}")
    if a.lower_full:
        print()
        lower_full(a.latent)
    print("\nstate = exact sizes from eval_shape; casts = upper bound; activations = the model above "
          "(see --calibrate for how it compares with a compiled step)")


if __name__ == "__main__":
    main()
