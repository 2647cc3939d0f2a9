"""SDXL VAE (AutoencoderKL): parity with diffusers on random tiny configs, full-size shapes, conversion."""

import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers

from _torch_util import randomize_  # noqa: E402
from fairjax.convert import vae as vae_convert  # noqa: E402
from fairjax.io.tree import flatten  # noqa: E402
from fairjax.convert.core import flax_to_torch_key, plan_conversion  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.io.safetensors import write_safetensors  # noqa: E402
from fairjax.models import vae  # noqa: E402

TINY = dict(in_channels=3, out_channels=3, block_out_channels=[8, 16, 16], layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.13025)
# a second shape of the family: two resnets per block, no quant convs, no mid attention, shift_factor
TINY_B = dict(TINY, block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=2, use_quant_conv=False,
              use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.1, scaling_factor=0.3)


def encode_decode(model, params, x, z):
    """One jitted program (cheaper on CPU than op-by-op dispatch)."""
    f = jax.jit(lambda p, x, z: (model.apply({"params": p}, x, method=model.encode),
                                 model.apply({"params": p}, z, method=model.decode)))
    return f(params, x, z)


def torch_vae(cfg, seed, tmp_path, name="vae"):
    tm = randomize_(diffusers.AutoencoderKL(**cfg), seed)
    folder = os.path.join(tmp_path, name)
    tm.save_pretrained(folder)
    return tm, folder


@pytest.mark.parametrize("cfg", [TINY, TINY_B], ids=["attn_quant", "no_attn_no_quant"])
def test_encode_decode_parity_with_diffusers(tmp_path, rel, cfg, winograd_everywhere):
    tm, folder = torch_vae(cfg, seed=0, tmp_path=tmp_path)
    config, params = vae_convert.convert_vae(folder)
    model = vae.from_config(config)
    f = vae.downsample_factor(model.config)
    x = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 5 * f, 7 * f)).astype(np.float32)  # batch 2, not square
    z = np.random.default_rng(2).normal(size=(2, 4, 5, 7)).astype(np.float32)
    with torch.no_grad():
        dist = tm.encode(torch.from_numpy(x)).latent_dist
        ref_img = tm.decode(torch.from_numpy(z)).sample.numpy()
    (mean, logvar), img = encode_decode(model, params, x, z)
    assert mean.shape == logvar.shape == (2, 4, 5, 7)
    assert rel(mean, dist.mean.numpy()) < 1e-5
    assert rel(logvar, dist.logvar.numpy()) < 1e-5
    assert img.shape == x.shape
    assert rel(img, ref_img) < 1e-5


def test_reconstruction_under_jit_matches_diffusers(tmp_path, rel):
    tm, folder = torch_vae(TINY, seed=3, tmp_path=tmp_path)
    config, params = vae_convert.convert_vae(folder)
    model = vae.from_config(config)
    x = np.random.default_rng(4).uniform(-1, 1, size=(2, 3, 16, 24)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), sample_posterior=False).sample.numpy()
    out = jax.jit(lambda p, a: model.apply({"params": p}, a))(params, x)
    assert rel(out, ref) < 1e-5


def test_posterior_sample_statistics():
    """z = mean + exp(logvar/2) * N(0,1): the empirical moments of many draws match the posterior's."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(5)
    moments = np.concatenate([rng.normal(size=(1, 2, 3, 3)), rng.uniform(-3, 1, size=(1, 2, 3, 3))], axis=1)
    ref = DiagonalGaussianDistribution(torch.from_numpy(moments.astype(np.float32)))
    mean, logvar, std = (t.numpy()[0] for t in (ref.mean, ref.logvar, ref.std))
    n = 4000
    draws = np.asarray(vae.sample_latent(jnp.broadcast_to(mean, (n,) + mean.shape),
                                         jnp.broadcast_to(logvar, (n,) + mean.shape), jax.random.key(0)))
    assert np.abs(draws.mean(0) - mean).max() < 5 * std.max() / np.sqrt(n)
    assert np.abs(draws.std(0) / std - 1).max() < 0.1
    assert not np.allclose(draws[0], draws[1])


def test_latent_scaling_follows_the_config():
    """SDXL pipeline: decode(latents / scaling_factor); with latents_mean/std: latents * std / sf + mean."""
    z = np.random.default_rng(6).normal(size=(2, 4, 3, 5)).astype(np.float32)
    sdxl = vae.VAEConfig.from_dict(SDXL_VAE)
    assert sdxl.scaling_factor == 0.13025
    np.testing.assert_allclose(vae.unscale_latents(z, sdxl), z / 0.13025, rtol=1e-6)
    np.testing.assert_allclose(vae.scale_latents(vae.unscale_latents(z, sdxl), sdxl), z, rtol=1e-5, atol=1e-6)
    stats = vae.VAEConfig.from_dict(dict(SDXL_VAE, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1, 2, 3, 4]))
    want = z * np.array([1, 2, 3, 4.0]).reshape(1, 4, 1, 1) / 0.13025 + np.array([.1, .2, .3, .4]).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(vae.unscale_latents(z, stats), want, rtol=1e-5)
    shift = vae.VAEConfig.from_dict(dict(SDXL_VAE, shift_factor=0.0609, scaling_factor=1.5305))
    np.testing.assert_allclose(vae.unscale_latents(z, shift), z / 1.5305 + 0.0609, rtol=1e-5)


def test_export_loads_in_diffusers_bit_exact(tmp_path):
    tm, folder = torch_vae(TINY, seed=7, tmp_path=tmp_path)
    config, params = vae_convert.convert_vae(folder)
    out = os.path.join(tmp_path, "exported")
    vae_convert.export_vae(out, config, params)
    back, info = diffusers.AutoencoderKL.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_sd, new_sd = tm.state_dict(), back.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    assert all(torch.equal(ref_sd[k], new_sd[k]) for k in ref_sd)
    _, params2 = vae_convert.convert_vae(out)
    a, b = flatten(params), flatten(params2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_legacy_attention_names_convert(tmp_path):
    """query/key/value/proj_attn (old VAE checkpoints) land where diffusers puts them."""
    tm, folder = torch_vae(TINY, seed=8, tmp_path=tmp_path)
    _, p_new = vae_convert.convert_vae(folder)
    legacy = os.path.join(tmp_path, "legacy")
    os.makedirs(legacy)
    inverse = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    items = {}
    for k, v in tm.state_dict().items():
        for new, old in inverse.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        items[k] = v.numpy()
    assert any(".query." in k for k in items) and any(".proj_attn." in k for k in items)
    write_safetensors(os.path.join(legacy, "diffusion_pytorch_model.safetensors"), items, {"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f, open(os.path.join(legacy, "config.json"), "w") as g:
        g.write(f.read())
    _, p_old = vae_convert.convert_vae(legacy)
    a, b = flatten(p_new), flatten(p_old)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # and diffusers itself reads the legacy file to the same weights
    back = diffusers.AutoencoderKL.from_pretrained(legacy)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in tm.state_dict().items())


# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_full_size_shapes_match_diffusers():
    kw = {k: v for k, v in SDXL_VAE.items() if not k.startswith("_")}
    with torch.device("meta"):
        tm = diffusers.AutoencoderKL(**kw)
    torch_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    flax_shapes = vae.param_shapes(vae.from_config(SDXL_VAE))
    plan_conversion(torch_shapes, flax_shapes)  # raises on any missing / unexpected / mismatched key
    assert {flax_to_torch_key(p, vae_convert.LITERAL) for p in flax_shapes} == set(torch_shapes)
    assert any("mid_block.attentions.0.to_out.0" in k for k in torch_shapes)
    n_torch = sum(int(np.prod(s)) for s in torch_shapes.values())
    n_flax = sum(int(np.prod(s)) for s in flax_shapes.values())
    assert n_torch == n_flax == 83_653_863


def test_defaults_are_diffusers_defaults():
    sig = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    ours = vae.VAEConfig(scaling_factor=1.0)
    for f in ("in_channels", "out_channels", "layers_per_block", "act_fn", "latent_channels", "norm_num_groups",
              "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv",
              "use_post_quant_conv", "mid_block_add_attention"):
        assert getattr(ours, f) == sig[f].default, f
    for f in ("down_block_types", "up_block_types", "block_out_channels"):
        assert getattr(ours, f) == tuple(sig[f].default), f


def test_bad_configs_are_one_line_errors():
    cases = [
        (dict(SDXL_VAE, scaling_factor=None), "scaling_factor is missing"),
        ({k: v for k, v in SDXL_VAE.items() if k != "scaling_factor"}, "scaling_factor is missing"),
        (dict(SDXL_VAE, down_block_types=["AttnDownEncoderBlock2D"] * 4), "down_block_types contains"),
        (dict(SDXL_VAE, up_block_types=["UpDecoderBlock2D"] * 3), "up_block_types has 3 entries"),
        (dict(SDXL_VAE, act_fn="tanh"), "act_fn.*'tanh'"),
        (dict(SDXL_VAE, _class_name="AutoencoderKLTemporalDecoder"), "_class_name"),
        (dict(SDXL_VAE, norm_num_groups=48), "not divisible by norm_num_groups"),
    ]
    for cfg, msg in cases:
        with pytest.raises(CheckpointError, match=msg) as e:
            vae.from_config(cfg)
        assert "\n" not in str(e.value)


def test_missing_weights_file_is_one_line_error(tmp_path):
    folder = os.path.join(tmp_path, "vae")
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY, f)
    with pytest.raises(CheckpointError, match=r"no diffusion_pytorch_model\.safetensors") as e:
        vae_convert.convert_vae(folder)
    assert "\n" not in str(e.value) and folder in str(e.value)
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        vae_convert.convert_vae(os.path.join(tmp_path, "nowhere"))


def test_load_from_model_dir(tmp_path, rel):
    from fairjax.io.model_dir import save_component

    tm, folder = torch_vae(TINY, seed=9, tmp_path=tmp_path)
    config, params = vae_convert.convert_vae(folder)
    save_component(os.path.join(tmp_path, "model", "vae"), config, params)
    model, loaded = vae.load(os.path.join(tmp_path, "model"))
    assert model.dtype == jnp.float32 and model.config.scaling_factor == 0.13025
    z = np.random.default_rng(10).normal(size=(1, 4, 3, 4)).astype(np.float32)
    with torch.no_grad():
        ref = tm.decode(torch.from_numpy(z)).sample.numpy()
    out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(loaded, z)
    assert rel(out, ref) < 1e-5
