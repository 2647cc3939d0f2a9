"""`python -m fairjax.generate`: files, index, latents and LoRA, checked against diffusers' pipeline."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import torch
import diffusers  # noqa: F401

from fairjax import generate  # noqa: E402
from fairjax.io.safetensors import SafetensorsReader  # noqa: E402
from test_pipeline import PROMPTS, SDXL_DEFAULT, diffusers_images, max_pixel_diff, noise_for, tiny  # noqa: E402,F401


def write_prompts(path, prompts):
    with open(path, "w") as f:
        f.write("# a comment line\n" + "\n\n".join(prompts) + "\n")
    return str(path)


def cli(model_dir, prompts_file, out, *extra, steps=SDXL_DEFAULT.steps, cfg=SDXL_DEFAULT.guidance_scale):
    return generate.main(["--model", model_dir, "--prompts", prompts_file, "--out", str(out), "--num-per-prompt",
                          "2", "--steps", str(steps), "--cfg", str(cfg), "--seed", "0", "--batch-size", "3", *extra])


def read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def test_cli_writes_images_index_and_latents_like_diffusers(tiny, tmp_path):
    ref, pipe, model_dir, _ = tiny
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    out = tmp_path / "out"
    assert cli(model_dir, prompts, out, "--save-latents") == 0
    rows = [json.loads(line) for line in open(out / "images.jsonl")]
    jobs = [(p, i) for p in range(3) for i in range(2)]
    assert [(r["prompt_index"], r["index"]) for r in rows] == jobs
    assert [r["prompt"] for r in rows] == [PROMPTS[p] for p, _ in jobs]
    assert all(r["seed"] == 0 for r in rows)
    assert sorted(os.listdir(out)) == sorted([r["file"] for r in rows] + ["images.jsonl", "generate.json", "latents"])
    got = np.stack([read_png(out / r["file"]) for r in rows])

    noise = noise_for(pipe, jobs)
    want = diffusers_images(ref, PROMPTS, 2, noise, SDXL_DEFAULT.steps, SDXL_DEFAULT.guidance_scale)
    assert max_pixel_diff(got, want) <= 1

    ref.scheduler = type(ref.scheduler).from_config(ref.scheduler.config)
    want_latents = ref(PROMPTS, num_images_per_prompt=2, num_inference_steps=SDXL_DEFAULT.steps,
                       guidance_scale=SDXL_DEFAULT.guidance_scale, latents=torch.from_numpy(noise),
                       output_type="latent").images.numpy()
    for r, want_lat in zip(rows, want_latents):
        with SafetensorsReader(str(out / r["latents"])) as rd:
            lat = np.asarray(rd["latents"])
        assert lat.shape == want_lat.shape == (4, 8, 8) and lat.dtype == np.float32
        assert np.abs(lat - want_lat).max() / np.abs(want_lat).max() <= 1e-4
    settings = json.load(open(out / "generate.json"))
    assert settings["images"] == 6 and settings["height"] == settings["width"] == 16


def test_cli_lora_matches_diffusers_with_the_adapter_loaded(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from fairjax import lora as lora_lib
    from fairjax.io.tree import flatten, path_str
    from fairjax.convert.unet import lora_state

    ref, pipe, model_dir, diffusers_dir = tiny
    kernels = {path_str(p): v.shape for p, v in flatten(pipe.params["unet"]).items() if p[-1] == "kernel"}
    targets = [k for k in kernels if k.endswith(("attn2/to_k/kernel", "attn1/to_q/kernel", "conv1/kernel"))]
    rng = np.random.default_rng(0)
    entries = {k: {"a": rng.standard_normal((int(np.prod(kernels[k][:-1])), 2)).astype(np.float32) * 0.3,
                   "b": rng.standard_normal((2, kernels[k][-1])).astype(np.float32) * 0.3} for k in targets}
    lora_file = str(tmp_path / "lora.safetensors")
    lora_lib.save(lora_file, entries, alpha=4.0)

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:2])
    assert cli(model_dir, prompts, tmp_path / "out", "--lora", lora_file) == 0
    got = np.stack([read_png(tmp_path / "out" / f"{p:05d}_{i:04d}.png") for p in range(2) for i in range(2)])

    adapted = StableDiffusionXLPipeline.from_pretrained(diffusers_dir, add_watermarker=False)
    state = {k: torch.from_numpy(v) for k, v in lora_state(entries, 4.0, kernels, prefix=None)}
    adapted.unet.load_lora_adapter(state, prefix=None, adapter_name="test")
    noise = noise_for(pipe, [(p, i) for p in range(2) for i in range(2)])
    want = diffusers_images(adapted, PROMPTS[:2], 2, noise, SDXL_DEFAULT.steps, SDXL_DEFAULT.guidance_scale)
    base = diffusers_images(ref, PROMPTS[:2], 2, noise, SDXL_DEFAULT.steps, SDXL_DEFAULT.guidance_scale)
    assert max_pixel_diff(want, base) > 10  # the adapter changes the images
    assert max_pixel_diff(got, want) <= 1


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_bad_input_is_one_line_error(tiny, tmp_path, capsys):
    _, _, model_dir, _ = tiny
    good = write_prompts(tmp_path / "prompts.txt", ["a cat"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")

    assert cli(model_dir, str(tmp_path / "missing.txt"), tmp_path / "o1") == 2
    assert "missing.txt" in _error_line(capsys)
    assert cli(model_dir, str(empty), tmp_path / "o2") == 2
    assert "no prompts" in _error_line(capsys)

    broken = tmp_path / "broken_model"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "vae")
    assert cli(str(broken), good, tmp_path / "o3") == 2
    assert "'vae'" in _error_line(capsys)
    shutil.rmtree(broken / "scheduler")
    assert cli(str(broken), good, tmp_path / "o4") == 2
    assert "scheduler_config.json" in _error_line(capsys)

    (tmp_path / "taken").mkdir()
    assert cli(model_dir, good, tmp_path / "taken") == 2
    assert "--overwrite" in _error_line(capsys)
    assert cli(model_dir, good, tmp_path / "o5", "--lora", str(tmp_path / "nope.safetensors")) == 2
    assert "nope.safetensors" in _error_line(capsys)
    assert cli(model_dir, good, tmp_path / "o6", steps=0) == 2
    assert "--steps" in _error_line(capsys)
    assert cli(model_dir, good, tmp_path / "o7", "--height", "15") == 2
    assert "multiples of 2" in _error_line(capsys)
    assert not any((tmp_path / f"o{k}").exists() for k in range(1, 8))  # nothing half-written
