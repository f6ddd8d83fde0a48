"""The likelihood bound against closed forms: Gaussian data whose exact density and exact eps are known."""

import math

import pytest
import torch

from cdm.likelihood import BINS, BoundConfig, discretized_gaussian_log_prob, elbo, mixture_elbo
from cdm.schedulers import NoiseSchedule, sampling_scheduler
from tests.cdm.gaussian import GaussianShard

STD = 0.3
MEANS = [torch.tensor([[0.5, -0.5, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]]),
         torch.tensor([[-0.6, 0.4, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]])]


def shard(i):
    return GaussianShard(MEANS[i], STD, sampling_scheduler(NoiseSchedule()).alphas_cumprod, torch.tensor([1.0]))


def data(i, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (MEANS[i][0] + STD * torch.randn(n, 4, generator=g)).view(-1, 1, 2, 2)


def log_normal(x, mean):
    x = x.flatten(1).double()
    return -0.5 * ((x - mean.double()) ** 2).sum(1) / STD**2 - 2 * math.log(2 * math.pi * STD**2)


@pytest.mark.parametrize("steps", [50, 100, 250])
def test_the_bound_holds_and_is_tight_for_an_exact_denoiser(steps):
    x = data(0)
    y = torch.zeros(len(x), dtype=torch.long)
    gap = log_normal(x, MEANS[0][0]) - elbo(shard(0), x, y, cfg=BoundConfig(steps=steps, discrete=False))
    se = float(gap.std() / math.sqrt(len(gap)))
    # Valid (log p >= ELBO up to Monte Carlo noise) and tight (within 0.5 nats of 4 dims).
    assert float(gap.mean()) > -3 * se and float(gap.mean()) < 0.5 + 3 * se, (float(gap.mean()), se)


def test_a_wrong_denoiser_gets_a_worse_bound():
    x = data(0)
    y = torch.zeros(len(x), dtype=torch.long)
    cfg = BoundConfig(steps=100, discrete=False)
    right, wrong = elbo(shard(0), x, y, cfg=cfg), elbo(shard(1), x, y, cfg=cfg)
    assert float((right - wrong).mean()) > 5  # same noise draws: the difference is almost noise-free


def test_the_mixture_bound_matches_the_mixture_density():
    x = torch.cat([data(0, 300, 1), data(1, 100, 2)])
    y = torch.zeros(len(x), dtype=torch.long)
    cfg = BoundConfig(steps=100, discrete=False)
    elbos = torch.stack([elbo(shard(i), x, y, cfg=cfg) for i in range(2)])
    lam = torch.tensor([0.75, 0.25], dtype=torch.float64)
    mix = mixture_elbo(elbos, lam.log()[:, None].expand(2, len(x)))
    exact = torch.logsumexp(torch.stack([log_normal(x, MEANS[i][0]) for i in range(2)]) + lam.log()[:, None], 0)
    gap = exact - mix
    se = float(gap.std() / math.sqrt(len(gap)))
    assert -3 * se < float(gap.mean()) < 0.5 + 3 * se
    # The mixture describes the mixed data better than either shard alone.
    assert float(mix.mean()) > float(elbos.mean(1).max()) + 1


def test_the_discretized_decoder_is_a_distribution_over_the_bins():
    levels = torch.linspace(-1, 1, BINS, dtype=torch.float64)
    for mean, std in ((0.0, 0.05), (0.97, 0.01), (-1.2, 0.3)):
        p = discretized_gaussian_log_prob(levels, torch.full_like(levels, mean), std).exp()
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
