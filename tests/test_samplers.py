"""Euler / DDIM samplers vs diffusers' EulerDiscreteScheduler and DDIMScheduler.

Every number on the right-hand side of an assertion comes from diffusers (its tables, its `step`,
or its scheduler loop driven by the same closed-form fake model written in numpy).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from fairjax.diffusion import samplers as M
from fairjax.errors import ConfigError
from test_schedules import SDXL_SCHEDULER

EULER_CONFIGS = {
    "sdxl": SDXL_SCHEDULER,
    "trailing": dict(SDXL_SCHEDULER, timestep_spacing="trailing", steps_offset=0),
    "linspace_v": dict(SDXL_SCHEDULER, timestep_spacing="linspace", prediction_type="v_prediction"),
    "sigma_min_linear": {"beta_schedule": "linear", "final_sigmas_type": "sigma_min", "timestep_spacing": "leading"},
    "zero_snr_trailing_v": dict(
        SDXL_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    ),
}
DDIM_CONFIGS = {
    "sdxl": SDXL_SCHEDULER,  # set_alpha_to_one False, clip_sample False, leading + offset 1
    "defaults": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},  # clips, alpha 1
    "trailing_v": dict(SDXL_SCHEDULER, timestep_spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=True),
    "linspace_clip": dict(SDXL_SCHEDULER, timestep_spacing="linspace", clip_sample=True, clip_sample_range=0.8),
}
STEPS = [4, 20, 50]


def table_tol(name):
    """float32 rounding, except zero-SNR tables (ill-conditioned near t = T; see test_schedules.TOL)."""
    return 1e-4 if "zero_snr" in name else 1e-6


def reference(kind, cfg, n):
    sched = (EulerDiscreteScheduler if kind == "euler" else DDIMScheduler).from_config(cfg)
    sched.set_timesteps(n)
    return sched


# ----------------------------------------------------------------------------------------------
# tables


@pytest.mark.parametrize("n", STEPS + [7, 1000])
@pytest.mark.parametrize("name", sorted(EULER_CONFIGS))
def test_euler_tables_match_set_timesteps(name, n, rel):
    cfg = EULER_CONFIGS[name]
    ref = reference("euler", cfg, n)
    ours = M.euler_schedule(cfg, n)
    assert ours.timesteps.dtype == jnp.float32 and ours.sigmas.shape == (n + 1,)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    assert rel(ours.sigmas, ref.sigmas.numpy()) <= table_tol(name)
    assert float(ours.sigmas[-1]) == float(ref.sigmas[-1])  # exactly 0 (or sigma_min)
    assert rel(ours.init_noise_sigma, np.float32(ref.init_noise_sigma)) <= table_tol(name)


@pytest.mark.parametrize("n", STEPS + [7, 999])
@pytest.mark.parametrize("name", sorted(DDIM_CONFIGS))
def test_ddim_tables_match_set_timesteps(name, n):
    cfg = DDIM_CONFIGS[name]
    ref = reference("ddim", cfg, n)
    ours = M.ddim_schedule(cfg, n)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy().astype(np.float32))
    assert float(ours.init_noise_sigma) == ref.init_noise_sigma


# ----------------------------------------------------------------------------------------------
# single steps: the same (x, model output) pairs through diffusers' step and ours


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", sorted(EULER_CONFIGS))
def test_every_euler_step_matches(name, n, rel):
    cfg = EULER_CONFIGS[name]
    ref = reference("euler", cfg, n)
    ours = M.euler_schedule(cfg, n)
    step = jax.jit(M.euler_step, static_argnums=4)
    rng = np.random.default_rng(n)
    for i, t in enumerate(ref.timesteps):
        x = (rng.standard_normal((2, 4, 8, 8)) * float(ref.sigmas[i])).astype(np.float32)
        out = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        want_in = ref.scale_model_input(torch.from_numpy(x), t).numpy()
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
        assert rel(M.euler_scale_model_input(x, ours.sigmas[i]), want_in) <= table_tol(name)
        got = step(out, x, ours.sigmas[i], ours.sigmas[i + 1], ours.prediction_type)
        assert rel(got, want) <= table_tol(name), (i, float(t))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", sorted(DDIM_CONFIGS))
def test_every_ddim_step_matches(name, n, rel):
    cfg = DDIM_CONFIGS[name]
    ref = reference("ddim", cfg, n)
    ours = M.ddim_schedule(cfg, n)
    step = jax.jit(M.ddim_step, static_argnums=(4, 5))
    rng = np.random.default_rng(n)
    for i, t in enumerate(ref.timesteps):
        x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        out = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
        got = step(
            out, x, ours.alphas_cumprod_t[i], ours.alphas_cumprod_prev[i], ours.prediction_type, ours.clip_sample_range
        )
        assert rel(got, want) <= 1e-6, (i, int(t))


# ----------------------------------------------------------------------------------------------
# whole loops with classifier-free guidance, a deterministic closed-form fake model


def fake_model(xp, x, t, code):
    """A smooth stand-in for a conditional eps/v model; `code` (one number per row) is the condition."""
    s = t / 1000.0
    c = code.reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.6 * xp.sin(0.9 * x + c * s) + 0.3 * x * xp.cos(3.0 * s) + 0.1 * c


UNCOND = np.zeros(3, np.float32)
COND = np.array([1.0, -2.0, 0.5], np.float32)


def diffusers_loop(kind, cfg, n, noise, guidance, rescale=0.0):
    """What StableDiffusionXLPipeline's denoising loop does, with the fake model as the UNet."""
    sched = reference(kind, cfg, n)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    latents = torch.from_numpy(noise) * sched.init_noise_sigma
    codes = np.concatenate([UNCOND, COND])
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        out = torch.from_numpy(fake_model(np, inp.numpy(), np.float32(t.item()), codes).astype(np.float32))
        uncond, cond = out.chunk(2)
        pred = uncond + guidance * (cond - uncond)
        if rescale > 0:
            pred = rescale_noise_cfg(pred, cond, guidance_rescale=rescale)
        latents = sched.step(pred, t, latents).prev_sample
    return latents.numpy()


def fairjax_loop(kind, cfg, n, noise, guidance, rescale=0.0):
    codes = M.interleave_pairs(jnp.asarray(UNCOND), jnp.asarray(COND))
    model_fn = lambda x2, t: fake_model(jnp, x2, t, codes)  # noqa: E731
    denoise = M.classifier_free_guidance(model_fn, guidance, rescale)
    run = jax.jit(lambda z, sched: M.sample(denoise, z, sched))
    return run(jnp.asarray(noise), M.make_schedule(kind, cfg, n))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(
    "kind, name", [("euler", "sdxl"), ("euler", "linspace_v"), ("ddim", "sdxl"), ("ddim", "trailing_v")]
)
def test_sampling_loop_with_cfg_matches_diffusers(kind, name, n, rel):
    cfg = (EULER_CONFIGS if kind == "euler" else DDIM_CONFIGS)[name]
    noise = np.random.default_rng(0).standard_normal((3, 4, 6, 6)).astype(np.float32)
    want = diffusers_loop(kind, cfg, n, noise, guidance=5.0)
    got = fairjax_loop(kind, cfg, n, noise, guidance=5.0)
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("kind", ["euler", "ddim"])
def test_guidance_rescale_matches_diffusers(kind, rel):
    noise = np.random.default_rng(1).standard_normal((3, 4, 6, 6)).astype(np.float32)
    want = diffusers_loop(kind, SDXL_SCHEDULER, 10, noise, guidance=7.0, rescale=0.7)
    got = fairjax_loop(kind, SDXL_SCHEDULER, 10, noise, guidance=7.0, rescale=0.7)
    assert rel(got, want) <= 1e-5


def test_interleave_pairs_roundtrip():
    u = jnp.arange(6.0).reshape(3, 2)
    c = -u
    x2 = M.interleave_pairs(u, c)
    np.testing.assert_array_equal(np.asarray(x2[1::2]), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(x2[0::2]), np.asarray(u))
    back = M.split_pairs(x2)
    np.testing.assert_array_equal(np.asarray(back[0]), np.asarray(u))
    np.testing.assert_array_equal(np.asarray(back[1]), np.asarray(c))


@pytest.mark.parametrize("kind", ["euler", "ddim"])
def test_low_precision_model_keeps_float32_latents(kind, rel):
    # A bf16 model inside the loop: the carry stays float32, each model output is rounded to bf16.
    cfg = SDXL_SCHEDULER
    noise = np.random.default_rng(2).standard_normal((3, 4, 6, 6)).astype(np.float32)
    codes = jnp.asarray(COND)
    denoise = lambda x, t: fake_model(jnp, x, t, codes).astype(jnp.bfloat16)  # noqa: E731
    got = jax.jit(lambda z, s: M.sample(denoise, z, s))(jnp.asarray(noise), M.make_schedule(kind, cfg, 4))
    assert got.dtype == jnp.float32
    sched = reference(kind, cfg, 4)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        out = fake_model(np, inp.numpy(), np.float32(t.item()), COND).astype(np.float32)
        out = torch.from_numpy(out).to(torch.bfloat16).to(torch.float32)
        x = sched.step(out, t, x).prev_sample
    assert rel(got, x.numpy()) <= 1e-5  # the same bf16 rounding of the model output on both sides


def test_same_step_count_does_not_recompile():
    denoise = lambda x, t: fake_model(jnp, x, t, jnp.ones(x.shape[0]))  # noqa: E731
    run = jax.jit(lambda z, sched: M.sample(denoise, z, sched))
    z = jnp.ones((1, 2, 2, 2))
    run(z, M.euler_schedule(SDXL_SCHEDULER, 5))
    run(z, M.euler_schedule(dict(SDXL_SCHEDULER, timestep_spacing="trailing"), 5))
    assert run._cache_size() == 1


@pytest.mark.parametrize(
    "kind, cfg, key",
    [
        ("euler", dict(SDXL_SCHEDULER, use_karras_sigmas=True), "use_karras_sigmas"),
        ("euler", dict(SDXL_SCHEDULER, interpolation_type="log_linear"), "interpolation_type"),
        ("euler", dict(SDXL_SCHEDULER, timestep_type="continuous"), "timestep_type"),
        ("euler", dict(SDXL_SCHEDULER, timestep_spacing="quadratic"), "timestep_spacing"),
        ("ddim", dict(SDXL_SCHEDULER, thresholding=True), "thresholding"),
        ("ddim", dict(SDXL_SCHEDULER, prediction_type="sample"), "prediction_type"),
    ],
)
def test_unsupported_config_is_a_one_line_error(kind, cfg, key):
    with pytest.raises(ConfigError) as err:
        M.make_schedule(kind, cfg, 10)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bad_step_count_and_sampler_name():
    with pytest.raises(ValueError, match="num_inference_steps"):
        M.make_schedule("euler", SDXL_SCHEDULER, 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        M.make_schedule("ddim", SDXL_SCHEDULER, 1001)
    with pytest.raises(ValueError, match="timestep 1000"):  # leading + steps_offset 1 overruns the table
        M.make_schedule("ddim", SDXL_SCHEDULER, 1000)
    with pytest.raises(ValueError, match="euler, ddim"):
        M.make_schedule("heun", SDXL_SCHEDULER, 10)
