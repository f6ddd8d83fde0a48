"""The variational bound on the negative log-likelihood (docs/design.md §6), for one denoiser and for a composite.

The sampler's K-step DDPM chain `t_K > ... > t_1` is a latent-variable model of the data x, and Ho et al.'s bound
holds for it exactly as for the 1000-step chain (a coarser chain gives a looser but valid bound):

    -log p(x | y) <= KL(q(x_{t_K} | x) || N(0, I))                                   prior term
                     + sum_k KL(q(x_{t_{k-1}} | x_{t_k}, x) || p(x_{t_{k-1}} | x_{t_k}))  one per step
                     - log p(x | x_{t_1})                                              discretized decoder

The model's step is the sampler's Gaussian mean `a x_t + b eps_theta` with variance `sigma^2 + b^2 gamma_t`:
the posterior variance plus the eps predictor's residual variance gamma_t (the fixed step variance that
maximizes the likelihood, as in Analytic-DPM; with the sampler's bare sigma^2 a 100-step bound is ~30 nats loose
on a closed-form Gaussian, with it within Monte Carlo noise). Each step costs one network call per sample at
x_t = sqrt(abar) x + sqrt(1 - abar) eps. gamma_t is one scalar per step fitted on the evaluated batch itself: with
B images of D pixels the optimism is about K / (2 B) nats per image (0.006 bits/dim for K = 100, B = 180, D = 64).
The decoder is that Gaussian at the last step integrated over each pixel's 8-bit bin, so the bound is a
probability of the discrete image and bits/dim compare across models.

For a composite of shards with priors lambda_i(y) the mixture bound is

    log p(x | y) >= log sum_i lambda_i(y) exp(ELBO_i(x, y))

(each ELBO_i <= log p_i). All models are scored with the same noise draws (common random numbers), so the
difference between two models carries much less Monte Carlo noise than either number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdm.model import Denoiser, require_pointwise
from cdm.schedulers import NoiseSchedule, sampling_scheduler, transition

BINS = 256  # the data are 8-bit images scaled to [-1, 1]


@dataclass
class BoundConfig:
    steps: int = 100  # K: the sampling chain's steps (the default sampler's); more steps tighten the bound
    batch_size: int = 512
    seed: int = 0  # the noise draws: equal seeds give every model the same draws
    discrete: bool = True  # False: continuous Gaussian decoder density (for tests against closed forms)
    min_gamma: float = 1e-4  # floor of the residual variance per step (keeps a perfect-looking step finite)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log P(bin of x) under N(mean, std^2), per element; edge bins reach +-infinity. x, mean in [-1, 1]."""
    half = 1.0 / (BINS - 1)
    upper = torch.where(x > 1 - 1e-3, torch.ones_like(x), _std_normal_cdf((x + half - mean) / std))
    lower = torch.where(x < -1 + 1e-3, torch.zeros_like(x), _std_normal_cdf((x - half - mean) / std))
    return (upper - lower).clamp(min=1e-12).log()


@torch.no_grad()
def elbo(denoiser: Denoiser, x0: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule | None = None,
         cfg: BoundConfig | None = None) -> torch.Tensor:
    """Per-sample evidence lower bound log p(x | y) >= ELBO, in nats. x0 [B, C, H, W] in [-1, 1] -> [B] float64."""
    require_pointwise(denoiser, "elbo()")
    cfg = cfg or BoundConfig()
    sched = sampling_scheduler(schedule or NoiseSchedule(), "ddpm")
    sched.set_timesteps(cfg.steps)
    ac = sched.alphas_cumprod.double()
    out = []
    for start in range(0, len(x0), cfg.batch_size):
        x, y = x0[start:start + cfg.batch_size].double(), labels[start:start + cfg.batch_size]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
        # 1. Prior term at the chain's top: KL(N(sqrt(abar) x, 1 - abar) || N(0, 1)), summed over pixels.
        a_top = ac[int(sched.timesteps[0])]
        kl_prior = 0.5 * ((1 - a_top) + a_top * x**2 - 1 - torch.log(1 - a_top)).flatten(1).sum(1)
        nll = kl_prior.clone()
        dims = x[0].numel()
        for t in sched.timesteps.tolist():
            eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x_t = ac[t].sqrt() * x + (1 - ac[t]).sqrt() * eps
            tt = torch.full((len(x),), t, dtype=torch.long)
            if hasattr(denoiser, "reset"):
                denoiser.reset()
            eps_hat = denoiser(x_t.float(), tt, y).double()
            a, b, sigma = transition(sched, t)
            # The model's step variance: the posterior's plus the eps predictor's residual variance, the
            # maximum-likelihood fixed variance of this step fitted on the batch (one scalar per step; see above).
            gamma = ((eps - eps_hat) ** 2).mean().clamp(min=cfg.min_gamma)
            var_p = sigma**2 + b**2 * gamma
            sq = (b**2 * (eps - eps_hat) ** 2).flatten(1).sum(1)
            if sigma > 0:
                # 2. Step term: KL(N(mu_q, sigma^2) || N(mu_p, var_p)) summed over pixels; mu_q - mu_p = b (eps - eps_hat).
                nll += sq / (2 * var_p) + dims * (0.5 * torch.log(var_p / sigma**2) + sigma**2 / (2 * var_p) - 0.5)
            else:
                # 3. Decoder at the last step: mean = the predicted x0, variance var_p.
                mean = a * x_t + b * eps_hat
                std = float(var_p.sqrt())
                if cfg.discrete:
                    nll -= discretized_gaussian_log_prob(x, mean, std).flatten(1).sum(1)
                else:
                    nll += sq / (2 * var_p) + dims * (math.log(std) + 0.5 * math.log(2 * math.pi))
        out.append(-nll)
    return torch.cat(out)


def mixture_elbo(elbos: torch.Tensor, log_priors: torch.Tensor) -> torch.Tensor:
    """log sum_i lambda_i(y) exp(ELBO_i): elbos [N_shards, B], log_priors [N_shards, B] (-inf: excluded) -> [B]."""
    return torch.logsumexp(elbos + log_priors, dim=0)


def bits_per_dim(elbos: torch.Tensor, dims: int) -> torch.Tensor:
    """Negative ELBO in bits per dimension, per sample."""
    return -elbos / (dims * math.log(2))
