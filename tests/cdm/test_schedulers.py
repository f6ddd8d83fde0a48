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


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_transition_follows_the_ddpm_variance_type(variance_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type=variance_type)
    sched.set_timesteps(20)
    x, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    for t in sched.timesteps.tolist():
        g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        out = sched.step(eps, t, x, generator=g1).prev_sample
        a, b, sigma = transition(sched, t)
        z = torch.randn(x.shape, generator=g2)
        assert torch.allclose(out, a * x + b * eps + sigma * z, atol=1e-4), (variance_type, t)


REFUSED = [(dict(prediction_type="v_prediction"), "epsilon"), (dict(prediction_type="sample"), "epsilon"),
           (dict(clip_sample=True), "non-linear"), (dict(thresholding=True), "non-linear")]


@pytest.mark.parametrize("sampler,kwargs,match", [("ddpm", *r) for r in REFUSED] + [("ddim", *r) for r in REFUSED]
                         + [("ddpm", dict(variance_type="learned_range"), "variance_type")])
def test_transition_refuses_steps_it_cannot_describe(sampler, kwargs, match):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    sched = cls(beta_schedule="squaredcos_cap_v2", **{"clip_sample": False, **kwargs})
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match=match):
        transition(sched, int(sched.timesteps[0]))
