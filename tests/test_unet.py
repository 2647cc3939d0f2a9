"""Flax UNet2DConditionModel: parity with diffusers on random tiny UNets, full-size shapes, config checks.

Every number compared here comes from diffusers' PyTorch UNet run on the same
random weights (float32).
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers

from _torch_util import SDXL_UNET_CONFIG, DictReader, randomize_  # noqa: E402
from fairjax.convert import unet as unet_convert  # noqa: E402
from fairjax.convert.core import convert_checkpoint  # noqa: E402
from fairjax.io.tree import flatten, shapes_of  # noqa: E402
from fairjax.models import unet as unet_mod  # noqa: E402
from fairjax.errors import ConfigError  # noqa: E402
from fairjax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

SDXL_CONFIG = SDXL_UNET_CONFIG  # the real SDXL base 1.0 unet/config.json
SDXL_PARAMS, SDXL_ARRAYS = 2_567_463_684, 1_680


def tiny_sdxl_config(**kw):
    """SDXL-shaped: 3 blocks, transformer layers (1, 2, 3), per-block heads, text_time, linear projection."""
    cfg = {
        "_class_name": "UNet2DConditionModel", "block_out_channels": [16, 32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 3], "attention_head_dim": [1, 2, 4], "layers_per_block": 2,
        "cross_attention_dim": 24, "norm_num_groups": 8, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 20 + 6 * 8, "sample_size": 16,
    }
    cfg.update(kw)
    return cfg


def tiny_sd15_config(**kw):
    """SD1.5-shaped: 4 blocks, conv proj_in/proj_out, one int attention_head_dim, no added embedding."""
    cfg = {
        "_class_name": "UNet2DConditionModel", "block_out_channels": [16, 32, 32, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 4, "layers_per_block": 1, "cross_attention_dim": 20, "norm_num_groups": 8,
        "sample_size": 16,
    }
    cfg.update(kw)
    return cfg


def torch_unet(cfg, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    return randomize_(model, seed)


def flax_unet(cfg, torch_model, **kw):
    unet = UNet2DConditionModel.from_config(cfg, **kw)
    params = convert_checkpoint(DictReader(torch_model.state_dict()), shapes_of(unet_mod.param_shapes(unet)),
                                ignore=unet_convert.IGNORE)
    return unet, params


def inputs(cfg, batch, hw, seq=7, seed=0):
    rng = np.random.default_rng(seed)
    c = UNetConfig.from_dict(cfg)
    sample = rng.standard_normal((batch, c["in_channels"], *hw)).astype(np.float32)
    context = rng.standard_normal((batch, seq, c.cross_attention_dim)).astype(np.float32)
    added = None
    if c["addition_embed_type"] == "text_time":
        n_text = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((batch, n_text)).astype(np.float32),
                 "time_ids": np.tile(np.array([[hw[0] * 8, hw[1] * 8, 0, 0, hw[0] * 8, hw[1] * 8]], np.float32),
                                     (batch, 1)) + rng.integers(0, 64, (batch, 6)).astype(np.float32)}
    return sample, context, added


def torch_forward(model, sample, t, context, added):
    with torch.no_grad():
        kw = {}
        if added is not None:
            kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
        tt = torch.tensor(t) if np.ndim(t) else t
        return model(torch.from_numpy(sample), tt, torch.from_numpy(context), **kw).sample.numpy()


def check_parity(cfg, rel, hw, timesteps, seed=0, tol=1e-5, scan_layers=False, **module_kw):
    """diffusers = Flax; with ``scan_layers`` also the scanned model on the stacked params (and = unrolled)."""
    model = torch_unet(cfg, seed)
    unet, params = flax_unet(cfg, model, **module_kw)
    apply = jax.jit(unet.apply)
    scanned = jax.jit(unet.clone(scan_layers=True).apply)
    for i, t in enumerate(timesteps):
        sample, context, added = inputs(cfg, 2, hw, seed=seed + i)
        want = torch_forward(model, sample, t, context, added)
        got = np.asarray(apply({"params": params}, sample, np.asarray(t, np.float32), context, added))
        assert got.shape == want.shape
        assert rel(got, want) <= tol, (t, rel(got, want))
        if scan_layers:
            out = scanned({"params": unet_mod.stack_params(params)}, sample, np.asarray(t, np.float32), context, added)
            assert rel(out, want) <= tol and rel(out, got) <= tol, (t, rel(out, want), rel(out, got))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_sdxl_shaped_parity(rel, scan_layers, winograd_everywhere):
    check_parity(tiny_sdxl_config(), rel, (16, 24), [np.array([0.0, 999.0]), np.array([251.0, 637.5])],
                 scan_layers=scan_layers)


def test_sd15_shaped_parity(rel):
    """Also: a scalar timestep (broadcast to the batch) and the explicit 'xla' attention path."""
    check_parity(tiny_sd15_config(), rel, (16, 24), [77, 999], attention_implementation="xla")


def test_sd_odd_latent_size_parity(rel, winograd_everywhere):
    """Latents not a multiple of 2**num_upsamplers: diffusers forwards the skip sizes to the upsamplers.
    Also upcast_attention, only_cross_attention, the 'einsum' attention path and Winograd convolutions on
    odd sizes."""
    cfg = tiny_sd15_config(upcast_attention=True, only_cross_attention=[True, False, False, False])
    check_parity(cfg, rel, (13, 22), [np.array([3.0, 801.0])], seed=3, attention_implementation="einsum")


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_gradients_match_torch_with_remat(rel, scan_layers, winograd_everywhere):
    """d sum(out * w) / d (sample, every param): Flax (jax.grad through nn.remat blocks; with scan_layers
    the 3-layer transformer stacks under nn.scan with the remat policy per layer, on the stacked params)
    vs PyTorch autograd on the same weights. Two blocks (DownBlock2D, CrossAttnDownBlock2D): the least
    compile time that still has every block kind and the text_time embedding."""
    cfg = tiny_sdxl_config(layers_per_block=1, block_out_channels=[16, 32], attention_head_dim=[1, 2],
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 3])
    model = torch_unet(cfg, 2)
    unet, params = flax_unet(cfg, model, remat=True)
    sample, context, added = inputs(cfg, 2, (8, 8), seed=9)
    t = np.array([400.0, 20.0], np.float32)
    w = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(sample).requires_grad_(True)
    out = model(x, torch.from_numpy(t), torch.from_numpy(context),
                added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
    (out * torch.from_numpy(w)).sum().backward()
    want = flatten(convert_checkpoint(DictReader({k: p.grad.numpy() for k, p in model.named_parameters()}),
                                      shapes_of(unet_mod.param_shapes(unet))))
    if scan_layers:
        unet, params = unet.clone(scan_layers=True, remat="dots_saveable"), unet_mod.stack_params(params)
    fwd = lambda s, p: jnp.sum(unet.apply({"params": p}, s, t, context, added) * w)  # noqa: E731
    g_sample, g_params = jax.jit(jax.grad(fwd, argnums=(0, 1)))(sample, params)
    assert rel(g_sample, x.grad.numpy()) <= 1e-5
    got = flatten(unet_mod.unstack_params(g_params))
    assert set(got) == set(want)
    keys = sorted(want)  # all params as one vector (a single kernel's float32 noise reaches ~1.1e-5 of its max)
    vec = lambda t: np.concatenate([np.ravel(t[k]) for k in keys])  # noqa: E731
    assert rel(vec(got), vec(want)) <= 1e-5
    for k in keys:
        assert rel(got[k], want[k]) <= 5e-5, (k, rel(got[k], want[k]))


# ----------------------------------------------------------------------------- config

def test_defaults_are_diffusers_defaults():
    sig = inspect.signature(diffusers.UNet2DConditionModel.__init__)
    theirs = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    assert set(theirs) == set(unet_mod.DEFAULTS)
    for k, v in theirs.items():
        assert unet_mod._tuple(v) == unet_mod.DEFAULTS[k], k


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 512),
    ("num_attention_heads", 8),
    ("dropout", 0.1),
])
def test_unsupported_config_values_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        UNet2DConditionModel.from_config(tiny_sdxl_config(**{key: value}))


def test_unknown_key_and_wrong_class_are_refused():
    with pytest.raises(ConfigError, match="latent_channels"):
        UNetConfig.from_dict(tiny_sdxl_config(latent_channels=4))
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        UNetConfig.from_dict({"_class_name": "AutoencoderKL"})


def test_text_time_needs_added_cond_kwargs():
    cfg = tiny_sdxl_config()
    unet = UNet2DConditionModel.from_config(cfg)
    sample, context, _ = inputs(cfg, 1, (8, 8))
    with pytest.raises(ValueError, match="time_ids"):
        unet.init(jax.random.key(0), sample, 1.0, context, {"text_embeds": np.zeros((1, 20), np.float32)})


# ----------------------------------------------------------------------------- full size, no weights

def torch_meta_shapes(cfg):
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_sdxl_shapes():
    """SDXL on torch's meta device vs jax.eval_shape: every key maps, both ways, 2,567,463,684 params."""
    torch_shapes = torch_meta_shapes(SDXL_CONFIG)
    flax_shapes = unet_convert.target_shapes(SDXL_CONFIG)
    mapping = unet_convert.plan(torch_shapes, flax_shapes)  # raises on any missing/unexpected/mismatched key
    assert len(mapping) == len(flax_shapes) == len(torch_shapes) == SDXL_ARRAYS
    assert sum(math.prod(s) for s in flax_shapes.values()) == SDXL_PARAMS
    assert sum(math.prod(s) for s in torch_shapes.values()) == SDXL_PARAMS
    # export names invert the import mapping exactly (add_embedding.linear_1 stays linear_1)
    assert {unet_convert.torch_key(p) for p in flax_shapes} == set(torch_shapes)
    assert "add_embedding.linear_1.weight" in torch_shapes


def test_full_size_sd15_shapes():
    cfg = {"_class_name": "UNet2DConditionModel", "attention_head_dim": 8, "cross_attention_dim": 768,
           "block_out_channels": [320, 640, 1280, 1280], "sample_size": 64}
    torch_shapes = torch_meta_shapes(cfg)
    flax_shapes = unet_convert.target_shapes(cfg)
    unet_convert.plan(torch_shapes, flax_shapes)
    assert {unet_convert.torch_key(p) for p in flax_shapes} == set(torch_shapes)
    assert sum(math.prod(s) for s in flax_shapes.values()) == 859_520_964  # SD 1.5 UNet
