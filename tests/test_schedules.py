"""DDPM training schedule vs diffusers' DDPMScheduler (the reference numbers come from diffusers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from fairjax.diffusion import schedules as S

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

CONFIGS = {
    "sdxl": SDXL_SCHEDULER,
    "linear": {"beta_schedule": "linear", "num_train_timesteps": 1000},
    "cosine_v": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    "zero_snr_v": dict(SDXL_SCHEDULER, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "short": {"beta_schedule": "scaled_linear", "beta_start": 0.001, "beta_end": 0.02, "num_train_timesteps": 100},
    "trained": {"trained_betas": list(np.linspace(1e-4, 0.03, 50)), "num_train_timesteps": 50},
}


# torch's CPU sqrt is not correctly rounded (about 1 in 5 float32 inputs come out 1 ulp off on
# this machine) and the zero-SNR rescale subtracts nearly equal numbers near t = T, which turns
# that ulp into ~1e-5; every other schedule agrees to float32 rounding.
TOL = {"zero_snr_v": 1e-4}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_diffusers(name, rel):
    cfg = CONFIGS[name]
    tol = TOL.get(name, 1e-6)
    ref = DDPMScheduler.from_config(cfg)
    ours = S.ddpm_schedule(cfg)
    assert ours.num_train_timesteps == ref.config.num_train_timesteps
    assert ours.prediction_type == ref.config.prediction_type
    assert ours.betas.dtype == jnp.float32 and ours.alphas_cumprod.dtype == jnp.float32
    assert rel(ours.betas, ref.betas.numpy()) <= tol
    # relative error per entry: alphabar spans many decades near t = T
    a, b = np.asarray(ours.alphas_cumprod, np.float64), ref.alphas_cumprod.numpy().astype(np.float64)
    assert np.max(np.abs(a - b) / np.maximum(b, 1e-30)) <= 2 * tol


def test_sdxl_schedule_from_euler_class_too(rel):
    # The SDXL training scripts read the Euler config into DDPMScheduler; Euler builds the same table.
    ref = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    assert rel(S.ddpm_schedule(SDXL_SCHEDULER).alphas_cumprod, ref.alphas_cumprod.numpy()) <= 1e-6


@pytest.mark.parametrize("name", ["sdxl", "cosine_v", "zero_snr_v"])
def test_add_noise_velocity_and_target_match_diffusers(name, rel):
    cfg = CONFIGS[name]
    ref = DDPMScheduler.from_config(cfg)
    ours = S.ddpm_schedule(cfg)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])

    want_xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    got_xt = jax.jit(S.add_noise)(ours, x0, noise, t)
    got_v = jax.jit(S.velocity)(ours, x0, noise, t)
    assert rel(got_xt, want_xt) <= 1e-6
    assert rel(got_v, want_v) <= 1e-6
    want_target = noise if cfg.get("prediction_type", "epsilon") == "epsilon" else want_v
    assert rel(S.training_target(ours, x0, noise, t), want_target) <= 1e-6


def test_add_noise_broadcasts_over_channels_last_layout(rel):
    # Flax models use NHWC; the per-sample coefficient must broadcast over any trailing layout.
    ref = DDPMScheduler.from_config(SDXL_SCHEDULER)
    ours = S.ddpm_schedule(SDXL_SCHEDULER)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    t = np.array([10, 400, 990])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert rel(S.add_noise(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want) <= 1e-6


def test_sample_timesteps_uniform_on_train_range():
    n = 20000
    t = np.asarray(jax.jit(S.sample_timesteps, static_argnums=(1, 2))(jax.random.key(0), n, 1000))
    assert t.shape == (n,) and t.dtype == np.int32
    assert t.min() >= 0 and t.max() <= 999
    counts = np.bincount(t // 100, minlength=10)  # 10 bins of 100 timesteps, expected 2000 each
    chi2 = float(((counts - n / 10) ** 2 / (n / 10)).sum())
    assert chi2 < 30.0  # 9 degrees of freedom: p ~ 4e-4
    assert {0, 999} <= set(np.asarray(S.sample_timesteps(jax.random.key(1), 50000)).tolist())
    other = np.asarray(S.sample_timesteps(jax.random.key(2), n))
    assert (t != other).mean() > 0.99


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 1000}, "trained_betas"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ],
)
def test_unsupported_config_is_a_one_line_error_naming_the_key(cfg, key):
    with pytest.raises(S.ConfigError) as err:
        S.ddpm_schedule(cfg)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_schedule_is_a_pytree_with_static_prediction_type():
    sched = S.ddpm_schedule(CONFIGS["cosine_v"])
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(treedef, leaves).prediction_type == "v_prediction"
