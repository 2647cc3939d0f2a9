"""Sampling a pixel-space (no VAE) model directory with the SDXL pipeline of :mod:`fairjax.diffusion.pipeline`.

The toy model is an SDXL pipeline whose UNet denoises RGB pixels directly. The
SDXL pipeline code is used as it is (tokenizers, both text encoders, pooled
``text_embeds`` + ``time_ids``, Euler/DDIM loop, per-row noise keyed by
(seed, prompt, image), sharded batches); only the VAE is replaced by
:class:`PixelDecoder`, the identity map with ``scaling_factor`` 1 and a scale
factor of 1 pixel per latent, so that ``image = round(clip(x / 2 + 0.5, 0, 1) * 255)``
of the sampled ``x`` and the "latents" kept for training are the float pixels.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax.numpy as jnp

from fairjax.checkpoint import raise_if_stopped
from fairjax.diffusion import pipeline as sdxl
from fairjax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class PixelSpaceConfig:
    """The VAE config fields the SDXL pipeline reads: one block (scale factor 2**0 = 1), no scaling."""

    block_out_channels: tuple[int, ...] = (3,)
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None


class PixelDecoder(nn.Module):
    """Identity "VAE" of a pixel-space model: ``decode(x) = x`` (no params)."""

    config: PixelSpaceConfig = PixelSpaceConfig()

    def decode(self, z):
        return z

    def __call__(self, z):
        return z


def is_pixel_space(model_dir: str) -> bool:
    """A model dir without ``vae/`` whose UNet works on 3-channel images."""
    from fairjax.io.model_dir import read_json

    if os.path.isdir(os.path.join(model_dir, "vae")):
        return False
    cfg_file = os.path.join(model_dir, "unet", "config.json")
    return os.path.isfile(cfg_file) and int(read_json(cfg_file).get("in_channels", 4)) == 3


def load_pixel_pipeline(model_dir: str, *, lora: str | None = None, dtype=jnp.float32) -> sdxl.SDXLPipeline:
    """Like :func:`fairjax.diffusion.pipeline.load_pipeline` for a pixel-space model dir."""
    from fairjax.models import clip_text, tokenizer, unet

    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: model directory not found")
    sched_file = os.path.join(model_dir, sdxl.SCHEDULER_CONFIG)
    if not os.path.isfile(sched_file):
        raise CheckpointError(f"{model_dir}: no {sdxl.SCHEDULER_CONFIG}")
    scheduler_config = sdxl._read_json(sched_file)
    tok, tok_2 = tokenizer.load_sdxl_tokenizers(model_dir)
    unet_module, unet_params = unet.load(model_dir, dtype=dtype)
    te, te_params = clip_text.load(model_dir, "text_encoder", dtype=dtype)
    te2, te2_params = clip_text.load(model_dir, "text_encoder_2", dtype=dtype)
    if lora is not None:
        unet_params = sdxl.merge_lora(unet_params, lora)
    params = {"unet": unet_params, "vae": {}, "text_encoder": te_params, "text_encoder_2": te2_params}
    return sdxl.SDXLPipeline(unet_module, PixelDecoder(), te, te2, tok, tok_2, params, scheduler_config, True)


def load_any_pipeline(model_dir: str, *, lora: str | None = None, dtype=jnp.float32) -> sdxl.SDXLPipeline:
    """The pixel-space pipeline for a toy model dir, else the SDXL one."""
    if is_pixel_space(model_dir):
        return load_pixel_pipeline(model_dir, lora=lora, dtype=dtype)
    return sdxl.load_pipeline(model_dir, lora=lora, dtype=dtype)


class Generator:
    """Compiled sampling for a list of ``(prompt, count)`` jobs; the UNet params can be swapped
    (same architecture) without recompiling, so a base and a tuned model share one program.

    ``run(prompts, counts, seed)`` yields ``(prompt_index, image_index, image uint8 HWC, latents)``
    in prompt-major order; image ``(p, i)`` depends only on (model, prompt p's text, seed, p, i).
    Before each batch it polls the job's stop flag (:func:`fairjax.checkpoint.raise_if_stopped`).
    """

    def __init__(self, pipe: sdxl.SDXLPipeline, options: sdxl.SampleOptions, batch_size: int = 64):
        self.pipe = pipe
        self.t2i = sdxl.Text2Image(pipe, options, batch_size=batch_size)

    def set_unet_params(self, unet_params) -> None:
        """Use other UNet params (of the same config) from now on."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        params = dict(self.pipe.params)
        params["unet"] = unet_params
        self.t2i.params = jax.device_put(params, NamedSharding(self.t2i.mesh, P()))

    def run(self, prompts, counts, seed: int):
        jobs = [(p, i) for p, n in enumerate(counts) for i in range(int(n))]
        bs = self.t2i.batch_size
        for start in range(0, len(jobs), bs):
            raise_if_stopped(f"while generating images ({start} of {len(jobs)} done); this stage keeps nothing "
                             "partial: run the same command again to redo it")
            chunk = jobs[start:start + bs]
            images, latents = self.t2i([prompts[p] for p, _ in chunk], [p for p, _ in chunk],
                                       [i for _, i in chunk], seed)
            for (p, i), img, lat in zip(chunk, images, latents):
                yield p, i, img, lat
