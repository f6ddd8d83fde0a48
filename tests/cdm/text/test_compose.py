"""The guided composite on Gaussian compartments with closed-form eps (no training): both branches' weights and the
guided prediction against the exact mixture; the prompt prior's estimate of p(i | c)."""

import torch

from cdm.compose import class_priors
from cdm.schedulers import NoiseSchedule, sampling_scheduler
from cdm.text.compose import GuidedComposite, train_prompt_prior
from tests.cdm.gaussian import GaussianShard

STD = 0.3
# Two compartments; conditions 0 and 1 (the "prompts") have their own mean per compartment; 2 is the empty prompt.
MEANS = [torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]),
         torch.tensor([[-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -1.0]])]
COUNTS = torch.tensor([[30.0, 10.0], [10.0, 50.0]])  # captions of each condition in each compartment


def setup():
    sched = sampling_scheduler(NoiseSchedule(), "ddpm")
    probs = COUNTS / COUNTS.sum(1, keepdim=True)
    shards = [GaussianShard(MEANS[i], STD, sched.alphas_cumprod, probs[i]) for i in range(2)]
    return sched, shards, class_priors(COUNTS)


def exact_eps(shards, priors, x, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture's exact eps at (x, t | cond) and its exact posterior over compartments."""
    x = x.detach().double().requires_grad_(True)
    with torch.enable_grad():
        logp = torch.stack([s.log_density(x, t, cond) for s in shards], 1) + priors[:, cond].T.double().log()
        (score,) = torch.autograd.grad(torch.logsumexp(logp, 1).sum(), x)
    a = shards[0].ac[t].view(-1, *[1] * (x.dim() - 1))
    return (-(1 - a).sqrt() * score).float(), logp.detach().softmax(1).float()


def test_the_guided_path_composite_is_the_guided_mixture_in_closed_form():
    """eps = eps_u + s (eps_c - eps_u) of the two exact mixtures, along a guided DDPM trajectory; each branch's
    weights are its own exact posterior (the conditional's given the prompt, the unconditional's given none)."""
    sched, shards, priors = setup()
    s = 3.0
    cond = torch.tensor([0] * 100 + [1] * 100)
    null = torch.full_like(cond, 2)
    comp = GuidedComposite(shards, "path", scheduler=sched, guidance_scale=s)
    comp.start(priors[:, cond].T.log(), priors[:, null].T.log())
    sched.set_timesteps(100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(cond), 1, 2, 2), generator=g)
    eps_err, w_err = [], []
    for t in sched.timesteps:
        tb = torch.full((len(cond),), int(t), dtype=torch.long)
        eps = comp(x, tb, cond, null)
        ec, pc = exact_eps(shards, priors, x, tb, cond)
        eu, pu = exact_eps(shards, priors, x, tb, null)
        closed = eu + s * (ec - eu)
        eps_err.append(((eps - closed).norm() / closed.norm()).item())
        w_err.append(max((comp.trace[-1] - pc).abs().mean().item(), (comp.weights("u") - pu).abs().mean().item()))
        x = sched.step(eps, t, x, generator=g).prev_sample
    assert sum(eps_err) / len(eps_err) < 0.03 and max(eps_err) < 0.1, max(eps_err)
    assert sum(w_err) / len(w_err) < 0.02, w_err
    assert (comp.trace[-1].max(1).values > 0.99).float().mean() > 0.9  # decisive weights: real work was done


def test_average_guides_the_prior_weighted_mixtures_and_scale_one_skips_the_unconditional_branch():
    sched, shards, priors = setup()
    cond, null = torch.tensor([0, 1, 1]), torch.tensor([2, 2, 2])
    x, t = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 300, 50])
    comp = GuidedComposite(shards, "average", guidance_scale=2.5)
    comp.start(priors[:, cond].T.log(), priors[:, null].T.log())
    out = comp(x, t, cond, null)
    lc, lu = priors[:, cond].T, priors[:, null].T
    ec = sum(lc[:, i, None, None, None] * shards[i](x, t, cond) for i in range(2))
    eu = sum(lu[:, i, None, None, None] * shards[i](x, t, null) for i in range(2))
    assert torch.allclose(out, eu + 2.5 * (ec - eu), atol=1e-5)
    one = GuidedComposite(shards, "average", guidance_scale=1.0)
    one.start(priors[:, cond].T.log(), priors[:, null].T.log())
    assert torch.allclose(one(x, t, cond, null), ec, atol=1e-5) and one.evaluations == 6  # no unconditional call


def test_prior_draws_by_the_prompt_prior_and_never_an_excluded_compartment():
    sched, shards, priors = setup()
    cond = torch.tensor([1] * 4000)
    comp = GuidedComposite(shards, "prior", guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    comp.start(priors[:, cond].T.log(), priors[:, torch.full_like(cond, 2)].T.log())
    comp(torch.zeros(len(cond), 1, 2, 2), torch.full((len(cond),), 10), cond, torch.full_like(cond, 2))
    share = comp.trace[-1][:, 1].mean().item()
    assert abs(share - 50 / 60) < 0.03, share  # lambda_1(c = 1) = 50 / 60
    assert comp.evaluations == 2 * len(cond)  # one compartment, both branches: the cost of one guided model
    only0 = GuidedComposite(shards, "prior", guidance_scale=2.0, subset=[0])
    only0.start(priors[:, cond].T.log(), priors[:, torch.full_like(cond, 2)].T.log())
    only0(torch.zeros(len(cond), 1, 2, 2), torch.full((len(cond),), 10), cond, torch.full_like(cond, 2))
    assert (only0.trace[-1][:, 0] == 1).all()


def test_the_prompt_prior_estimates_each_captions_compartment_shares():
    """Owner 0 alone holds captions like A; owners 0 and 1 hold captions like B three to one: p(0 | A) ~ 1,
    p(0 | B) ~ 3/4, and the empty prompt gets the compartments' shares of all captions."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g) * 0.1 + torch.tensor([2.0] + [0.0] * 7)
    b = torch.randn(400, 8, generator=g) * 0.1 + torch.tensor([0.0, 2.0] + [0.0] * 6)
    features = torch.cat([a, b])
    owner = torch.cat([torch.zeros(200, dtype=torch.long), torch.zeros(300, dtype=torch.long),
                       torch.ones(100, dtype=torch.long)])
    prior = train_prompt_prior(features, owner, 2)
    p = prior(torch.cat([a[:50], b[:50], b[:1]]), torch.tensor([False] * 100 + [True])).exp()
    assert p[:50, 0].mean() > 0.95
    assert abs(p[50:100, 0].mean().item() - 0.75) < 0.05
    assert torch.allclose(p[100], torch.tensor([500 / 600, 100 / 600]), atol=1e-5)
