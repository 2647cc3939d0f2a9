"""SDXL pipeline: fairjax vs diffusers' StableDiffusionXLPipeline on the same tiny random components.

The diffusers pipeline is built here from tiny random modules and a made-up BPE vocabulary, saved
with `save_pretrained`, converted to a fairjax model directory with tools/convert_diffusers.py, and
both pipelines are run on the same prompts and initial latents; the reference images are diffusers'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import torch
import diffusers
import transformers

from fairjax.diffusion import pipeline as pl  # noqa: E402

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


# ----------------------------------------------------------------------------------------------
# a tiny SDXL, built with diffusers / transformers (shared with test_generate.py and the bench)


def _bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode table (the base alphabet of a CLIP vocab)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# made-up merges over a few prompt words
MERGES = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>"),
          ("d", "o"), ("do", "g</w>"), ("a", "s"), ("as", "t"), ("ast", "r"), ("n", "u"), ("nu", "r"),
          ("nur", "s"), ("nurs", "e</w>"), ("t", "h"), ("th", "e</w>")]


def write_bpe_files(folder: str) -> tuple[str, str]:
    base = _bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return vocab_file, merges_file


TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=8,
)  # projection_class_embeddings_input_dim = 6 * 8 + 32 (text_encoder_2 projection_dim)
TINY_VAE = dict(
    block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    scaling_factor=0.13025,
)


def _clip_config(vocab_size, ids, hidden=32, layers=3):
    return transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden + 5, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])


def _jitter(module, seed, scale=0.05):
    """Move every weight off its init value (norm scales 1, biases 0 would hide conversion slips)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def build_tiny_sdxl(folder: str, *, unet=None, vae=None, text_hidden: int = 32, text_layers: int = 3,
                    force_zeros: bool = True, seed: int = 0):
    """Save a tiny random StableDiffusionXLPipeline (diffusers format) to `folder`; returns the pipeline.

    Both text encoders are `text_hidden` wide (projection too), so the UNet needs
    cross_attention_dim = 2 * text_hidden and projection_class_embeddings_input_dim =
    6 * addition_time_embed_dim + text_hidden."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_file, merges_file = write_bpe_files(os.path.join(folder, "_bpe"))
    tok = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
    tok_2 = CLIPTokenizer(vocab_file, merges_file, pad_token="!", model_max_length=77)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    torch.manual_seed(seed)
    te = _jitter(CLIPTextModel(_clip_config(len(tok), ids, text_hidden, text_layers)), seed + 1)
    te2 = _jitter(CLIPTextModelWithProjection(_clip_config(len(tok), ids, text_hidden, text_layers)), seed + 2)
    un = _jitter(UNet2DConditionModel(**(unet or TINY_UNET)), seed + 3, 0.02)
    va = _jitter(AutoencoderKL(**(vae or TINY_VAE)), seed + 4, 0.02)
    pipe = StableDiffusionXLPipeline(
        vae=va, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok_2, unet=un,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(os.path.join(folder, "_bpe"))
    return pipe.to(torch.float32)


def convert_tiny_sdxl(src: str, dst: str) -> str:
    """diffusers pipeline folder -> fairjax model dir, with tools/convert_diffusers.py."""
    import importlib.util

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_diffusers.py")
    spec = importlib.util.spec_from_file_location("convert_diffusers", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.convert(src, dst, log=lambda *_: None)
    return dst


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(diffusers reference pipeline, fairjax pipeline, fairjax model dir, diffusers dir), built once."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    ref = build_tiny_sdxl(str(root / "diffusers"))
    model_dir = convert_tiny_sdxl(str(root / "diffusers"), str(root / "fairjax"))
    return ref, pl.load_pipeline(model_dir), model_dir, str(root / "diffusers")


PROMPTS = ["a photo of a cat", "the nurse", "an astronaut's dog!"]


def diffusers_images(ref, prompts, num_per_prompt, noise, steps, cfg, sampler="euler", **kw):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = EulerDiscreteScheduler if sampler == "euler" else DDIMScheduler
    ref.scheduler = cls.from_config(ref.scheduler.config)
    out = ref(prompts, num_images_per_prompt=num_per_prompt, num_inference_steps=steps, guidance_scale=cfg,
              latents=torch.from_numpy(np.array(noise)), output_type="pil", **kw)
    return np.stack([np.asarray(im) for im in out.images])


def fairjax_images(pipe, prompts, num_per_prompt, options, seed=0, batch_size=8, mesh=None):
    images, latents, jobs = [], [], []
    for chunk, im, lat in pl.generate(pipe, prompts, num_per_prompt=num_per_prompt, seed=seed, options=options,
                                      batch_size=batch_size, mesh=mesh):
        jobs += chunk
        images.append(im)
        latents.append(lat)
    return np.concatenate(images), np.concatenate(latents), jobs


def noise_for(pipe, jobs, seed=0):
    """The initial latents fairjax draws for these (prompt, image) jobs, to hand to diffusers."""
    p = np.asarray([j[0] for j in jobs])
    i = np.asarray([j[1] for j in jobs])
    size = pipe.default_size // pipe.vae_scale_factor
    return np.asarray(pl.initial_noise(seed, p, i, (pipe.latent_channels, size, size)))


def max_pixel_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


SDXL_DEFAULT = pl.SampleOptions(sampler="euler", steps=3, guidance_scale=5.0)  # zeroed negative conditioning
CASES = {
    "euler_cfg": (SDXL_DEFAULT, {}),
    "ddim_negative_rescale": (
        pl.SampleOptions(sampler="ddim", steps=3, guidance_scale=7.5, guidance_rescale=0.7, negative_prompt="the cat"),
        {"negative_prompt": "the cat", "guidance_rescale": 0.7},
    ),
    "euler_no_cfg": (pl.SampleOptions(sampler="euler", steps=2, guidance_scale=1.0), {}),
}


@pytest.fixture(scope="session")
def default_run(tiny):
    """fairjax output for SDXL_DEFAULT: 3 prompts x 2 images, one batch over all 8 devices."""
    _, pipe, _, _ = tiny
    return fairjax_images(pipe, PROMPTS, 2, SDXL_DEFAULT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_images_match_diffusers(tiny, default_run, case):
    ref, pipe, _, _ = tiny
    options, ref_kw = CASES[case]
    got, _, jobs = default_run if case == "euler_cfg" else fairjax_images(pipe, PROMPTS, 2, options)
    assert jobs == [(p, i) for p in range(3) for i in range(2)]
    want = diffusers_images(ref, PROMPTS, 2, noise_for(pipe, jobs), options.steps, options.guidance_scale,
                            sampler=options.sampler, **ref_kw)
    assert got.shape == want.shape == (6, 16, 16, 3) and got.dtype == np.uint8
    assert want.std() > 5  # the reference is an image with contrast, not a flat or saturated one
    assert max_pixel_diff(got, want) <= 1


def test_empty_negative_prompt_when_not_forced_to_zeros(tiny):
    # model_index.json force_zeros_for_empty_prompt = false: the negative rows encode "" instead of zeros.
    ref, pipe, _, _ = tiny
    options, ref_kw = CASES["ddim_negative_rescale"]
    options = dataclasses.replace(options, negative_prompt=None)
    unforced = dataclasses.replace(pipe, force_zeros_for_empty_prompt=False)
    got, _, jobs = fairjax_images(unforced, PROMPTS[:2], 1, options)
    ref.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        want = diffusers_images(ref, PROMPTS[:2], 1, noise_for(pipe, jobs), options.steps, options.guidance_scale,
                                sampler="ddim", guidance_rescale=0.7)
    finally:
        ref.register_to_config(force_zeros_for_empty_prompt=True)
    assert max_pixel_diff(got, want) <= 1


def test_invariant_to_batch_size_and_device_count(tiny, default_run, rel):
    _, pipe, _, _ = tiny
    images8, latents8, jobs8 = default_run  # 8 devices, one padded batch of 8
    one_device = pl.local_mesh(jax.local_devices()[:1])
    images1, latents1, jobs1 = fairjax_images(pipe, PROMPTS, 2, SDXL_DEFAULT, batch_size=5, mesh=one_device)
    assert jax.local_device_count() == 8 and jobs1 == jobs8  # two batches here: 5 rows, then 1 (+4 padding)
    assert rel(latents1, latents8) <= 1e-5
    assert max_pixel_diff(images1, images8) <= 1
