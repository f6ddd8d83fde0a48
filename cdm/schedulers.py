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
    n = scheduler.config.num_train_timesteps
    steps = scheduler.num_inference_steps or n
    return t - n // steps


def transition(scheduler, t: int, eta: float = 1.0) -> tuple[float, float, float]:
    """Coefficients `(a, b, sigma)` of the step from `t`: `x_prev = a x_t + b eps + sigma z`.

    Args:
        scheduler: a DDPMScheduler ('fixed_small') or DDIMScheduler, after `set_timesteps`.
        t: the current timestep.
        eta: DDIM's stochasticity (ignored for DDPM). The path estimator needs sigma > 0, i.e. eta > 0.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

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
        var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20) if prev >= 0 else torch.tensor(0.0)
        return float(a), float(b), float(var.sqrt())
    if isinstance(scheduler, DDIMScheduler):
        a_prev = ac[prev] if prev >= 0 else scheduler.final_alpha_cumprod.double()
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma = eta * var.sqrt()
        # x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z
        a = a_prev.sqrt() / a_t.sqrt()
        b = -a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt() + (1 - a_prev - sigma**2).sqrt()
        return float(a), float(b), float(sigma)
    raise TypeError(f"no transition rule for {type(scheduler).__name__}")
