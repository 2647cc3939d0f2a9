"""Euler-discrete and DDIM samplers as jittable `lax.scan` loops, with classifier-free guidance.

The step tables (timesteps, sigmas / alphabars) are computed on the host from a diffusers
scheduler config exactly as diffusers 0.42's `EulerDiscreteScheduler.set_timesteps` and
`DDIMScheduler.set_timesteps` do; the per-step update runs in JAX on float32.

A sampler drives a `denoise_fn(x, t) -> model output` closure (epsilon or v, by the config's
`prediction_type`); `t` is a float32 scalar (the UNet timestep). `classifier_free_guidance`
turns a conditional model call on 2B rows into such a closure. Usage, with an SDXL UNet:

    sched = make_schedule("euler", scheduler_config, num_inference_steps=30)
    model_fn = lambda x2, t: unet.apply({"params": p}, x2, t, context2, added_cond2)
    latents = sample(classifier_free_guidance(model_fn, 5.0), noise, sched)

where `context2` / `added_cond2` hold (uncond_i, cond_i) rows interleaved (`interleave_pairs`),
so that a batch sharded over devices keeps each sample's two rows on the same device.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fairjax.diffusion.schedules import (
    alphas_cumprod_from_betas,
    betas_from_config,
    config_value,
    prediction_type_from_config,
)
from fairjax.errors import ConfigError, UserError

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("euler", "ddim")


def _unsupported(key: str, value: Any, allowed) -> ConfigError:
    return ConfigError(
        f"scheduler config: {key}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}"
    )


def _check_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    n = int(num_inference_steps)
    if not 1 <= n <= num_train_timesteps:
        raise UserError(f"num_inference_steps={num_inference_steps} must be in [1, {num_train_timesteps}]")
    return n


def spaced_timesteps(config: Mapping[str, Any], num_inference_steps: int, default_spacing: str) -> np.ndarray:
    """Inference timesteps (descending, float64 before rounding/casting) by `timestep_spacing`
    (absent: `default_spacing`, which diffusers sets per class: Euler 'linspace', DDIM 'leading').

    leading:  (arange(n) * (T // n))[::-1] + steps_offset   (SDXL: T=1000, offset 1 -> 951, ..., 1 for n=20)
    trailing: round(arange(T, 0, -T / n)) - 1                (always starts at T-1)
    linspace: linspace(0, T - 1, n)[::-1]                    (fractional; DDIM rounds them)
    """
    T = int(config_value(config, "num_train_timesteps", 1000))
    n = _check_steps(num_inference_steps, T)
    spacing = config_value(config, "timestep_spacing", default_spacing)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + int(config_value(config, "steps_offset", 0))
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1]
    raise _unsupported("timestep_spacing", spacing, TIMESTEP_SPACINGS)


# ----------------------------------------------------------------------------------------------
# Euler discrete (Karras et al. 2022, Alg. 2 without churn), as diffusers' EulerDiscreteScheduler.


@struct.dataclass
class EulerSchedule:
    """timesteps (n,) float32 for the model; sigmas (n+1,) float32 ending at 0 (or sigma_min)."""

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")


def _check_euler_config(config: Mapping[str, Any]) -> None:
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if config_value(config, key, False):
            raise _unsupported(key, config[key], [False])
    if config_value(config, "interpolation_type", "linear") != "linear":
        raise _unsupported("interpolation_type", config["interpolation_type"], ["linear"])
    if config_value(config, "timestep_type", "discrete") != "discrete":
        raise _unsupported("timestep_type", config["timestep_type"], ["discrete"])
    if config_value(config, "final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise _unsupported("final_sigmas_type", config["final_sigmas_type"], ["zero", "sigma_min"])


def euler_schedule(config: Mapping[str, Any], num_inference_steps: int) -> EulerSchedule:
    """Euler tables: sigma(t) = sqrt((1 - alphabar_t) / alphabar_t), linearly interpolated at the
    spaced timesteps, then a final sigma of 0 ("zero") or sigma(0) ("sigma_min").
    init_noise_sigma = max sigma ("linspace"/"trailing") or sqrt(max sigma^2 + 1) ("leading")."""
    _check_euler_config(config)
    prediction_type = prediction_type_from_config(config)
    abar = alphas_cumprod_from_betas(betas_from_config(config))
    if config_value(config, "rescale_betas_zero_snr", False):
        abar[-1] = np.float32(2.0**-24)
    timesteps = spaced_timesteps(config, num_inference_steps, "linspace").astype(np.float32)
    train_sigmas = ((1 - abar) / abar) ** 0.5  # float32, as torch computes it
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if config_value(config, "final_sigmas_type", "zero") == "sigma_min":
        last = ((1 - abar[0]) / abar[0]) ** 0.5
    else:
        last = 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    max_sigma = sigmas.max()
    if config_value(config, "timestep_spacing", "linspace") == "leading":
        init = (max_sigma**2 + np.float32(1)) ** np.float32(0.5)
    else:
        init = max_sigma
    return EulerSchedule(
        timesteps=jnp.asarray(timesteps),
        sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.asarray(init, jnp.float32),
        prediction_type=prediction_type,
    )


def euler_scale_model_input(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """The model sees x / sqrt(sigma^2 + 1) (the variance-preserving input)."""
    return x / ((sigma**2 + 1) ** 0.5)


def euler_step(model_output, x, sigma, sigma_next, prediction_type: str = "epsilon"):
    """x_next = x + (x - x0_hat) / sigma * (sigma_next - sigma).

    x0_hat = x - sigma * eps (epsilon) or v * (-sigma / sqrt(sigma^2+1)) + x / (sigma^2+1) (v_prediction).
    Computed in float32 in diffusers' operation order; returns model_output's dtype.
    """
    out_dtype = model_output.dtype
    x = x.astype(jnp.float32)
    if prediction_type == "epsilon":
        x0 = x - sigma * model_output
    elif prediction_type == "v_prediction":
        x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    else:
        raise _unsupported("prediction_type", prediction_type, ("epsilon", "v_prediction"))
    derivative = (x - x0) / sigma
    return (x + derivative * (sigma_next - sigma)).astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021, eta = 0), as diffusers' DDIMScheduler.


@struct.dataclass
class DDIMSchedule:
    """timesteps (n,) float32 (integer values); alphabar at each t and at its predecessor."""

    timesteps: jax.Array
    alphas_cumprod_t: jax.Array
    alphas_cumprod_prev: jax.Array
    init_noise_sigma: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    clip_sample_range: float | None = struct.field(pytree_node=False, default=None)


def ddim_schedule(config: Mapping[str, Any], num_inference_steps: int) -> DDIMSchedule:
    """DDIM tables. The predecessor of t is t - T // n for every spacing (diffusers' rule);
    below 0 it is the final alphabar: 1 (`set_alpha_to_one`, default true) or alphabar_0.
    `clip_sample` (diffusers' DDIM default: true) clamps x0_hat to +-clip_sample_range."""
    if config_value(config, "thresholding", False):
        raise _unsupported("thresholding", config["thresholding"], [False])
    prediction_type = prediction_type_from_config(config)
    abar = alphas_cumprod_from_betas(betas_from_config(config))
    T = len(abar)
    n = _check_steps(num_inference_steps, T)
    timesteps = spaced_timesteps(config, n, "leading").round().astype(np.int64)
    if timesteps.max() >= T:
        raise UserError(
            f"DDIM with {n} steps reaches timestep {timesteps.max()} >= num_train_timesteps={T} "
            f"(steps_offset={config_value(config, 'steps_offset', 0)}); use fewer steps"
        )
    prev = timesteps - T // n
    final = np.float32(1.0) if config_value(config, "set_alpha_to_one", True) else abar[0]
    abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, T - 1)], final).astype(np.float32)
    clip = float(config_value(config, "clip_sample_range", 1.0)) if config_value(config, "clip_sample", True) else None
    return DDIMSchedule(
        timesteps=jnp.asarray(timesteps.astype(np.float32)),
        alphas_cumprod_t=jnp.asarray(abar[timesteps]),
        alphas_cumprod_prev=jnp.asarray(abar_prev),
        init_noise_sigma=jnp.asarray(1.0, jnp.float32),
        prediction_type=prediction_type,
        clip_sample_range=clip,
    )


def ddim_step(model_output, x, abar_t, abar_prev, prediction_type: str = "epsilon", clip_sample_range=None):
    """x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat   (eta = 0).

    epsilon:      x0_hat = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t),  eps_hat = eps
    v_prediction: x0_hat = sqrt(abar_t) x - sqrt(1 - abar_t) v,  eps_hat = sqrt(abar_t) v + sqrt(1 - abar_t) x
    """
    beta_t = 1 - abar_t
    if prediction_type == "epsilon":
        x0 = (x - beta_t**0.5 * model_output) / abar_t**0.5
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = abar_t**0.5 * x - beta_t**0.5 * model_output
        eps = abar_t**0.5 * model_output + beta_t**0.5 * x
    else:
        raise _unsupported("prediction_type", prediction_type, ("epsilon", "v_prediction"))
    if clip_sample_range is not None:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    return abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps


# ----------------------------------------------------------------------------------------------
# The loops.

Schedule = Union[EulerSchedule, DDIMSchedule]


def make_schedule(kind: str, config: Mapping[str, Any], num_inference_steps: int) -> Schedule:
    """`kind` 'euler' or 'ddim', tables from a diffusers scheduler config dict."""
    if kind == "euler":
        return euler_schedule(config, num_inference_steps)
    if kind == "ddim":
        return ddim_schedule(config, num_inference_steps)
    raise UserError(f"sampler {kind!r} is not supported; use one of {', '.join(SAMPLERS)}")


def sample(denoise_fn: DenoiseFn, noise: jax.Array, schedule: Schedule) -> jax.Array:
    """Run the whole reverse process from unit Gaussian `noise` (scaled here by init_noise_sigma,
    as the diffusers pipelines do in `prepare_latents`) and return the final sample.

    One `lax.scan` over the steps; `denoise_fn(x_model_input, t)` is called once per step and its
    output is cast to the sample's dtype (keep `noise` float32 when the model computes in bf16).
    Jit the caller (or this function with `denoise_fn` closed over) to compile it once.
    """
    x = noise * schedule.init_noise_sigma.astype(noise.dtype)
    if isinstance(schedule, EulerSchedule):
        pred = schedule.prediction_type

        def body(x, step):
            t, sigma, sigma_next = step
            out = denoise_fn(euler_scale_model_input(x, sigma), t).astype(x.dtype)
            return euler_step(out, x, sigma, sigma_next, pred), None

        steps = (schedule.timesteps, schedule.sigmas[:-1], schedule.sigmas[1:])
    elif isinstance(schedule, DDIMSchedule):
        pred, clip = schedule.prediction_type, schedule.clip_sample_range

        def body(x, step):
            t, abar_t, abar_prev = step
            out = denoise_fn(x, t).astype(x.dtype)
            return ddim_step(out, x, abar_t, abar_prev, pred, clip), None

        steps = (schedule.timesteps, schedule.alphas_cumprod_t, schedule.alphas_cumprod_prev)
    else:
        raise TypeError(f"unknown schedule type {type(schedule).__name__}; build it with make_schedule")
    x, _ = jax.lax.scan(body, x, steps)
    return x


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance.


def interleave_pairs(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """Rows (uncond_0, cond_0, uncond_1, cond_1, ...): shape (2B, ...) from two (B, ...) arrays."""
    return jnp.stack([uncond, cond], axis=1).reshape((-1,) + uncond.shape[1:])


def split_pairs(x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of interleave_pairs: (uncond, cond), each (B, ...)."""
    x2 = x2.reshape((-1, 2) + x2.shape[1:])
    return x2[:, 0], x2[:, 1]


def rescale_noise_cfg(guided: jax.Array, cond: jax.Array, guidance_rescale: float) -> jax.Array:
    """Lin et al. 2023 sec. 3.4: mix guided*(std(cond)/std(guided)) with guided (per sample, std with ddof 1)."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def classifier_free_guidance(model_fn: DenoiseFn, guidance_scale, guidance_rescale: float = 0.0) -> DenoiseFn:
    """denoise(x, t) = u + s (c - u) from one model call on 2B interleaved rows (x_i, x_i).

    `model_fn(x2, t)` must condition row 2i on the unconditional and row 2i+1 on the conditional
    input (see interleave_pairs). `guidance_scale` may be traced; `guidance_rescale` (static) > 0
    applies rescale_noise_cfg as StableDiffusionXLPipeline does.
    """

    def denoise(x, t):
        uncond, cond = split_pairs(model_fn(interleave_pairs(x, x), t))
        guided = uncond + guidance_scale * (cond - uncond)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale)
        return guided

    return denoise
