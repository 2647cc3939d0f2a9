"""LoRA export for the tools people load LoRAs into: ``tools/export_diffusers.py MODEL OUT --lora F --format
{peft,kohya}``. diffusers' ``load_lora_weights`` loads both files and fuses them into the same UNet weights, and
that fused UNet is the one ``--merge`` exports (fairjax's merged params)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import torch  # noqa: F401

from fairjax import lora as lora_lib  # noqa: E402
from fairjax.io.safetensors import SafetensorsReader  # noqa: E402
from test_pipeline import build_tiny_sdxl, convert_tiny_sdxl  # noqa: E402
from test_resolve import MICRO_UNET, MICRO_VAE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


export_tool = _tool("export_diffusers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A micro SDXL pipeline (diffusers), its fairjax conversion, a rank-2 LoRA (alpha 3) on every UNet kernel,
    and the three exports: PEFT file, kohya file, merged pipeline folder."""
    from fairjax.io.model_dir import component_dir, load_params
    from fairjax.io.tree import flatten, path_str

    root = tmp_path_factory.mktemp("lora_export")
    src = str(root / "diffusers")
    build_tiny_sdxl(src, unet=MICRO_UNET, vae=MICRO_VAE, text_hidden=8, text_layers=2)
    model = convert_tiny_sdxl(src, str(root / "fairjax"))
    params = load_params(os.path.join(component_dir(model, "unet"), "params.safetensors"))
    kernels = {path_str(p): v.shape for p, v in flatten(params).items() if p[-1] == "kernel"}
    rng = np.random.default_rng(0)
    entries = {k: {"a": (0.2 * rng.standard_normal((int(np.prod(s[:-1])), 2))).astype(np.float32),
                   "b": (0.2 * rng.standard_normal((2, s[-1]))).astype(np.float32)} for k, s in kernels.items()}
    lora_file = str(root / "lora.safetensors")
    lora_lib.save(lora_file, entries, alpha=3.0)
    out = {"src": src, "model": model, "lora": entries, "kernels": kernels}
    for name, extra in (("peft", []), ("kohya", ["--format", "kohya"])):
        out[name] = str(root / f"{name}.safetensors")
        assert export_tool.main([model, out[name], "--lora", lora_file, *extra]) == 0
    out["merged"] = str(root / "merged")
    assert export_tool.main([model, out["merged"], "--lora", lora_file, "--merge"]) == 0
    return out


def test_kohya_keys_and_alpha(exported):
    with SafetensorsReader(exported["kohya"]) as r:
        keys = set(r.keys())
        assert len(keys) == 3 * len(exported["lora"])
        stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys
        assert r.shape(f"{stem}.lora_down.weight") == (2, 16) and r.shape(f"{stem}.lora_up.weight") == (16, 2)
        assert float(r[f"{stem}.alpha"]) == 3.0
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert r.shape(f"{conv}.lora_down.weight") == (2, 8, 3, 3) and r.shape(f"{conv}.lora_up.weight") == (8, 2, 1, 1)
        assert "lora_unet_label_emb_0_0.lora_down.weight" in keys  # add_embedding.linear_1, by its SGM name
        assert r.metadata["ss_network_dim"] == "2" and r.metadata["ss_network_alpha"] == "3"


def _fused_unet(src: str, lora_file: str) -> dict:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(src)
    pipe.load_lora_weights(lora_file)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.detach().numpy().copy() for k, v in pipe.unet.state_dict().items()}


def test_diffusers_fuses_both_formats_to_fairjax_merged_params(exported, rel):
    from diffusers import UNet2DConditionModel

    base = {k: v.numpy() for k, v in UNet2DConditionModel.from_pretrained(exported["src"], subfolder="unet")
            .state_dict().items()}
    peft = _fused_unet(exported["src"], exported["peft"])
    kohya = _fused_unet(exported["src"], exported["kohya"])
    merged = {k: v.numpy() for k, v in UNet2DConditionModel.from_pretrained(exported["merged"], subfolder="unet")
              .state_dict().items()}
    assert set(peft) == set(kohya) == set(merged) == set(base)
    from fairjax.convert.unet import torch_key

    changed = {torch_key(tuple(k.split("/"))) for k in exported["lora"]}
    assert len(changed) == len(exported["kernels"])
    for k in base:
        assert rel(kohya[k], peft[k]) <= 1e-6, k
        assert rel(peft[k], merged[k]) <= 1e-6, k
        moved = np.abs(peft[k] - base[k]).max() / np.abs(base[k]).max()
        assert (moved > 1e-3) == (k in changed), k  # every LoRA module moved, nothing else


def test_kohya_format_errors_are_one_line(exported, tmp_path, capsys):
    assert export_tool.main([exported["model"], str(tmp_path / "x"), "--format", "kohya"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format kohya is for a LoRA file" in err[0]
    assert not (tmp_path / "x").exists()
