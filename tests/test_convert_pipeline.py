"""Whole-pipeline conversion: diffusers SDXL folder -> fairjax model dir -> diffusers SDXL folder.

The references are diffusers / transformers themselves: a tiny random StableDiffusionXLPipeline
saved with `save_pretrained` (as tests/test_pipeline.py builds it), its images, and what
`from_pretrained` / `load_lora_weights` + `fuse_lora` make of the files the tools write.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

import torch
import diffusers
import transformers

from test_pipeline import (  # noqa: E402
    PROMPTS, build_tiny_sdxl, diffusers_images, fairjax_images, max_pixel_diff, noise_for,
)

from fairjax.convert import clip as clip_convert  # noqa: E402
from fairjax.convert import vae as vae_convert  # noqa: E402
from fairjax.io.tree import flatten  # noqa: E402
from fairjax.io.model_dir import load_params, read_json  # noqa: E402
from fairjax.diffusion import pipeline as pl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDXL_PARTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]
WEIGHTS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "text_encoder_2": "transformers"}
COPIED = ["scheduler", "tokenizer", "tokenizer_2"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert_tool = _tool("convert_diffusers")
export_tool = _tool("export_diffusers")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers reference pipeline, its save_pretrained folder)."""
    src = str(tmp_path_factory.mktemp("sdxl") / "diffusers")
    return build_tiny_sdxl(src), src


@pytest.fixture(scope="module")
def converted(sdxl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fj") / "model")
    assert convert_tool.main([sdxl[1], out]) == 0
    return out


def state_np(module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def assert_bit_exact(got: dict, want: dict, what: str):
    assert set(got) == set(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, f"{what}: {k}"
        assert np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)), f"{what}: {k}"


def assert_same_files(a: str, b: str):
    """Folders (or files) a and b hold the same files with the same bytes."""
    if os.path.isfile(b):
        assert open(a, "rb").read() == open(b, "rb").read(), a
        return
    names = sorted(os.listdir(b))
    assert sorted(os.listdir(a)) == names and names, a
    for n in names:
        assert_same_files(os.path.join(a, n), os.path.join(b, n))


def load_loading_info(folder: str, name: str, **kw):
    """Load one exported component with its library's loader; returns (module, loading info)."""
    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
           "text_encoder": transformers.CLIPTextModel,
           "text_encoder_2": transformers.CLIPTextModelWithProjection}[name]
    return cls.from_pretrained(folder, subfolder=name, output_loading_info=True, **kw)


def assert_clean_load(folder: str, name: str, **kw):
    _, info = load_loading_info(folder, name, **kw)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(k), f"{name}: {k} {info.get(k)}"


def sample(pipe, noise, steps=2, cfg=5.0):
    return diffusers_images(pipe, PROMPTS[:1], 1, noise, steps, cfg)


# ----------------------------------------------------------------------------- convert


def test_converted_pipeline_loads_and_matches_diffusers(sdxl, converted):
    ref, src = sdxl
    assert sorted(os.listdir(converted)) == sorted(SDXL_PARTS + ["fairjax.json", "model_index.json"])
    index = read_json(os.path.join(converted, "fairjax.json"))
    assert sorted(index["components"]) == sorted(WEIGHTS) and index["copied"] == COPIED
    assert index["not_converted"] == []
    for name in COPIED + ["model_index.json"]:
        assert_same_files(os.path.join(converted, name), os.path.join(src, name))
    # every weight (also those sampling never touches: VAE encoder, last CLIP layer) is what the
    # family converters make of the diffusers folder
    for name, conv in (("vae", vae_convert.convert_vae), ("text_encoder", clip_convert.convert_clip_text),
                       ("text_encoder_2", clip_convert.convert_clip_text)):
        want = flatten(conv(os.path.join(src, name))[1])
        got = flatten(load_params(os.path.join(converted, name, "params.safetensors")))
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want), name

    pipe = pl.load_pipeline(converted)
    options = pl.SampleOptions(sampler="euler", steps=2, guidance_scale=5.0)
    got, _, jobs = fairjax_images(pipe, PROMPTS[:1], 1, options)
    want = sample(ref, noise_for(pipe, jobs))
    assert want.std() > 5 and got.shape == want.shape == (1, 16, 16, 3)
    assert max_pixel_diff(got, want) <= 1


# ----------------------------------------------------------------------------- export


def test_export_loads_in_diffusers_bit_exact(sdxl, converted, tmp_path):
    ref, src = sdxl
    out = str(tmp_path / "exported")
    assert export_tool.main([converted, out]) == 0
    assert sorted(os.listdir(out)) == sorted(SDXL_PARTS + ["model_index.json"])
    for name in COPIED + ["model_index.json"]:
        assert_same_files(os.path.join(out, name), os.path.join(src, name))
    for name in WEIGHTS:
        assert_clean_load(out, name)
    loaded = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
    for name in WEIGHTS:
        assert_bit_exact(state_np(getattr(loaded, name)), state_np(getattr(ref, name)), name)
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = sample(ref, noise)
    assert want.std() > 5 and np.array_equal(sample(loaded, noise), want)


def test_fp16_sharded_variant_round_trip_bit_exact(sdxl, tmp_path):
    """fp16 `.fp16` variant, every component sharded -> float32 fairjax -> fp16 diffusers: same bytes."""
    _, src = sdxl
    half = diffusers.StableDiffusionXLPipeline.from_pretrained(src, torch_dtype=torch.float16)
    src16, fj, out = str(tmp_path / "fp16"), str(tmp_path / "fj"), str(tmp_path / "out")
    half.save_pretrained(src16, variant="fp16", max_shard_size="100KB")
    assert os.path.isfile(os.path.join(src16, "unet", "diffusion_pytorch_model.safetensors.index.fp16.json"))
    assert any(n.startswith("model.fp16") for n in os.listdir(os.path.join(src16, "text_encoder_2")))
    assert convert_tool.main([src16, fj]) == 0
    assert export_tool.main([fj, out, "--dtype", "float16"]) == 0
    for name in WEIGHTS:
        assert_clean_load(out, name, torch_dtype=torch.float16)
    assert read_json(os.path.join(out, "text_encoder_2", "config.json"))["dtype"] == "float16"
    loaded = diffusers.StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.float16)
    for name in WEIGHTS:
        got = state_np(getattr(loaded, name))
        assert {a.dtype for a in got.values()} == {np.dtype(np.float16)}, name
        assert_bit_exact(got, state_np(getattr(half, name)), name)
    # exported as stored (float32 masters): the config's dtype says float32, so transformers (which
    # loads in the config's dtype by default) gets float32, the fp16 values exactly
    out32 = str(tmp_path / "out32")
    assert export_tool.main([fj, out32]) == 0
    te = transformers.CLIPTextModelWithProjection.from_pretrained(out32, subfolder="text_encoder_2")
    want = {k: v.astype(np.float32) for k, v in state_np(half.text_encoder_2).items()}
    assert_bit_exact(state_np(te), want, "text_encoder_2 float32")


def test_merged_lora_equals_diffusers_fuse_lora(sdxl, converted, tmp_path, rel):
    """--lora --merge bakes the LoRA into the UNet as diffusers' load_lora_adapter + fuse_lora does
    (the LoRA-file export is what diffusers loads); the rest of the pipeline is written too."""
    import peft  # noqa: F401
    import jax

    from fairjax import lora as lora_lib
    from fairjax.models import unet as unet_mod

    ref, src = sdxl
    _, params = unet_mod.load(converted)
    targets = [r"attn[12]/to_(q|k|v|out_0)/kernel$", r"down_blocks_1/resnets_0/conv1/kernel$"]
    lora = lora_lib.init(params, targets, rank=2, alpha=3.0, rng=jax.random.key(0))
    rng = np.random.default_rng(1)
    lora = {k: {"a": v["a"], "b": 0.3 * rng.standard_normal(v["b"].shape).astype(np.float32)}
            for k, v in lora.items()}
    lora_path, peft_dir, merged = str(tmp_path / "lora.safetensors"), str(tmp_path / "peft"), str(tmp_path / "merged")
    lora_lib.save(lora_path, lora, alpha=3.0, targets=targets)
    assert export_tool.main([converted, merged, "--lora", lora_path, "--merge"]) == 0
    assert export_tool.main([converted, peft_dir, "--lora", lora_path]) == 0  # the LoRA-file mode

    fused = diffusers.UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    fused.load_lora_adapter(os.path.join(peft_dir, "pytorch_lora_weights.safetensors"), prefix="unet")
    fused.fuse_lora()
    fused.unload_lora()
    loaded, info = load_loading_info(merged, "unet")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    got, want, base = state_np(loaded), state_np(fused), state_np(ref.unet)
    assert set(got) == set(want) == set(base)
    changed = [k for k in base if not np.array_equal(want[k], base[k])]
    assert len(changed) == len(lora)  # every LoRA target, nothing else
    for k in want:
        assert rel(got[k], want[k]) <= 1e-6, k
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler", "model_index.json"):
        assert os.path.exists(os.path.join(merged, name))


# ----------------------------------------------------------------------------- SD 1.x


def test_sd1_pipeline_round_trip_with_skipped_part(tmp_path):
    """A tiny StableDiffusionPipeline (one text encoder, conv proj_in); a safety_checker named in
    model_index.json has no converter: skipped, then exported as [null, null]."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from test_pipeline import TINY_VAE, _clip_config, _jitter, write_bpe_files

    src, fj, out = str(tmp_path / "sd1"), str(tmp_path / "fj"), str(tmp_path / "out")
    vocab, merges = write_bpe_files(str(tmp_path / "bpe"))
    tok = transformers.CLIPTokenizer(vocab, merges, model_max_length=77)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    torch.manual_seed(0)
    unet = _jitter(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32), 1, 0.02)
    pipe = StableDiffusionPipeline(
        vae=_jitter(AutoencoderKL(**TINY_VAE), 2, 0.02),
        text_encoder=_jitter(transformers.CLIPTextModel(_clip_config(len(tok), ids)), 3), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(src)
    index = read_json(os.path.join(src, "model_index.json"))
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    with open(os.path.join(src, "model_index.json"), "w") as f:
        json.dump(index, f)

    assert convert_tool.main([src, fj]) == 0
    info = read_json(os.path.join(fj, "fairjax.json"))
    assert info["not_converted"] == ["safety_checker"] and info["copied"] == ["scheduler", "tokenizer"]
    assert export_tool.main([fj, out]) == 0
    assert read_json(os.path.join(out, "model_index.json"))["safety_checker"] == [None, None]
    for name in ("unet", "vae", "text_encoder"):
        assert_clean_load(out, name)
    loaded = StableDiffusionPipeline.from_pretrained(out)
    for name in ("unet", "vae", "text_encoder"):
        assert_bit_exact(state_np(getattr(loaded, name)), state_np(getattr(pipe, name)), name)
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
    kw = dict(num_inference_steps=1, guidance_scale=5.0, latents=latents, output_type="np")
    want = pipe("a photo of a cat", **kw).images
    assert want.std() > 0.02 and np.array_equal(loaded("a photo of a cat", **kw).images, want)


# ----------------------------------------------------------------------------- bad input


def _fails(tool, argv, capsys, *needles):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def _linked_copy(src: str, dst: str, *, drop=(), real=()):
    """dst with model_index.json copied and every part of src linked, except `drop` (left out) and
    `real` (copied, to be damaged)."""
    os.makedirs(dst)
    for n in os.listdir(src):
        if n in drop:
            continue
        if n in real or not os.path.isdir(os.path.join(src, n)):
            (shutil.copytree if os.path.isdir(os.path.join(src, n)) else shutil.copy)(
                os.path.join(src, n), os.path.join(dst, n))
        else:
            os.symlink(os.path.join(src, n), os.path.join(dst, n))
    return dst


@pytest.mark.parametrize("case,needles", [
    ("no_vae", ["vae", "model_index.json", "no vae/ folder"]),
    ("no_tokenizer_2", ["tokenizer_2", "no tokenizer_2/ folder"]),
    ("no_text_encoder_2_weights", ["text_encoder_2", "model.safetensors"]),
    ("no_scheduler_config", ["scheduler", "scheduler_config.json"]),
])
def test_convert_bad_pipeline_folder(sdxl, tmp_path, capsys, case, needles):
    _, src = sdxl
    bad = str(tmp_path / "bad")
    if case == "no_vae":
        _linked_copy(src, bad, drop={"vae"})
    elif case == "no_tokenizer_2":
        _linked_copy(src, bad, drop={"tokenizer_2"})
    elif case == "no_text_encoder_2_weights":
        _linked_copy(src, bad, real={"text_encoder_2"})
        os.remove(os.path.join(bad, "text_encoder_2", "model.safetensors"))
    else:
        _linked_copy(src, bad, real={"scheduler"})
        os.remove(os.path.join(bad, "scheduler", "scheduler_config.json"))
    out = tmp_path / "out"
    _fails(convert_tool, [bad, str(out)], capsys, *needles)
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no OUT, no temp dir


@pytest.mark.parametrize("case,needles", [
    ("no_vae", ["vae", "params.safetensors"]),
    ("no_tokenizer", ["tokenizer", "no tokenizer/ folder"]),
])
def test_export_bad_model_dir(converted, tmp_path, capsys, case, needles):
    bad = _linked_copy(converted, str(tmp_path / "bad"), drop={case.removeprefix("no_")})
    _fails(export_tool, [bad, str(tmp_path / "out")], capsys, *needles)
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_existing_targets_are_refused(sdxl, converted, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    _fails(convert_tool, [sdxl[1], str(taken)], capsys, "already exists", "--overwrite")
    _fails(export_tool, [converted, str(taken)], capsys, "already exists", "--overwrite")
    assert os.listdir(taken) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["taken"]
