"""UNet conversion tools: diffusers -> fairjax -> diffusers round trips, LoRA export, bad input.

The reference for every check is diffusers itself: what ``from_pretrained`` and
``load_lora_adapter`` / ``load_lora_into_unet`` make of the exported files.
"""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

import torch
import diffusers
import peft  # noqa: F401

from safetensors.torch import load_file as load_torch  # noqa: E402
from test_unet import DictReader, flax_unet, inputs, tiny_sdxl_config, torch_forward, torch_unet  # noqa: E402

from fairjax import lora as lora_lib  # noqa: E402
from fairjax.convert import unet as unet_convert  # noqa: E402
from fairjax.convert.core import convert_checkpoint  # noqa: E402
from fairjax.io.tree import flatten, shapes_of  # noqa: E402
from fairjax.io.model_dir import read_json  # noqa: E402
from fairjax.models import unet as unet_mod  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert_tool = _tool("convert_diffusers")
export_tool = _tool("export_diffusers")

CFG = tiny_sdxl_config(layers_per_block=1)


@pytest.fixture(scope="module")
def torch_model():
    return torch_unet(CFG, seed=11)


@pytest.fixture(scope="module")
def src_fp32(torch_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "unet"
    torch_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def converted(src_fp32, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fj") / "model")
    assert convert_tool.main([src_fp32, out]) == 0
    return out


def assert_bit_exact(got: dict, want: dict):
    """Same keys, dtypes, shapes and bytes (torch tensors)."""
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].contiguous().view(torch.uint8), want[k].contiguous().view(torch.uint8)), k


def exported(out):
    return load_torch(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


# ----------------------------------------------------------------------------- round trips

def test_converted_params_equal_core_conversion(converted, src_fp32, torch_model):
    """The streaming tool writes exactly what the generic core conversion computes."""
    unet, params = unet_mod.load(converted)
    ref = convert_checkpoint(DictReader(torch_model.state_dict()), shapes_of(unet_mod.param_shapes(unet)))
    got, want = flatten(params), flatten(ref)
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    index = read_json(os.path.join(converted, "fairjax.json"))
    assert index["components"] == ["unet"]
    unet2, _ = unet_mod.load(converted, attention_implementation="einsum", remat=True, upcast_attention=True)
    assert unet2.remat and unet2.attention_implementation == "einsum" and unet2.config["upcast_attention"]
    assert read_json(os.path.join(converted, "unet", "config.json")) == read_json(os.path.join(src_fp32, "config.json"))


def test_round_trip_fp32_bit_exact(converted, torch_model, tmp_path):
    out = str(tmp_path / "exported")
    assert export_tool.main([converted, out]) == 0
    loaded, info = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_bit_exact(loaded.state_dict(), torch_model.state_dict())
    assert_bit_exact(exported(out), torch_model.state_dict())


@pytest.mark.parametrize("dtype,variant,shard", [("float16", "fp16", "100KB"), ("bfloat16", "bf16", None)])
def test_round_trip_half_precision_variants_bit_exact(dtype, variant, shard, tmp_path):
    """fp16 (`.fp16` variant, sharded with an index) and bf16 (`.bf16`, one file) -> float32 fairjax ->
    the same dtype in diffusers: identical bytes."""
    half = torch_unet(CFG, seed=11).to(getattr(torch, dtype))
    src = tmp_path / "unet"
    half.save_pretrained(src, variant=variant, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert os.path.isfile(src / f"diffusion_pytorch_model.safetensors.index.{variant}.json")  # diffusers' name
    model_dir, out = str(tmp_path / "fj"), str(tmp_path / "pt")
    assert convert_tool.main([str(src), model_dir]) == 0
    assert export_tool.main([model_dir, out, "--dtype", dtype]) == 0
    assert_bit_exact(exported(out), half.state_dict())


def test_pipeline_folder_converts_registered_components(src_fp32, tmp_path, capsys):
    """A model_index.json folder: the unet is converted, a part with no converter is listed as skipped."""
    pipe = tmp_path / "pipe"
    shutil.copytree(src_fp32, pipe / "unet")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "image_encoder": [None, None]}))
    out = tmp_path / "fj"
    assert convert_tool.main([str(pipe), str(out)]) == 0
    assert "skipped: safety_checker" in capsys.readouterr().out
    assert "unet" in os.listdir(out) and "safety_checker" not in os.listdir(out)
    index = read_json(str(out / "fairjax.json"))
    assert index["components"] == ["unet"] and index["not_converted"] == ["safety_checker"]
    unet_mod.load(str(out))  # the unet component loads with every key and shape checked


# ----------------------------------------------------------------------------- LoRA

@pytest.fixture(scope="module")
def lora_file(converted, tmp_path_factory):
    """A random LoRA (rank 4, alpha 3) on attention projections, a Dense proj_in and two convs."""
    _, params = unet_mod.load(converted)
    targets = [r"attn[12]/to_(q|k|v|out_0)/kernel$", r"proj_in/kernel$", r"down_blocks_1/resnets_0/conv1/kernel$",
               r"conv_in/kernel$"]
    lora = lora_lib.init(params, targets, rank=4, alpha=3.0, rng=jax.random.key(0))
    rng = np.random.default_rng(1)
    lora = {k: {"a": v["a"], "b": 0.3 * rng.standard_normal(v["b"].shape).astype(np.float32)}
            for k, v in lora.items()}
    path = str(tmp_path_factory.mktemp("lora") / "lora.safetensors")
    lora_lib.save(path, lora, alpha=3.0, targets=targets)
    return path, lora, params


def _with_adapter(model_seed, state, prefix):
    model = torch_unet(CFG, seed=model_seed)
    if prefix == "pipeline":
        sd, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(state)
        diffusers.StableDiffusionXLPipeline.load_lora_into_unet(sd, network_alphas=alphas, unet=model,
                                                               adapter_name="fair")
    else:
        model.load_lora_adapter(state, prefix=None, adapter_name="fair")
    return model.eval()


def test_lora_export_matches_flax_merge(converted, lora_file, tmp_path, rel):
    path, lora, params = lora_file
    out = str(tmp_path / "lora_pt")
    assert export_tool.main([converted, out, "--lora", path]) == 0
    file = os.path.join(out, "pytorch_lora_weights.safetensors")
    sd = load_torch(file)
    assert all(k.startswith("unet.") and ".lora_" in k for k in sd)
    conv_a = sd["unet.down_blocks.1.resnets.0.conv1.lora_A.weight"]
    assert tuple(conv_a.shape[:2]) == (4, 16) and tuple(sd["unet.conv_in.lora_B.weight"].shape) == (16, 4, 1, 1)
    # through the pipeline loader (what pipe.load_lora_weights does for the unet)
    with_lora = _with_adapter(11, dict(sd), "pipeline")
    sample, context, added = inputs(CFG, 2, (8, 16), seed=4)
    t = np.array([30.0, 700.0], np.float32)
    want = torch_forward(with_lora, sample, t, context, added)
    base = torch_forward(torch_unet(CFG, seed=11), sample, t, context, added)
    unet, _ = flax_unet(CFG, torch_unet(CFG, seed=11))
    merged = lora_lib.merge(params, lora, alpha=3.0)
    got = jax.jit(unet.apply)({"params": merged}, sample, t, context, added)
    assert rel(base, want) > 1e-2  # the LoRA matters
    assert rel(got, want) <= 1e-5
    # bare keys, loaded with prefix=None, do the same
    bare = str(tmp_path / "bare.safetensors")
    assert export_tool.main([converted, bare, "--lora", path, "--lora-prefix", "none"]) == 0
    sd_bare = load_torch(bare)
    assert set(sd_bare) == {k.removeprefix("unet.") for k in sd}
    assert rel(torch_forward(_with_adapter(11, sd_bare, "bare"), sample, t, context, added), want) <= 1e-6
    # --merge writes the merged weights
    merged_dir = str(tmp_path / "merged")
    assert export_tool.main([converted, merged_dir, "--lora", path, "--merge"]) == 0
    m = diffusers.UNet2DConditionModel.from_pretrained(merged_dir, subfolder="unet").eval()
    assert rel(torch_forward(m, sample, t, context, added), want) <= 1e-5


# ----------------------------------------------------------------------------- bad input

def _fails(tool, argv, capsys, *needles):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for n in needles:
        assert n in err, err
    return err


def test_truncated_safetensors(src_fp32, tmp_path, capsys):
    src = tmp_path / "unet"
    shutil.copytree(src_fp32, src)
    f = src / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _fails(convert_tool, [str(src), str(out)], capsys, "truncated", "diffusion_pytorch_model.safetensors")
    assert not out.exists() and os.listdir(tmp_path) == ["unet"]


def test_missing_shard(tmp_path, capsys):
    src = tmp_path / "unet"
    torch_unet(CFG, seed=11).save_pretrained(src, max_shard_size="100KB")
    index = json.loads((src / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(src / shard)
    out = tmp_path / "out"
    _fails(convert_tool, [str(src), str(out)], capsys, shard)
    assert not out.exists()


def test_config_channel_count_disagrees_with_weights(src_fp32, tmp_path, capsys):
    src = tmp_path / "unet"
    shutil.copytree(src_fp32, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32, 48]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _fails(convert_tool, [str(src), str(out)], capsys, "shape mismatch", "down_blocks.2")
    assert not out.exists()


def test_non_unet_folders(tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    # a single VAE folder converts (fairjax.convert.pipeline.CLASS_TO_COMPONENT) when it has weights
    _fails(convert_tool, [str(vae), str(tmp_path / "o1")], capsys, "diffusion_pytorch_model.safetensors", "config.json")
    (vae / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    _fails(convert_tool, [str(vae), str(tmp_path / "o1")], capsys, "ControlNetModel", "UNet2DConditionModel")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(convert_tool, [str(empty), str(tmp_path / "o2")], capsys, "config.json")
    _fails(export_tool, [str(empty), str(tmp_path / "o3")], capsys, "no exportable fairjax component")
    assert sorted(os.listdir(tmp_path)) == ["empty", "vae"]


def test_existing_targets_are_refused(converted, src_fp32, lora_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(export_tool, [converted, str(out)], capsys, "already exists", "--overwrite")
    _fails(convert_tool, [src_fp32, str(out)], capsys, "already exists")
    taken = tmp_path / "taken.safetensors"
    taken.write_text("x")
    _fails(export_tool, [converted, str(taken), "--lora", lora_file[0]], capsys, "already exists")
    assert (out / "keep.txt").read_text() == "mine" and taken.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["taken", "taken.safetensors"]
    assert export_tool.main([converted, str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["unet"]


def test_blocked_transposes_equal_core_layout_rules():
    from fairjax.convert.core import flax_to_torch_array, torch_to_flax_array

    rng = np.random.default_rng(0)
    for shape in [(130, 70), (67, 33, 3, 3), (200, 9, 1, 1), (77,)]:
        a = rng.standard_normal(shape).astype(np.float16)
        for leaf in ("kernel", "bias"):
            want = np.ascontiguousarray(torch_to_flax_array(a, leaf)).astype(np.float32)
            got = unet_convert.to_flax_array(a, leaf, np.float32)
            assert got.flags.c_contiguous and got.dtype == np.float32 and np.array_equal(got, want)
            back = unet_convert.to_torch_array(got, leaf, np.float16)
            assert np.array_equal(back, np.ascontiguousarray(flax_to_torch_array(want, leaf)).astype(np.float16))
            assert np.array_equal(back, a)


def test_traced_shapes_are_kept_on_disk(torch_model, tmp_path, monkeypatch):
    """The UNet's param shapes are traced once and kept under the cache root: a later process reads them instead
    of tracing (the trace is most of a cold SDXL conversion). They equal the shapes the torch model's state dict
    implies; a corrupt file is traced again and rewritten; an unwritable cache only costs the trace."""
    from fairjax.models import unet as unet_model

    want = unet_convert.implied_shapes({k: tuple(v.shape) for k, v in torch_model.state_dict().items()})
    cfg = dict(torch_model.config)
    monkeypatch.setenv("FAIRJAX_CACHE_DIR", str(tmp_path / "cache"))
    unet_model._config_shapes.cache_clear()
    assert unet_model.config_shapes(cfg) == want
    (stored,) = list((tmp_path / "cache" / unet_model.SHAPES_DIR).iterdir())

    def no_trace(*a, **k):
        raise AssertionError("traced although the shapes are on disk")

    unet_model._config_shapes.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(unet_model, "param_shapes", no_trace)
        assert unet_model.config_shapes(cfg) == want  # as a new process would: read, not traced

    stored.write_text('{"conv_in/kernel": [3, 3')  # truncated
    unet_model._config_shapes.cache_clear()
    assert unet_model.config_shapes(cfg) == want
    assert json.loads(stored.read_text()) == {"/".join(k): list(v) for k, v in want.items()}

    monkeypatch.setenv("FAIRJAX_CACHE_DIR", str(stored))  # a file where the cache folder should be: not writable
    unet_model._config_shapes.cache_clear()
    assert unet_model.config_shapes(cfg) == want
    unet_model._config_shapes.cache_clear()
