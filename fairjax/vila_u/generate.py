"""VILA-U text-to-image generation: prompt -> vicuna_v1 conversation -> image codes -> PNG.

``python -m fairjax.generate --model DIR ...`` comes here when ``DIR/fairjax.json`` says
``model_type: vila_u`` (a folder written by ``tools/convert_vila_u.py``). As vila-u's
``generate_image_content`` (``vila_u/model/vila_u_arch.py``):

* prompt text, with vila-u's ``tokenize_conversation(..., add_generation_prompt=True,
  image_generation=True)`` and the vicuna_v1 template (the message is stripped; an empty one
  gets no space after ``USER:``)::

      "<system> USER: <prompt> ASSISTANT: <im_start>"     (conditional)
      "<system> USER:ASSISTANT: <im_start>"               (unconditional: human message " ")

  ids = ``[bos] + tokenizer(text)`` (:class:`PromptTokenizer`, ``DIR/llm/tokenizer.json``);
* per image one conditional and one unconditional row, left padded with id 0 (masked);
  the CFG loop of :func:`fairjax.models.vila_u.generate_image_codes` (KV cache, ``h*w``
  image positions, per depth ``l = u + cfg (c - u)``, temperature, top-k then top-p,
  the same code written into both rows); defaults cfg 3.0, temperature 1.0, top_k 900,
  top_p 0.96;
* ``z = sum_d emb(c_d)`` on the ``h x w`` grid -> ``post_quant_conv`` + decoder ->
  ``clip((x + 1) 127.5, 0, 255)`` truncated to uint8.

Randomness: image ``(p, i)`` (prompt p of the file, image i of that prompt) uses key
``fold_in(fold_in(key(seed), p), i)`` alone (:func:`image_keys`), and every prompt is padded
to the same length (the longest prompt of the run rounded up to :data:`PAD_MULTIPLE`), so an
image does not depend on the batch size, the device count, or which images share its batch.
vila-u draws from torch's global generator over the whole batch instead (so its images
depend on the batch); the distribution per image is the same.

CLI differences from SDXL: ``--steps``, ``--sampler`` are ignored (VILA-U draws exactly
``h*w`` positions x depth codes, 16 x 16 x 4 for vila-u-7b-256, from ``vision_tower/config.json``);
``--cfg`` defaults to vila-u's 3.0 and is applied as ``u + cfg (c - u)`` for any value (1 = conditional
sampling, computed on both rows as vila-u does); ``--height/--width`` must be unset or the model's; ``--guidance-rescale`` must be 0;
``--negative-prompt`` replaces the unconditional human message; ``--save-latents`` saves the
image codes (``codes/{p:05d}_{i:04d}.safetensors``, key ``codes``, (h*w, depth) int32 in
raster order); ``--dtype bfloat16`` loads the params in bfloat16 too (vila-u runs in bf16);
``--lora`` is a fairjax LoRA over the LLM params (``model/layers_N/...``, what
:mod:`fairjax.tasks.vila_u_pref` trains), merged before sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fairjax.errors import UserError
from fairjax.io.model_dir import CONFIG_FILE, INDEX_FILE, read_json
from fairjax.models import rqvae, vila_u
from fairjax.models.vila_u_tokenizer import PAD_ID, PAD_MULTIPLE, PromptTokenizer, load_tokenizer


def padded_length(lengths: Sequence[int], multiple: int = PAD_MULTIPLE) -> int:
    """``max(lengths)`` rounded up to a multiple of ``multiple``."""
    return -(-max(lengths) // multiple) * multiple


def cfg_rows(cond: Sequence[Sequence[int]], uncond: Sequence[int], length: int):
    """ids, mask (B, 2, length): row b = [cond[b], uncond], left padded with :data:`PAD_ID`."""
    b = len(cond)
    ids = np.full((b, 2, length), PAD_ID, np.int32)
    mask = np.zeros((b, 2, length), bool)
    for r, c in enumerate(cond):
        for j, seq in enumerate((c, uncond)):
            if len(seq) > length:
                raise ValueError(f"prompt of {len(seq)} ids does not fit the padded length {length}")
            ids[r, j, length - len(seq):] = seq
            mask[r, j, length - len(seq):] = True
    return ids, mask


# ----------------------------------------------------------------------------- the jitted batch

@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """vila-u's ``generate_image_content`` defaults; ``negative_prompt`` None = the human message " "."""

    cfg: float = 3.0
    temperature: float = 1.0
    top_k: int | None = 900
    top_p: float | None = 0.96
    negative_prompt: str | None = None

    def check(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1 or None (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] or None (got {self.top_p})")


def image_keys(seed, prompt_index, image_index):
    """Per-image keys ``fold_in(fold_in(key(seed), p), i)`` (B,)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, i: jax.random.fold_in(jax.random.fold_in(base, p), i))(prompt_index, image_index)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("top_k", "use_top_p"))
def generate_batch(vu, tower, params, vis_params, batch: Mapping, seed, cfg, temperature, top_p, *,
                   top_k: int | None, use_top_p: bool):
    """One batch, jitted: ``(pixels (B, 3, H, W) float32 in [0, 255], codes (B, h*w, depth) int32)``.

    ``batch``: ids, mask (B, 2, L) (row b = [conditional, unconditional]), prompt_index,
    image_index (B,). Each image runs :func:`~fairjax.models.vila_u.generate_image_codes` on
    its own pair of rows with its own key (``vmap``), so rows never mix.
    """
    keys = image_keys(seed, batch["prompt_index"], batch["image_index"])
    kw = dict(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None)

    def one(ids, mask, key):
        return vila_u.generate_image_codes(vu, params, ids, mask, key, **kw)[0]

    codes = jax.vmap(one)(batch["ids"], batch["mask"], keys)
    z = vila_u.image_grid_features(vu, params, codes)
    pixels = rqvae.to_pixels(tower.apply({"params": vis_params}, z, method=tower.decode))
    return pixels, codes


# ----------------------------------------------------------------------------- model + driver

class VilaUModel(NamedTuple):
    """A loaded VILA-U model dir: modules, params (LoRA merged), the vision tower and the tokenizer."""

    vu: Any  # fairjax.models.vila_u.VilaU
    params: dict
    tower: Any  # fairjax.models.rqvae.RQVAESiglip
    vis_params: dict
    tokenizer: PromptTokenizer

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of a decoded image."""
        h, w, _ = self.vu.rqtransformer.config.block_size
        z = jax.ShapeDtypeStruct((1, h, w, self.vu.codebook.config.embed_dim), self.tower.dtype)
        out = jax.eval_shape(lambda p, x: self.tower.apply({"params": p}, x, method=self.tower.decode),
                             self.vis_params, z)
        return int(out.shape[2]), int(out.shape[3])


def is_vila_u(model_dir: str) -> bool:
    """True when ``model_dir/fairjax.json`` says ``model_type: vila_u``."""
    path = os.path.join(model_dir, INDEX_FILE)
    return os.path.isfile(path) and read_json(path).get("model_type") == "vila_u"


def load_model(model_dir: str, *, dtype=None, lora: str | None = None) -> VilaUModel:
    """Tokenizer first (cheap checks), then every component (checked key by key), then the LoRA merged
    into the LLM. ``dtype`` (compute and param dtype) defaults to float32."""
    from fairjax.convert import vila_u as vila_u_convert
    from fairjax.io.model_dir import component_dir

    dtype = dtype or jnp.float32
    llm_dir = component_dir(model_dir, "llm")
    tokenizer = load_tokenizer(llm_dir)
    vocab = int(read_json(os.path.join(llm_dir, CONFIG_FILE)).get("vocab_size", 32000))
    if tokenizer.tokenizer.get_vocab_size(with_added_tokens=True) > vocab:
        raise UserError(f"{tokenizer.path} has {tokenizer.tokenizer.get_vocab_size()} tokens, more than the LLM's "
                        f"vocab_size {vocab}; it belongs to another model")
    vu, params, tower, vis = vila_u_convert.load(model_dir, dtype=dtype, param_dtype=dtype)
    if lora is not None:
        params = dict(params, llm=merge_lora(params["llm"], lora))
    return VilaUModel(vu, params, tower, vis, tokenizer)


def merge_lora(llm_params, path: str):
    """``llm_params`` with the fairjax LoRA file at ``path`` merged (``W + (alpha/r) a b``)."""
    from fairjax import lora as lora_lib

    entries, meta = lora_lib.load(path)
    if "alpha" not in meta:
        raise UserError(f"{path}: LoRA file has no 'alpha' metadata; write it with fairjax.lora.save")
    return lora_lib.merge(llm_params, entries, float(meta["alpha"]))


class VilaUGenerator:
    """Compiled VILA-U sampling for one :class:`SampleOptions`, rows sharded over a mesh's 'data' axis.

    ``batch_size`` is rounded up to a multiple of the device count; a short batch is padded
    (the padding rows are computed and dropped). ``prompt_len`` fixes the padded prompt length
    (default: :func:`padded_length` of the prompts of each call).
    """

    def __init__(self, model: VilaUModel, options: SampleOptions = SampleOptions(), *, batch_size: int = 1,
                 mesh=None, prompt_len: int | None = None):
        from fairjax.diffusion.pipeline import local_mesh

        options.check()
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be >= 1")
        self.model, self.options = model, options
        self.mesh = mesh or local_mesh()
        n_dev = self.mesh.devices.size
        self.batch_size = -(-batch_size // n_dev) * n_dev
        self.prompt_len = prompt_len
        self.uncond_ids = (model.tokenizer.unconditional_ids() if options.negative_prompt is None
                           else model.tokenizer.prompt_ids(options.negative_prompt))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(model.params, replicated)
        self.vis_params = jax.device_put(model.vis_params, replicated)
        self._rows = NamedSharding(self.mesh, P("data"))

    def __call__(self, prompts: Sequence[str], prompt_index: Sequence[int], image_index: Sequence[int],
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(uint8 images (n, H, W, 3), codes (n, h*w, depth) int32)`` for image ``(p_b, i_b)`` of each prompt."""
        n = len(prompts)
        if not 0 < n <= self.batch_size or len(prompt_index) != n or len(image_index) != n:
            raise ValueError(f"pass 1..{self.batch_size} prompts with one prompt_index and image_index each")
        pad = self.batch_size - n
        cond = [self.model.tokenizer.prompt_ids(p) for p in prompts]
        length = self.prompt_len or padded_length([len(c) for c in cond] + [len(self.uncond_ids)])
        ids, mask = cfg_rows(cond + [cond[0]] * pad, self.uncond_ids, length)
        batch = {"ids": ids, "mask": mask,
                 "prompt_index": np.asarray(list(prompt_index) + [0] * pad, np.int32),
                 "image_index": np.asarray(list(image_index) + [0] * pad, np.int32)}
        batch = jax.device_put(batch, self._rows)
        o = self.options
        pixels, codes = generate_batch(self.model.vu, self.model.tower, self.params, self.vis_params, batch,
                                       jnp.uint32(seed), jnp.float32(o.cfg), jnp.float32(o.temperature),
                                       jnp.float32(1.0 if o.top_p is None else o.top_p), top_k=o.top_k,
                                       use_top_p=o.top_p is not None)
        return rqvae.to_uint8_hwc(np.asarray(pixels)[:n]), np.asarray(codes)[:n]


def generate(model: VilaUModel, prompts: Sequence[str], *, num_per_prompt: int = 1, seed: int = 0,
             options: SampleOptions = SampleOptions(), batch_size: int = 1, mesh=None):
    """An iterator of ``(jobs, images, codes)`` per batch; jobs are ``(prompt_index, image_index)`` in the
    order prompt 0 images 0..N-1, prompt 1, ... Every prompt is tokenised (and checked) before the
    first batch; all are padded to one length, so images do not depend on the batching."""
    gen = VilaUGenerator(model, options, batch_size=batch_size, mesh=mesh)
    lengths = [len(model.tokenizer.prompt_ids(p)) for p in prompts] + [len(gen.uncond_ids)]
    gen.prompt_len = padded_length(lengths)
    jobs = [(p, i) for p in range(len(prompts)) for i in range(num_per_prompt)]

    def batches():
        for start in range(0, len(jobs), gen.batch_size):
            chunk = jobs[start:start + gen.batch_size]
            images, codes = gen([prompts[p] for p, _ in chunk], [p for p, _ in chunk], [i for _, i in chunk], seed)
            yield chunk, images, codes

    return batches()


# ----------------------------------------------------------------------------- CLI body

def _check_cli_options(args, model: VilaUModel) -> None:
    size = model.image_size
    for name, want in (("height", size[0]), ("width", size[1])):
        got = getattr(args, name)
        if got is not None and got != want:
            raise UserError(f"--{name} {got}: this VILA-U model makes {size[0]}x{size[1]} images; leave --{name} unset")
    if args.guidance_rescale:
        raise UserError("--guidance-rescale is not supported for VILA-U; leave it at 0")


def run(args, prompts: Sequence[str]) -> dict:
    """``python -m fairjax.generate`` for a VILA-U model dir (``args`` from :func:`fairjax.generate.parse_args`,
    already checked); writes OUT as the SDXL path does and returns the summary."""
    from tqdm import tqdm

    from fairjax.checkpoint import raise_if_stopped
    from fairjax.io.images import image_stem, write_png
    from fairjax.io.model_dir import atomic_output_dir
    from fairjax.io.safetensors import write_safetensors

    model = load_model(args.model, dtype=getattr(jnp, args.dtype), lora=args.lora)
    _check_cli_options(args, model)
    options = SampleOptions(cfg=SampleOptions.cfg if args.cfg is None else args.cfg,
                            negative_prompt=args.negative_prompt)
    vu = model.vu
    height, width = model.image_size
    settings = {"model": args.model, "model_type": "vila_u", "prompts": args.prompts,
                "num_per_prompt": args.num_per_prompt, "cfg": options.cfg, "temperature": options.temperature,
                "top_k": options.top_k, "top_p": options.top_p, "seed": args.seed, "lora": args.lora,
                "negative_prompt": args.negative_prompt, "dtype": args.dtype,
                "image_tokens": vu.image_tokens, "depth": vu.depth}
    batches = generate(model, prompts, num_per_prompt=args.num_per_prompt, seed=args.seed, options=options,
                       batch_size=args.batch_size)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        if args.save_latents:
            os.makedirs(os.path.join(tmp, "codes"))
        rows = []
        with tqdm(total=len(prompts) * args.num_per_prompt, unit="img", desc="generate") as bar:
            for jobs, images, codes in batches:
                for (p, i), image, code in zip(jobs, images, codes):
                    stem = image_stem(p, i)
                    write_png(os.path.join(tmp, stem + ".png"), image)
                    row = {"prompt": prompts[p], "prompt_index": p, "seed": args.seed, "index": i,
                           "file": stem + ".png"}
                    if args.save_latents:
                        row["codes"] = os.path.join("codes", stem + ".safetensors")
                        write_safetensors(os.path.join(tmp, row["codes"]), [("codes", np.asarray(code, np.int32))],
                                          {"prompt": prompts[p], "seed": str(args.seed), "index": str(i)})
                    rows.append(row)
                bar.update(len(jobs))
                raise_if_stopped(f"while generating ({len(rows)} of {bar.total} images done): {args.out} not written; "
                                 "run the same command again to start over")
        with open(os.path.join(tmp, "images.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        settings.update(height=height, width=width, images=len(rows))
        with open(os.path.join(tmp, "generate.json"), "w") as f:
            json.dump(settings, f, indent=2, allow_nan=False)
    return {"out": os.path.abspath(args.out), **settings}


class RecordGenerator:
    """:class:`VilaUGenerator` behind the ``run(prompts, counts, seed)`` interface of
    :class:`fairjax.diffusion.generator.Generator` (what :mod:`fairjax.evaluate` and the toy main job
    iterate): yields ``(prompt index, image index, uint8 image, codes)``. Every prompt is padded to one
    length, so an image depends only on ``(seed, p, i)``."""

    def __init__(self, model: VilaUModel, options: SampleOptions = SampleOptions(), *, batch_size: int = 8):
        self.gen = VilaUGenerator(model, options, batch_size=batch_size)

    def run(self, prompts: Sequence[str], counts: Sequence[int], seed: int):
        from fairjax.checkpoint import raise_if_stopped

        tok = self.gen.model.tokenizer
        self.gen.prompt_len = padded_length([len(tok.prompt_ids(p)) for p in prompts] + [len(self.gen.uncond_ids)])
        jobs = [(p, i) for p, n in enumerate(counts) for i in range(int(n))]
        bs = self.gen.batch_size
        for start in range(0, len(jobs), bs):
            raise_if_stopped(f"while generating images ({start} of {len(jobs)} done); this stage keeps nothing "
                             "partial: run the same command again to redo it")
            chunk = jobs[start:start + bs]
            images, codes = self.gen([prompts[p] for p, _ in chunk], [p for p, _ in chunk], [i for _, i in chunk],
                                     seed)
            for (p, i), img, c in zip(chunk, images, codes):
                yield p, i, img, c
