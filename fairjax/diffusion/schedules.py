"""The DDPM training schedule (forward noising process) from a diffusers scheduler config.

A diffusers scheduler config (`scheduler/scheduler_config.json`, e.g. SDXL's Euler config:
1000 train steps, `scaled_linear` betas 0.00085 -> 0.012, epsilon prediction) is read as is;
keys that only matter to a sampler (`timestep_spacing`, `steps_offset`, ...) are ignored here.

    beta_t            linear:            linspace(beta_start, beta_end, T)
                      scaled_linear:     linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2
                      squaredcos_cap_v2: min(1 - abar(t+1/T) / abar(t), 0.999),
                                         abar(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2
    alphabar_t      = prod_{s<=t} (1 - beta_s)
    x_t             = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps          (add_noise)
    v_t             = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0          (velocity)
    training target = eps (epsilon prediction) or v_t (v_prediction)

Numerics follow diffusers on CPU: betas in float32, the cumulative product accumulated in
float64 and rounded to float32 (what torch's CPU cumprod does), so `alphas_cumprod` equals
diffusers' table to the last bit for the linear and squaredcos schedules and to ~1 ulp for
scaled_linear (torch's vectorised linspace rounds a few entries differently).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fairjax.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def config_value(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """`config[key]`, or `default` when the key is absent or null (diffusers' default values)."""
    value = config.get(key, default)
    return default if value is None else value


def _unsupported(key: str, value: Any, allowed) -> ConfigError:
    return ConfigError(
        f"scheduler config: {key}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}"
    )


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021): beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv 2305.08891, Alg. 1): shift/scale sqrt(alphabar) so alphabar_T = 0."""
    betas = np.asarray(betas, np.float32)
    abar_sqrt = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def betas_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """float32 betas (T,) of a diffusers scheduler config (`trained_betas` wins over `beta_schedule`)."""
    n = int(config_value(config, "num_train_timesteps", 1000))
    if n < 1:
        raise _unsupported("num_train_timesteps", n, ["a positive integer"])
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, np.float32)
        if betas.shape != (n,):
            raise ConfigError(
                f"scheduler config: trained_betas has shape {betas.shape}, expected ({n},) = num_train_timesteps"
            )
    else:
        schedule = config_value(config, "beta_schedule", "linear")
        start = float(config_value(config, "beta_start", 0.0001))
        end = float(config_value(config, "beta_end", 0.02))
        if schedule == "linear":
            betas = np.linspace(start, end, n).astype(np.float32)
        elif schedule == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n).astype(np.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = squaredcos_cap_v2_betas(n)
        else:
            raise _unsupported("beta_schedule", schedule, BETA_SCHEDULES)
    if config_value(config, "rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """alphabar_t = prod_{s<=t}(1 - beta_s): float32 factors, float64 accumulation, float32 result."""
    alphas = (1.0 - np.asarray(betas, np.float32)).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def prediction_type_from_config(config: Mapping[str, Any], allowed=PREDICTION_TYPES) -> str:
    kind = config_value(config, "prediction_type", "epsilon")
    if kind not in allowed:
        raise _unsupported("prediction_type", kind, allowed)
    return kind


@struct.dataclass
class DDPMSchedule:
    """The forward process: float32 `betas` and `alphas_cumprod` of shape (T,), and the model's target.

    A pytree (the arrays are leaves, `prediction_type` is static), so it can be passed into `jit`.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


def ddpm_schedule(config: Mapping[str, Any]) -> DDPMSchedule:
    """The training schedule of a diffusers scheduler config dict (unsupported values: ConfigError)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"scheduler config must be a dict (scheduler_config.json), got {type(config).__name__}")
    prediction_type = prediction_type_from_config(config)
    betas = betas_from_config(config)
    return DDPMSchedule(
        betas=jnp.asarray(betas),
        alphas_cumprod=jnp.asarray(alphas_cumprod_from_betas(betas)),
        prediction_type=prediction_type,
    )


def _per_sample(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """values[t] (one per batch element) shaped (B, 1, ..., 1) to broadcast against `like`, in like's dtype."""
    v = jnp.take(values.astype(like.dtype), jnp.asarray(t, jnp.int32).reshape(-1), axis=0)
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def add_noise(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise, with t an integer per batch element."""
    abar = _per_sample(schedule.alphas_cumprod, t, x0)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def velocity(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v_t = sqrt(alphabar_t) noise - sqrt(1 - alphabar_t) x0 (Salimans & Ho 2022), t per batch element."""
    abar = _per_sample(schedule.alphas_cumprod, t, x0)
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


def training_target(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model regresses: `noise` for epsilon prediction, `velocity(...)` for v_prediction."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    raise _unsupported("prediction_type", schedule.prediction_type, PREDICTION_TYPES)


def sample_timesteps(rng: jax.Array, n: int, num_train_timesteps: int = 1000) -> jax.Array:
    """n int32 timesteps drawn uniformly from {0, ..., num_train_timesteps - 1}."""
    return jax.random.randint(rng, (n,), 0, num_train_timesteps, dtype=jnp.int32)
