"""diffusers schedulers for training and sampling, and the Gaussian transition each sampling step makes.

Every sampling step of DDPM and of DDIM (with eta) is linear in the predicted noise:

    x_prev = a_t * x_t + b_t * eps(x_t) + sigma_t * z,     z ~ N(0, I)

`transition` returns `(a_t, b_t, sigma_t)` for the scheduler's own update, so that the path weight estimator of
docs/design.md §2 scores exactly the transitions the sampler draws from. `clip_sample` is off: clipping the predicted x0
would make the step non-linear in eps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SamplerName = Literal["ddpm", "ddim"]


@dataclass
class NoiseSchedule:
    """The forward process shared by all shards (it must be identical for composition to be exact)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # cosine: better than linear at tiny resolutions
    prediction_type: str = "epsilon"


def train_scheduler(schedule: NoiseSchedule):
    """The DDPM scheduler used to noise training samples (`add_noise`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        beta_schedule=schedule.beta_schedule,
        prediction_type=schedule.prediction_type,
        clip_sample=False,
    )


def sampling_scheduler(schedule: NoiseSchedule, sampler: SamplerName = "ddpm"):
    """A DDPM (variance 'fixed_small') or DDIM scheduler with clipping off."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        beta_schedule=schedule.beta_schedule,
        prediction_type=schedule.prediction_type,
        clip_sample=False,
    )
    if sampler == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **common)
    if sampler == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, **common)
    raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")


def previous_timestep(scheduler, t: int) -> int:
    """The timestep the scheduler steps to from `t` (-1 after the last step)."""
    if hasattr(scheduler, "previous_timestep"):  # DDPM knows its own (custom timesteps included)
        return int(scheduler.previous_timestep(t))
    n = scheduler.config.num_train_timesteps
    steps = scheduler.num_inference_steps or n
    return t - n // steps


# Variance types whose step is `mean + std * z` with a fixed std (diffusers' DDPMScheduler._get_variance rules).
LINEAR_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


def check_linear(scheduler) -> None:
    """Refuse a scheduler whose step is not `a x_t + b eps + sigma z` with known (a, b, sigma).

    The path estimator and the likelihood bound read the step's Gaussian from `transition`; a scheduler configured
    otherwise (another prediction type, clipping or thresholding of x0, a learned variance) would be scored with
    the wrong Gaussian, silently. So it is an error here, not a fallback.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    c = scheduler.config
    name = type(scheduler).__name__
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        raise TypeError(f"no transition rule for {name}; use a DDPMScheduler or DDIMScheduler")
    if c.prediction_type != "epsilon":
        raise ValueError(f"{name} predicts {c.prediction_type!r}; transition() supports prediction_type='epsilon'")
    if c.clip_sample or c.get("thresholding", False):
        raise ValueError(f"{name} clips or thresholds x0, which makes the step non-linear in eps; turn it off")
    if isinstance(scheduler, DDPMScheduler) and c.variance_type not in LINEAR_DDPM_VARIANCES:
        raise ValueError(f"DDPMScheduler variance_type {c.variance_type!r} is not supported; "
                         f"choose one of {LINEAR_DDPM_VARIANCES}")


def transition(scheduler, t: int, eta: float = 1.0) -> tuple[float, float, float]:
    """Coefficients `(a, b, sigma)` of the step from `t`: `x_prev = a x_t + b eps + sigma z`.

    Args:
        scheduler: a DDPMScheduler (`fixed_small`, `fixed_small_log` or `fixed_large` variance) or DDIMScheduler,
            predicting epsilon without clipping, after `set_timesteps`; anything else is refused (`check_linear`).
        t: the current timestep.
        eta: DDIM's stochasticity (ignored for DDPM). The path estimator needs sigma > 0, i.e. eta > 0.
    """
    from diffusers import DDPMScheduler

    check_linear(scheduler)
    ac = scheduler.alphas_cumprod.double()
    prev = previous_timestep(scheduler, t)
    a_t = ac[t]
    if isinstance(scheduler, DDPMScheduler):
        a_prev = ac[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        alpha = a_t / a_prev
        beta = 1 - alpha
        # x0_hat = (x - sqrt(1-a_t) eps) / sqrt(a_t);  mu = c0 x0_hat + ct x   (DDPM posterior mean)
        c0 = a_prev.sqrt() * beta / (1 - a_t)
        ct = alpha.sqrt() * (1 - a_prev) / (1 - a_t)
        a = c0 / a_t.sqrt() + ct
        b = -c0 * (1 - a_t).sqrt() / a_t.sqrt()
        if scheduler.config.variance_type == "fixed_large":
            var = beta
        else:  # fixed_small and fixed_small_log draw with the posterior variance
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
        # diffusers adds noise for every t > 0 (a clamped 1e-20 variance, i.e. none, on a last step to prev < 0).
        return float(a), float(b), float(var.sqrt()) if t > 0 and var > 1e-20 else 0.0
    a_prev = ac[prev] if prev >= 0 else scheduler.final_alpha_cumprod.double()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * var.sqrt()
    # x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z
    a = a_prev.sqrt() / a_t.sqrt()
    b = -a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt() + (1 - a_prev - sigma**2).sqrt()
    return float(a), float(b), float(sigma)
