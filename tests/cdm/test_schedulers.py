import pytest
import torch

from cdm.schedulers import NoiseSchedule, sampling_scheduler, transition


@pytest.mark.parametrize("sampler,eta", [("ddpm", 1.0), ("ddim", 0.0), ("ddim", 1.0), ("ddim", 0.5)])
def test_transition_matches_the_scheduler_step(sampler, eta):
    sched = sampling_scheduler(NoiseSchedule(), sampler)
    sched.set_timesteps(50)
    x, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    for t in sched.timesteps[::7].tolist() + [int(sched.timesteps[-1])]:
        g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        out = sched.step(eps, t, x, generator=g1, **kwargs).prev_sample
        a, b, sigma = transition(sched, t, eta)
        z = torch.randn(x.shape, generator=g2)
        assert torch.allclose(out, a * x + b * eps + sigma * z, atol=1e-4), t


def test_unknown_sampler():
    with pytest.raises(ValueError, match="sampler"):
        sampling_scheduler(NoiseSchedule(), "euler")
