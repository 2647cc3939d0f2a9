"""A tiny random SDXL-shaped model dir and preference dataset, built deterministically offline.

For CPU runs of the SDXL preference task (``configs/popalign_sdxl.py:tiny``), tests and
benchmarks: no download, no torch.  :func:`ensure` writes, once, under ``root``::

    root/model/   a fairjax model dir: unet/ (SDXL-shaped: DownBlock2D + two CrossAttn blocks,
                  text_time added conditioning, linear projections), text_encoder/ (CLIP),
                  text_encoder_2/ (CLIP + projection), tokenizer/ + tokenizer_2/ (a byte-level
                  BPE vocabulary with no merges), scheduler/ (SDXL's DDPM training schedule)
    root/data/    a preference dataset (fairjax.data.prefs): per caption (set_id) ``per_set``
                  winners and ``per_set`` losers with fixed random latents

Every array comes from ``seed`` through ``numpy.random.default_rng`` (:func:`random_params` for
the networks: nothing is compiled), so two builds are identical.
Presets: ``tiny`` (the CPU demo and benchmark) and ``micro`` (the smallest, for tests).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

#: scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

CAPTIONS = ("a photo of a doctor", "a photo of a nurse", "a photo of a teacher", "a photo of a chef")

_SDXL_BLOCKS = dict(
    _class_name="UNet2DConditionModel", in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
)

PRESETS = {
    # text: CLIP widths (w1, w2) -> cross_attention_dim w1 + w2; pooled = projection_dim
    "tiny": dict(
        unet=dict(block_out_channels=[16, 32, 64], layers_per_block=2, transformer_layers_per_block=[1, 2, 2],
                  attention_head_dim=[1, 2, 4], norm_num_groups=8, sample_size=16),
        text=dict(widths=(16, 16), layers=2, heads=2, projection_dim=16),
        latent_hw=16, per_set=8,
    ),
    # two blocks (DownBlock2D, CrossAttnDownBlock2D): the SDXL block kinds at the least compile time
    "micro": dict(
        unet=dict(block_out_channels=[8, 16], layers_per_block=1, transformer_layers_per_block=[1, 1],
                  attention_head_dim=[1, 2], norm_num_groups=4, sample_size=8, addition_time_embed_dim=4,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]),
        text=dict(widths=(8, 8), layers=2, heads=2, projection_dim=8),
        latent_hw=8, per_set=4,
    ),
}

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each byte (the base alphabet of a CLIP vocab)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str, pad_token: str = EOS) -> int:
    """A byte-level CLIP BPE vocabulary with no merges (every byte one token); returns the vocab size."""
    base = _bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + [BOS, EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                   "pad_token": pad_token}, f)
    return len(tokens)


def unet_config(preset: str = "tiny") -> dict:
    """The diffusers ``unet/config.json`` dict of a preset."""
    p = PRESETS[preset]
    w1, w2 = p["text"]["widths"]
    cfg = dict(_SDXL_BLOCKS, **p["unet"])
    cfg["cross_attention_dim"] = w1 + w2
    cfg["projection_class_embeddings_input_dim"] = p["text"]["projection_dim"] + 6 * cfg["addition_time_embed_dim"]
    return cfg


def clip_config(preset: str, which: int, vocab_size: int) -> dict:
    """transformers ``config.json`` of text encoder ``which`` (0: CLIPTextModel, 1: with projection)."""
    t = PRESETS[preset]["text"]
    return {
        "architectures": ["CLIPTextModelWithProjection" if which else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": vocab_size, "hidden_size": t["widths"][which],
        "intermediate_size": 2 * t["widths"][which], "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"], "max_position_embeddings": 77, "hidden_act": "gelu",
        "projection_dim": t["projection_dim"], "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1, "layer_norm_eps": 1e-5,
    }


def random_params(shapes, rng: np.random.Generator) -> dict:
    """Random float32 values for a tree of ``ShapeDtypeStruct`` (no compilation, unlike ``model.init``):
    ``kernel ~ N(0, 1/fan_in)``, ``scale ~ 1 + 0.05 N``, everything else (biases, embeddings) ``0.05 N``,
    leaves drawn in sorted path order."""
    from fairjax.io.tree import flatten, unflatten

    flat = flatten(shapes)
    out = {}
    for path in sorted(flat):
        shape = tuple(flat[path].shape)
        z = rng.standard_normal(shape).astype(np.float32)
        if path[-1] == "kernel":
            out[path] = z / np.float32(np.sqrt(np.prod(shape[:-1])))
        elif path[-1] == "scale":
            out[path] = 1 + np.float32(0.05) * z
        else:
            out[path] = np.float32(0.05) * z
    return unflatten(out)


def build_model_dir(out: str, preset: str = "tiny", seed: int = 0) -> None:
    """Write the preset's random model dir into ``out`` (which must not exist)."""
    from fairjax.io.model_dir import save_component, write_index, write_json
    from fairjax.models import clip_text, unet

    os.makedirs(out)
    vocab = write_tokenizer(os.path.join(out, "tokenizer"))
    write_tokenizer(os.path.join(out, "tokenizer_2"), pad_token="!")
    os.makedirs(os.path.join(out, "scheduler"))
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), SDXL_SCHEDULER)
    ucfg = unet_config(preset)
    model = unet.UNet2DConditionModel.from_config(ucfg)
    params = random_params(unet.param_shapes(model), np.random.default_rng([seed, 0]))
    save_component(os.path.join(out, "unet"), ucfg, params)
    for which, name in enumerate(("text_encoder", "text_encoder_2")):
        ccfg = clip_config(preset, which, vocab)
        enc = clip_text.from_config(ccfg)
        shapes = jax.eval_shape(lambda e=enc: e.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"])
        save_component(os.path.join(out, name), ccfg, random_params(shapes, np.random.default_rng([seed, which + 1])))
    write_index(out, ["unet", "text_encoder", "text_encoder_2"], source=f"fairjax tiny_sdxl preset {preset!r}",
                seed=seed)


def records(preset: str = "tiny", seed: int = 0, captions=CAPTIONS, per_set: int | None = None,
            channels: int = 4):
    """The preset's preference records: for caption ``s`` (set_id ``s``) ``per_set`` winners then
    ``per_set`` losers, latents ``N(0, 1)`` of shape (channels, hw, hw), float32."""
    p = PRESETS[preset]
    n = per_set or p["per_set"]
    rng = np.random.default_rng(seed)
    hw = p["latent_hw"]
    out = []
    for s, cap in enumerate(captions):
        for j in range(2 * n):
            out.append({"latents": rng.standard_normal((channels, hw, hw)).astype(np.float32), "caption": cap,
                        "is_winner": j < n, "set_id": s})
    return out


def build_dataset(out: str, preset: str = "tiny", seed: int = 0) -> None:
    from fairjax.data import prefs

    prefs.write_preference_dataset(out, records(preset, seed), metadata={"source": f"tiny_sdxl {preset}"})


def ensure(root: str, preset: str = "tiny", seed: int = 0) -> tuple[str, str]:
    """``(model_dir, data_dir)`` under ``root``, built on first use (in a temp dir renamed into place,
    so a crash leaves nothing half-written and concurrent builders do not clash)."""
    if preset not in PRESETS:
        from fairjax.errors import UserError

        raise UserError(f"unknown tiny model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    root = os.path.abspath(root)
    model_dir, data_dir = os.path.join(root, "model"), os.path.join(root, "data")
    if os.path.isdir(model_dir) and os.path.isdir(data_dir):
        return model_dir, data_dir
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_model_dir(os.path.join(tmp, "model"), preset, seed)
        build_dataset(os.path.join(tmp, "data"), preset, seed)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (os.path.isdir(model_dir) and os.path.isdir(data_dir)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir, data_dir
