"""Generate images for a prompt list with a converted SDXL model.

    python -m fairjax.generate --model MODEL --prompts prompts.txt --out OUT \\
        --num-per-prompt 10 --steps 50 --cfg 5.0 --seed 0 [--lora lora.safetensors] \\
        [--sampler euler|ddim] [--save-latents] [--batch-size 8] [--height H --width W] \\
        [--negative-prompt TEXT] [--dtype float32|bfloat16] [--overwrite] [--variant fp16] [--no-cache]

MODEL is a fairjax model dir, a diffusers pipeline / vila-u checkpoint folder or a Hugging Face repo id
(``stabilityai/stable-diffusion-xl-base-1.0[@REVISION]``), converted once into the model cache
(:mod:`fairjax.convert.resolve`).

OUT gets ``{p:05d}_{i:04d}.png`` for prompt p (the p-th prompt of the prompt file: one prompt per
line, taken literally -- ``a cat | a dog`` is the prompt "a cat | a dog"; blank lines and lines
starting with ``#`` are skipped) and image i, ``images.jsonl`` with one row per image ({"prompt", "prompt_index",
"seed", "index", "file"[, "latents"]}), ``generate.json`` with the settings, and with
``--save-latents`` ``latents/{p:05d}_{i:04d}.safetensors`` (key "latents": the final (C, h, w)
float32 latents before VAE decoding, NCHW as diffusers). Image (p, i) is a function of
(model, prompt, seed, p, i, settings) only: the same with any batch size or device count.
A VILA-U model dir (``tools/convert_vila_u.py``, ``model_type: vila_u``) goes to
:mod:`fairjax.vila_u.generate` (``--steps``/``--sampler`` ignored: it draws the model's 16x16x4
codes; ``--save-latents`` saves those codes).
OUT is written to a temporary folder and renamed at the end; an existing OUT is refused unless
``--overwrite``, and so is an OUT that equals, contains or is inside ``--model``, ``--prompts`` or
``--lora`` (even with ``--overwrite``). OUT is locked while it is written (a second run on it is
refused). Bad input and the operating system's refusals (read-only, disk full) are a one-line
``error: ...`` and exit status 2; nothing is left behind.
SIGTERM / SIGINT stop it between batches with one line and exit status 128 + the signal number;
the temporary folder is removed, so a re-run starts over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from fairjax.convert.resolve import add_model_args, resolve_args
from fairjax.errors import UserError
from fairjax.io import fs
from fairjax.io.images import image_stem, write_png

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fairjax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="fairjax model dir, diffusers / vila-u folder or Hugging Face repo id ORG/NAME[@REVISION] "
                        "(converted once into the model cache)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale; SDXL: <= 1 disables (default 5); VILA-U: default 3")
    p.add_argument("--seed", type=int, default=0, help="base seed; image (p, i) uses key fold_in(seed, p, i)")
    p.add_argument("--lora", default=None, help="fairjax LoRA file merged into the UNet")
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    p.add_argument("--save-latents", action="store_true", help="also save the final latents per image")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch over all local devices (rounded up to a multiple of the device count)")
    p.add_argument("--height", type=int, default=None, help="default: the model's (SDXL 1024)")
    p.add_argument("--width", type=int, default=None, help="default: the model's (SDXL 1024)")
    p.add_argument("--negative-prompt", default=None, help="default: none (zeroed negative conditioning for SDXL)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="UNet / text encoder compute dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_model_args(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_per_prompt", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32) (got {args.seed})")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1 pixel (got {getattr(args, name)}); leave it unset for the model's")
    if args.cfg is not None and not math.isfinite(args.cfg):
        raise UserError(f"--cfg must be a finite number (got {args.cfg})")
    if not (math.isfinite(args.guidance_rescale) and 0 <= args.guidance_rescale <= 1):
        raise UserError(f"--guidance-rescale must be in [0, 1] (got {args.guidance_rescale})")
    if os.path.isdir(args.prompts):
        raise UserError(f"--prompts {args.prompts} is a folder; pass a text file with one prompt per line")
    if args.lora is not None and not os.path.isfile(args.lora):
        raise UserError(f"{args.lora}: LoRA file not found" if not os.path.isdir(args.lora) else
                        f"--lora {args.lora} is a folder; pass a fairjax LoRA .safetensors file")
    fs.check_output(args.out, what="--out", overwrite=args.overwrite,
                    inputs={"--model": args.model, "--prompts": args.prompts, "--lora": args.lora})


def run(argv=None) -> dict:
    """Parse ``argv``, generate, return a summary (raises UserError on bad input)."""
    args = parse_args(argv)
    check_args(args)
    from fairjax import parallel

    parallel.enable_compilation_cache()
    from fairjax.data.prompts import read_prompt_file

    prompts = read_prompt_file(args.prompts)
    with fs.locked(args.out, what="--out"):  # a second run on OUT is refused before it loads a model
        args.model = resolve_args(args.model, args)  # a diffusers folder or repo id: converted once
        if args.lora is not None:
            check_lora(args.model, args.lora)
        return _generate(args, prompts)


def check_lora(model_dir: str, lora_path: str) -> None:
    """The LoRA file is a fairjax LoRA whose entries fit the model's UNet (VILA-U: its LLM), checked from
    the safetensors headers before any model is loaded."""
    from fairjax import lora as lora_lib
    from fairjax.io.model_dir import component_dir, open_params
    from fairjax.vila_u.generate import is_vila_u

    entries, _ = lora_lib.load(lora_path)
    with open_params(component_dir(model_dir, "llm" if is_vila_u(model_dir) else "unet")) as r:
        try:
            lora_lib.check_fits(entries, {k: r.shape(k) for k in r.keys()})
        except UserError as e:
            raise UserError(f"--lora {lora_path} does not fit --model {model_dir}: {e}") from None


def _generate(args: argparse.Namespace, prompts: list[str]) -> dict:
    from fairjax.vila_u import generate as vila_u_generate

    if vila_u_generate.is_vila_u(args.model):  # VILA-U: see fairjax/vila_u/generate.py for the flag differences
        return vila_u_generate.run(args, prompts)
    if args.cfg is None:
        args.cfg = 5.0

    import jax.numpy as jnp
    from tqdm import tqdm

    from fairjax.checkpoint import raise_if_stopped
    from fairjax.diffusion import pipeline as pl
    from fairjax.io.model_dir import atomic_output_dir
    from fairjax.io.safetensors import write_safetensors

    pipe = pl.load_pipeline(args.model, dtype=getattr(jnp, args.dtype), lora=args.lora)
    options = pl.SampleOptions(sampler=args.sampler, steps=args.steps, guidance_scale=args.cfg,
                               guidance_rescale=args.guidance_rescale, height=args.height, width=args.width,
                               negative_prompt=args.negative_prompt)
    total = len(prompts) * args.num_per_prompt
    settings = {k: getattr(args, k) for k in ("model", "prompts", "num_per_prompt", "steps", "cfg", "seed", "lora",
                                              "sampler", "negative_prompt", "guidance_rescale", "dtype")}
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        if args.save_latents:
            os.makedirs(os.path.join(tmp, "latents"))
        rows = []
        batches = pl.generate(pipe, prompts, num_per_prompt=args.num_per_prompt, seed=args.seed, options=options,
                              batch_size=args.batch_size)
        with tqdm(total=total, unit="img", desc="generate") as bar:
            for jobs, images, latents in batches:
                for (p, i), image, lat in zip(jobs, images, latents):
                    stem = image_stem(p, i)
                    write_png(os.path.join(tmp, stem + ".png"), image)
                    row = {"prompt": prompts[p], "prompt_index": p, "seed": args.seed, "index": i,
                           "file": stem + ".png"}
                    if args.save_latents:
                        row["latents"] = os.path.join("latents", stem + ".safetensors")
                        write_safetensors(os.path.join(tmp, row["latents"]), [("latents", np.asarray(lat))],
                                          {"prompt": prompts[p], "seed": str(args.seed), "index": str(i)})
                    rows.append(row)
                bar.update(len(jobs))
                raise_if_stopped(f"while generating ({len(rows)} of {total} images done): {args.out} not written; "
                                 "run the same command again to start over")
        height, width = images.shape[1:3]
        with open(os.path.join(tmp, "images.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        settings.update(height=int(height), width=int(width), images=len(rows))
        with open(os.path.join(tmp, "generate.json"), "w") as f:
            json.dump(settings, f, indent=2, allow_nan=False)
    return {"out": os.path.abspath(args.out), **settings}


def main(argv=None) -> int:
    """Exit status: 0, 2 bad input, 128 + the signal's number when SIGTERM / SIGINT stopped it between
    batches (OUT is not written; nothing partial is kept)."""

    def body():
        print(json.dumps(run(argv), indent=2))

    return fs.run_entry(body)


if __name__ == "__main__":
    sys.exit(main())
