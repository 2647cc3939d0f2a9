"""SDXL text -> image in JAX, as diffusers' ``StableDiffusionXLPipeline`` computes it.

For a batch of prompts (each row tagged with its prompt index p and image index i):

    ids, ids_2    = tokenizer(prompt), tokenizer_2(prompt)            (77 tokens each, on the host)
    context       = concat(text_encoder(ids).hidden_states[-2],
                           text_encoder_2(ids_2).hidden_states[-2])    (B, 77, 768 + 1280)
    text_embeds   = text_encoder_2(ids_2).text_embeds                  (B, 1280), pooled + projected
    time_ids      = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]
    negative      = zeros (model_index.json force_zeros_for_empty_prompt, the SDXL default, and no
                    negative prompt) or the encoded negative prompt ("" when not forced to zeros)
    noise         = N(0, I) from key fold_in(fold_in(key(seed), p), i)  (B, 4, H/8, W/8), NCHW
    latents       = sampler loop (Euler / DDIM) with eps = u + cfg (c - u) from one UNet call on 2B
    image         = round(clip(vae.decode(unscale(latents)) / 2 + 0.5, 0, 1) * 255)  uint8 NHWC

The noise of a row depends only on (seed, p, i), and rows never interact, so an image does not
depend on the batch size, on the rows it is batched with, or on the number of devices. The whole
batch function is one `jit`, with the batch axis sharded over a mesh of all local devices and the
params replicated.

A model directory (``tools/convert_*`` output) holds ``unet/ vae/ text_encoder/ text_encoder_2/``
(fairjax components), ``tokenizer/ tokenizer_2/`` (the diffusers tokenizer files as they are),
``scheduler/scheduler_config.json`` and, optionally, the pipeline's ``model_index.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fairjax.diffusion import samplers
from fairjax.errors import CheckpointError, UserError

SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
MODEL_INDEX = "model_index.json"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


# ----------------------------------------------------------------------------------------------
# the pipeline object


@dataclasses.dataclass
class SDXLPipeline:
    """Modules (static), params (a dict of pytrees, one per component) and host-side pieces."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    params: dict
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = True

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along a side: 2 ** (len(vae block_out_channels) - 1) (SDXL: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """Default height = width: unet sample_size * vae_scale_factor (SDXL: 128 * 8 = 1024)."""
        return int(self.unet.config["sample_size"] or 128) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config["in_channels"])


def _read_json(path: str) -> dict:
    from fairjax.io.model_dir import read_json

    return read_json(path)


def load_pipeline(model_dir: str, *, dtype=jnp.float32, param_dtype=jnp.float32, lora: str | None = None,
                  attention_implementation: str | None = None) -> SDXLPipeline:
    """Load every SDXL component of a fairjax model directory (one-line CheckpointError if one is missing).

    `dtype` is the UNet / text encoder compute dtype (the VAE always decodes in float32, as
    diffusers upcasts the SDXL VAE); `lora` a fairjax LoRA file merged into the UNet params.
    """
    from fairjax.models import clip_text, tokenizer, unet, vae

    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: model directory not found")
    sched_file = os.path.join(model_dir, SCHEDULER_CONFIG)
    if not os.path.isfile(sched_file):
        raise CheckpointError(f"{model_dir}: no {SCHEDULER_CONFIG}; copy the diffusers model's scheduler/ folder there")
    scheduler_config = _read_json(sched_file)
    index_file = os.path.join(model_dir, MODEL_INDEX)
    force_zeros = True  # StableDiffusionXLPipeline's default
    if os.path.isfile(index_file):
        force_zeros = bool(_read_json(index_file).get("force_zeros_for_empty_prompt", True))
    tok, tok_2 = tokenizer.load_sdxl_tokenizers(model_dir)
    unet_module, unet_params = unet.load(model_dir, dtype=dtype, param_dtype=param_dtype,
                                         attention_implementation=attention_implementation)
    vae_module, vae_params = vae.load(model_dir, dtype=jnp.float32, param_dtype=param_dtype)
    te, te_params = clip_text.load(model_dir, "text_encoder", dtype=dtype, param_dtype=param_dtype)
    te2, te2_params = clip_text.load(model_dir, "text_encoder_2", dtype=dtype, param_dtype=param_dtype)
    if not te2.config.with_projection:
        raise CheckpointError(f"{model_dir}/text_encoder_2: SDXL needs a CLIPTextModelWithProjection "
                              f"(config architectures), got a plain CLIPTextModel")
    if lora is not None:
        unet_params = merge_lora(unet_params, lora)
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": te_params, "text_encoder_2": te2_params}
    return SDXLPipeline(unet_module, vae_module, te, te2, tok, tok_2, params, scheduler_config, force_zeros)


def merge_lora(unet_params, path: str):
    """UNet params with a fairjax LoRA file merged in: W + (alpha / r) a @ b."""
    from fairjax import lora as lora_lib

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: LoRA file not found")
    entries, meta = lora_lib.load(path)
    if "alpha" not in meta:
        raise CheckpointError(f"{path}: LoRA file has no 'alpha' metadata; write it with fairjax.lora.save")
    return lora_lib.merge(unet_params, entries, float(meta["alpha"]))


# ----------------------------------------------------------------------------------------------
# pure pieces


@dataclasses.dataclass(frozen=True)
class SDXLModules:
    """The four Flax modules; hashable by value (their configs), so it can be a static jit argument
    and two pipelines loaded from equal configs share compiled programs."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any


def modules_of(pipe: SDXLPipeline) -> SDXLModules:
    return SDXLModules(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)


def encode_prompt(modules: SDXLModules, params: Mapping, ids: jax.Array, ids_2: jax.Array):
    """(context (B, T, D1 + D2), text_embeds (B, P)): both encoders' penultimate hidden states
    concatenated, and text_encoder_2's pooled + projected output."""
    out = modules.text_encoder.apply({"params": params["text_encoder"]}, ids, output_hidden_states=True)
    out_2 = modules.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids_2, output_hidden_states=True)
    context = jnp.concatenate([out.hidden_states[-2], out_2.hidden_states[-2]], axis=-1)
    return context, out_2.text_embeds


def add_time_ids(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None) -> np.ndarray:
    """SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w), float32 (6,).
    original_size and target_size default to (height, width), as in the diffusers pipeline."""
    original_size = tuple(original_size or (height, width))
    target_size = tuple(target_size or (height, width))
    return np.asarray(original_size + tuple(crops_coords_top_left) + target_size, np.float32)


def initial_noise(seed, prompt_index: jax.Array, image_index: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Unit Gaussian latents (B, *shape), row b drawn with key fold_in(fold_in(key(seed), p_b), i_b)."""
    base = jax.random.key(seed)

    def one(p, i):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, p), i), tuple(shape), jnp.float32)

    return jax.vmap(one)(jnp.asarray(prompt_index, jnp.uint32), jnp.asarray(image_index, jnp.uint32))


def to_uint8(images: jax.Array) -> jax.Array:
    """VAE output (B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8: round(clip(x / 2 + 0.5, 0, 1) * 255)
    (diffusers' VaeImageProcessor.postprocess: denormalize, then numpy_to_pil)."""
    x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1)
    return jnp.round(jnp.transpose(x, (0, 2, 3, 1)) * 255).astype(jnp.uint8)


def decode_latents(vae, vae_params, latents: jax.Array) -> jax.Array:
    """Final latents -> VAE images in [-1, 1] (NCHW), after undoing the latent scaling."""
    from fairjax.models.vae import unscale_latents

    z = unscale_latents(latents.astype(jnp.float32), vae.config)
    return vae.apply({"params": vae_params}, z, method=vae.decode)


def unet_model_fn(unet, unet_params, context, text_embeds, time_ids):
    """model_fn(x, t) -> eps (float32) for the given per-row conditioning."""

    def model_fn(x, t):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return unet.apply({"params": unet_params}, x.astype(unet.dtype), t, context, added).astype(jnp.float32)

    return model_fn


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Sampler, steps, guidance, image size (None: the model's default) and negative prompt."""

    sampler: str = "euler"
    steps: int = 50
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None

    @property
    def do_cfg(self) -> bool:
        """Guidance runs only for guidance_scale > 1 (as in the diffusers pipeline)."""
        return self.guidance_scale > 1.0


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("latent_shape", "do_cfg", "zero_negative", "guidance_rescale"))
def generate_batch(modules: SDXLModules, params, batch: Mapping[str, jax.Array], seed, guidance_scale,
                   schedule, time_ids, *, latent_shape, do_cfg: bool, zero_negative: bool,
                   guidance_rescale: float = 0.0):
    """One batch, end to end, jitted: returns (uint8 images (B, H, W, 3), latents (B, C, h, w)).

    batch: ids, ids_2 (B, 77) int32, prompt_index, image_index (B,) int32, and unless
    zero_negative (or without CFG), neg_ids, neg_ids_2 (B, 77). Rows are independent, so a
    batch sharded over devices needs no communication.
    """
    ids, ids_2 = batch["ids"], batch["ids_2"]
    b = ids.shape[0]
    if do_cfg and not zero_negative:  # one encoder call for both halves
        both, both_embeds = encode_prompt(modules, params, jnp.concatenate([batch["neg_ids"], ids]),
                                          jnp.concatenate([batch["neg_ids_2"], ids_2]))
        neg_context, context = both[:b], both[b:]
        neg_embeds, text_embeds = both_embeds[:b], both_embeds[b:]
    else:
        context, text_embeds = encode_prompt(modules, params, ids, ids_2)
        neg_context, neg_embeds = jnp.zeros_like(context), jnp.zeros_like(text_embeds)
    if do_cfg:
        context = samplers.interleave_pairs(neg_context, context)
        text_embeds = samplers.interleave_pairs(neg_embeds, text_embeds)
    tids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (context.shape[0], time_ids.shape[-1]))
    model_fn = unet_model_fn(modules.unet, params["unet"], context, text_embeds, tids)
    denoise = samplers.classifier_free_guidance(model_fn, guidance_scale, guidance_rescale) if do_cfg else model_fn
    noise = initial_noise(seed, batch["prompt_index"], batch["image_index"], latent_shape)
    latents = samplers.sample(denoise, noise, schedule)
    images = to_uint8(decode_latents(modules.vae, params["vae"], latents))
    return images, latents


# ----------------------------------------------------------------------------------------------
# the batched, sharded driver


def local_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-axis mesh ('data',) over the local devices (or the given ones)."""
    devs = np.asarray(list(jax.local_devices() if devices is None else devices), dtype=object)
    return Mesh(devs, ("data",))


class Text2Image:
    """Compiled SDXL sampling for one set of SampleOptions, sharded over a mesh's 'data' axis.

    ``images, latents = t2i(prompts, prompt_index, image_index, seed)`` returns numpy arrays;
    the row count is padded internally to `batch_size` (rounded up to a multiple of the
    device count) so every call reuses one compiled program.
    """

    def __init__(self, pipe: SDXLPipeline, options: SampleOptions = SampleOptions(), *, batch_size: int = 1,
                 mesh: Mesh | None = None):
        self.pipe, self.options = pipe, options
        self.mesh = mesh or local_mesh()
        n_dev = self.mesh.devices.size
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = -(-batch_size // n_dev) * n_dev
        height = options.height or pipe.default_size
        width = options.width or pipe.default_size
        f = pipe.vae_scale_factor
        if height % f or width % f:
            raise UserError(f"height {height} and width {width} must be multiples of {f} (the VAE's downsampling)")
        self.height, self.width = height, width
        self.latent_shape = (pipe.latent_channels, height // f, width // f)
        self.schedule = samplers.make_schedule(options.sampler, pipe.scheduler_config, options.steps)
        self.time_ids = add_time_ids(height, width)
        self.zero_negative = options.negative_prompt is None and pipe.force_zeros_for_empty_prompt
        self.params = jax.device_put(pipe.params, NamedSharding(self.mesh, P()))
        self._rows = NamedSharding(self.mesh, P("data"))
        self._static = dict(latent_shape=self.latent_shape, do_cfg=options.do_cfg,
                            zero_negative=self.zero_negative, guidance_rescale=float(options.guidance_rescale))
        self._modules = modules_of(pipe)
        self._neg = None
        if options.do_cfg and not self.zero_negative:
            neg = options.negative_prompt or ""
            self._neg = (pipe.tokenizer([neg]), pipe.tokenizer_2([neg]))

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        out = {"ids": self.pipe.tokenizer(list(prompts)), "ids_2": self.pipe.tokenizer_2(list(prompts))}
        if self._neg is not None:
            out["neg_ids"] = np.repeat(self._neg[0], len(prompts), axis=0)
            out["neg_ids_2"] = np.repeat(self._neg[1], len(prompts), axis=0)
        return out

    def submit(self, prompts: Sequence[str], prompt_index: Sequence[int], image_index: Sequence[int],
               seed: int) -> tuple[jax.Array, jax.Array, int]:
        """Dispatch one batch without waiting: (images, latents) device arrays (padded) and the row count."""
        n = len(prompts)
        if not 0 < n <= self.batch_size or len(prompt_index) != n or len(image_index) != n:
            raise ValueError(f"pass 1..{self.batch_size} prompts with one prompt_index and image_index each")
        pad = self.batch_size - n
        batch = self.tokenize(list(prompts) + [""] * pad)
        batch["prompt_index"] = np.asarray(list(prompt_index) + [0] * pad, np.int32)
        batch["image_index"] = np.asarray(list(image_index) + [0] * pad, np.int32)
        batch = jax.device_put(batch, self._rows)
        images, latents = generate_batch(self._modules, self.params, batch, jnp.uint32(seed),
                                         jnp.float32(self.options.guidance_scale), self.schedule, self.time_ids,
                                         **self._static)
        return images, latents, n

    def __call__(self, prompts: Sequence[str], prompt_index: Sequence[int], image_index: Sequence[int],
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One batch: (uint8 images (n, H, W, 3), float32 latents (n, C, h, w)) as numpy arrays."""
        images, latents, n = self.submit(prompts, prompt_index, image_index, seed)
        return np.asarray(images)[:n], np.asarray(latents)[:n]


def generate(pipe: SDXLPipeline, prompts: Sequence[str], *, num_per_prompt: int = 1, seed: int = 0,
             options: SampleOptions = SampleOptions(), batch_size: int = 1, mesh: Mesh | None = None):
    """An iterator of (jobs, images, latents) per batch; jobs are (prompt_index, image_index) pairs in
    the order prompt 0 images 0..N-1, prompt 1 ..., as StableDiffusionXLPipeline orders a batch.
    Options are checked (UserError) here, before the first batch runs. The next batch is
    dispatched before a batch is handed out, so the device keeps working while the caller
    writes files."""
    t2i = Text2Image(pipe, options, batch_size=batch_size, mesh=mesh)
    jobs = [(p, i) for p in range(len(prompts)) for i in range(num_per_prompt)]
    chunks = [jobs[k:k + t2i.batch_size] for k in range(0, len(jobs), t2i.batch_size)]

    def submit(chunk):
        return chunk, t2i.submit([prompts[p] for p, _ in chunk], [p for p, _ in chunk], [i for _, i in chunk], seed)

    def batches():
        pending = submit(chunks[0]) if chunks else None
        for k in range(len(chunks)):
            chunk, (images, latents, n) = pending
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else None
            yield chunk, np.asarray(images)[:n], np.asarray(latents)[:n]

    return batches()
