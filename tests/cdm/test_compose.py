"""Composition on Gaussian shards with closed-form eps (no training): the estimators against the exact posterior."""

import pytest
import torch

from cdm.compose import CompositeDenoiser, RouterConfig, ShardStack, class_priors, train_router
from cdm.grouped_unet import GroupedUNet
from cdm.data import Dataset
from cdm.model import ModelConfig, UNetDenoiser, build_unet
from cdm.pipeline import CDMPipeline
from cdm.schedulers import NoiseSchedule, sampling_scheduler
from tests.cdm.gaussian import GaussianShard

STD = 0.3
# Shard 0 and shard 1: label 0 and label 1 each have their own mean per shard, in a 2x2 "image".
MEANS = [torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]),
         torch.tensor([[-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -1.0]])]
COUNTS = torch.tensor([[30.0, 10.0], [10.0, 50.0]])  # samples per (shard, label)


def gaussian_setup(counts=COUNTS, sampler="ddpm"):
    sched = sampling_scheduler(NoiseSchedule(), sampler)
    label_probs = counts / counts.sum(1, keepdim=True)
    shards = [GaussianShard(MEANS[i], STD, sched.alphas_cumprod, label_probs[i]) for i in range(len(counts))]
    return sched, shards, class_priors(counts)


def exact_posterior(shards, priors, x, t, labels):
    logp = torch.stack([s.log_density(x, t, labels) for s in shards], 1) + priors[:, labels].T.double().log()
    return logp.softmax(1).float()


def record_inputs(comp):
    seen, forward = [], comp.forward

    def spy(x, t, y):
        seen.append((x.clone(), t.clone()))
        return forward(x, t, y)

    comp.forward = spy
    return seen


def test_class_priors():
    p = class_priors(torch.tensor([[3.0, 0.0], [1.0, 4.0]]))
    assert torch.allclose(p, torch.tensor([[0.75, 0.0, 3 / 8], [0.25, 1.0, 5 / 8]]))


def test_path_weights_match_exact_posterior_along_ddpm_trajectory():
    sched, shards, priors = gaussian_setup()
    comp = CompositeDenoiser(shards, priors, "path", scheduler=sched)
    seen = record_inputs(comp)
    labels = torch.tensor([0] * 150 + [1] * 150 + [2] * 150)  # 2 = null label (unconditional)
    CDMPipeline(comp, sched, (1, 2, 2))(labels, 100, generator=torch.Generator().manual_seed(0))
    errors = torch.stack([(exact_posterior(shards, priors, x, t, labels) - w).abs().mean()
                          for (x, t), w in zip(seen, comp.trace)])
    assert errors.mean() < 0.02, errors
    assert errors.max() < 0.05
    # The estimator did real work: the final weights are decisive, not the prior.
    assert (comp.trace[-1].max(1).values > 0.99).float().mean() > 0.95


@pytest.mark.parametrize("estimator", ["path", "prior"])
def test_samples_reproduce_the_mixture(estimator):
    sched, shards, priors = gaussian_setup()
    comp = CompositeDenoiser(shards, priors, estimator, scheduler=sched, generator=torch.Generator().manual_seed(1))
    n = 600
    for label in (0, 1):
        labels = torch.full((n,), label)
        x = CDMPipeline(comp, sched, (1, 2, 2))(labels, 100, generator=torch.Generator().manual_seed(label), clip=False)
        x = x.flatten(1)
        d = torch.stack([(x - MEANS[i][label]).norm(dim=1) for i in range(2)], 1)
        comp_of = d.argmin(1)
        share0 = (comp_of == 0).float().mean()
        assert abs(share0 - priors[0, label]) < 0.06, (label, share0)
        for i in range(2):
            xi = x[comp_of == i]
            assert (xi.mean(0) - MEANS[i][label]).abs().max() < 0.1
            assert abs(xi.std(0).mean() - STD) < 0.05


def test_average_estimator_blurs_and_is_worse_than_path():
    sched, shards, priors = gaussian_setup()
    labels = torch.full((300,), 0)
    out = {}
    for est in ("average", "path"):
        comp = CompositeDenoiser(shards, priors, est, scheduler=sched)
        x = CDMPipeline(comp, sched, (1, 2, 2))(labels, 100, generator=torch.Generator().manual_seed(0)).flatten(1)
        d = torch.stack([(x - MEANS[i][0]).norm(dim=1) for i in range(2)], 1).min(1).values
        out[est] = d.mean()
    assert out["path"] < out["average"]


def test_subset_never_draws_from_an_excluded_shard():
    sched, shards, priors = gaussian_setup()
    for est in ("path", "prior", "average"):
        comp = CompositeDenoiser(shards, priors, est, scheduler=sched, subset=[1],
                                 generator=torch.Generator().manual_seed(0))
        labels = torch.tensor([0] * 100 + [1] * 100 + [2] * 100)
        x = CDMPipeline(comp, sched, (1, 2, 2))(labels, 50, generator=torch.Generator().manual_seed(0)).flatten(1)
        assert all(float(w[:, 0].abs().max()) == 0.0 for w in comp.trace), est
        for label in (0, 1):
            rows = x[labels == label]
            assert ((rows - MEANS[1][label]).norm(dim=1) < (rows - MEANS[0][label]).norm(dim=1)).all()


def test_zero_prior_shard_gets_zero_weight_for_that_label():
    counts = torch.tensor([[30.0, 0.0], [10.0, 50.0]])  # shard 0 holds no label 1
    sched, shards, priors = gaussian_setup(counts)
    comp = CompositeDenoiser(shards, priors, "path", scheduler=sched)
    labels = torch.tensor([1] * 50 + [0] * 50)
    CDMPipeline(comp, sched, (1, 2, 2))(labels, 50, generator=torch.Generator().manual_seed(0))
    assert all(float(w[:50, 0].max()) == 0.0 for w in comp.trace)
    assert float(comp.trace[-1][50:, 0].max()) > 0.5


def test_subset_without_the_label_is_a_clear_error():
    counts = torch.tensor([[30.0, 0.0], [10.0, 50.0]])
    sched, shards, priors = gaussian_setup(counts)
    comp = CompositeDenoiser(shards, priors, "average", subset=[0])
    with pytest.raises(ValueError, match="label"):
        comp(torch.randn(2, 1, 2, 2), torch.tensor([10, 10]), torch.tensor([1, 1]))


def test_router_approaches_the_exact_posterior():
    sched, shards, priors = gaussian_setup()
    g = torch.Generator().manual_seed(0)
    xs, ys, owner = [], [], []
    for i in range(2):
        for label in range(2):
            n = int(COUNTS[i, label]) * 40
            xs.append(MEANS[i][label] + STD * torch.randn(n, 4, generator=g))
            ys.append(torch.full((n,), label))
            owner.append(torch.full((n,), i))
    x = torch.cat(xs).view(-1, 1, 2, 2)
    data = Dataset(x, torch.cat(ys), [str(k) for k in range(len(x))])
    router, losses = train_router(data, torch.cat(owner), 2, num_classes=2,
                                  cfg=RouterConfig(steps=1500, batch_size=256, width=16, label_dropout=0.3))
    assert losses[-1] < losses[0]
    # Compare with the exact posterior on fresh noised samples.
    idx = torch.randint(0, len(data), (2000,), generator=g)
    t = torch.randint(0, 1000, (2000,), generator=g)
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * data.x[idx] + (1 - ac).sqrt() * torch.randn(data.x[idx].shape, generator=g)
    labels = torch.where(torch.rand(2000, generator=g) < 0.3, torch.full_like(data.y[idx], 2), data.y[idx])
    with torch.no_grad():
        w = router(x_t, t, labels).softmax(1)
    exact = exact_posterior(shards, priors, x_t, t, labels)
    assert (w - exact).abs().mean() < 0.05


def tiny_unets(n):
    cfg = ModelConfig.preset("tiny")
    unets = []
    for i in range(n):
        torch.manual_seed(i)
        unets.append(build_unet(cfg).eval())
    return cfg, unets


def test_batched_and_sparse_zero_reproduce_the_plain_loop():
    cfg, unets = tiny_unets(3)
    sched = sampling_scheduler(NoiseSchedule(), "ddpm")
    priors = class_priors(torch.tensor([[10.0] * 10, [5.0] * 10, [1.0] * 10]))
    labels = torch.tensor([0, 3, 7, 10, 10, 2])
    outs = []
    for shards, evaluation in (([UNetDenoiser(u, cfg.null_label) for u in unets], "loop"),
                               (ShardStack(unets), "batched")):
        comp = CompositeDenoiser(shards, priors, "path", scheduler=sched, evaluation=evaluation, threshold=0.0)
        outs.append(CDMPipeline(comp, sched, (1, 8, 8))(labels, 20, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_sparse_threshold_skips_evaluations():
    sched, shards, priors = gaussian_setup()
    labels = torch.tensor([0] * 100 + [1] * 100)
    dense = CompositeDenoiser(shards, priors, "path", scheduler=sched)
    sparse = CompositeDenoiser(shards, priors, "path", scheduler=sched, threshold=1e-3)
    xd = CDMPipeline(dense, sched, (1, 2, 2))(labels, 100, generator=torch.Generator().manual_seed(0))
    xs = CDMPipeline(sparse, sched, (1, 2, 2))(labels, 100, generator=torch.Generator().manual_seed(0))
    assert sparse.evaluations < 0.85 * dense.evaluations
    # Same samples for almost all trajectories (they only differ where a dropped shard mattered).
    close = ((xd - xs).flatten(1).abs().max(1).values < 1e-2).float().mean()
    assert close > 0.95


def test_path_with_a_deterministic_sampler_is_refused():
    sched, shards, priors = gaussian_setup(sampler="ddim")
    with pytest.raises(ValueError, match="stochastic sampler"):
        CompositeDenoiser(shards, priors, "path", scheduler=sched, eta=0.0)


def test_the_pipeline_refuses_an_eta_the_path_composite_does_not_score():
    sched, shards, priors = gaussian_setup(sampler="ddim")
    comp = CompositeDenoiser(shards, priors, "path", scheduler=sched, eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        CDMPipeline(comp, sched, (1, 2, 2))(torch.tensor([0, 1]), 10, eta=0.0)
    other = sampling_scheduler(NoiseSchedule(), "ddim")
    with pytest.raises(ValueError, match="one scheduler"):
        CDMPipeline(comp, other, (1, 2, 2))(torch.tensor([0, 1]), 10, eta=1.0)


def test_classifier_free_guidance_inside_a_composite_is_refused():
    cfg, unets = tiny_unets(2)
    priors = class_priors(torch.tensor([[10.0] * 10, [5.0] * 10]))
    guided = [UNetDenoiser(u, cfg.null_label, guidance_scale=2.0) for u in unets]
    with pytest.raises(ValueError, match="guidance"):
        CompositeDenoiser(guided, priors, "prior")
    # Also when the members come in a container that is not a list (a served composite's ShardSet).
    from cdm.platform.models.serving import ShardSet

    with pytest.raises(ValueError, match="guidance"):
        CompositeDenoiser(ShardSet(guided), priors, "prior", evaluation="auto")


def test_likelihood_and_membership_scores_refuse_a_trajectory_dependent_composite():
    """`path` weights follow the trajectory and `prior` draws a shard per sample: neither is an eps(x_t, t, y)
    a bound or a loss may score point by point (the mixture bound scores their shards)."""
    from cdm.likelihood import BoundConfig, elbo
    from cdm.metrics import denoising_loss

    cfg, unets = tiny_unets(2)
    priors = class_priors(torch.tensor([[10.0] * 10, [5.0] * 10]))
    shards = [UNetDenoiser(u, cfg.null_label) for u in unets]
    x, y = torch.zeros(2, 1, 8, 8), torch.tensor([0, 1])
    for estimator in ("path", "prior"):
        comp = CompositeDenoiser(shards, priors, estimator, scheduler=sampling_scheduler(NoiseSchedule()))
        with pytest.raises(ValueError, match="mixture_elbo"):
            elbo(comp, x, y, cfg=BoundConfig(steps=2))
        with pytest.raises(ValueError, match="mixture_elbo"):
            denoising_loss(comp, x, y, torch.linspace(0.99, 0.01, 1000), timesteps=(10,), repeats=1)
    average = CompositeDenoiser(shards, priors, "average")
    assert elbo(average, x, y, cfg=BoundConfig(steps=2)).shape == (2,)  # a pointwise composite is scored


def test_training_a_router_leaves_the_callers_random_state_alone():
    x = torch.randn(40, 1, 2, 2)
    data = Dataset(x, torch.randint(0, 2, (40,)), [str(k) for k in range(40)])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_router(data, torch.arange(40) % 2, 2, num_classes=2, cfg=RouterConfig(steps=2, width=4, seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_a_router_is_refused_for_a_subset_it_was_not_trained_on():
    sched, shards, priors = gaussian_setup()
    x = torch.randn(40, 1, 2, 2)
    data = Dataset(x, torch.randint(0, 2, (40,)), [str(k) for k in range(40)])
    both, _ = train_router(data, torch.arange(40) % 2, 2, num_classes=2, cfg=RouterConfig(steps=2, width=4))
    with pytest.raises(ValueError, match="router was trained on shards"):
        CompositeDenoiser(shards, priors, "router", router=both, subset=[0])
    only_0, _ = train_router(data, torch.zeros(40, dtype=torch.long), 2, num_classes=2,
                             cfg=RouterConfig(steps=2, width=4))
    CompositeDenoiser(shards, priors, "router", router=only_0, subset=[0])  # trained on exactly the allowed shard


def test_params_refuse_path_with_deterministic_ddim():
    from pydantic import ValidationError

    from cdm.config import ComposeParams

    with pytest.raises(ValidationError, match="stochastic"):
        ComposeParams(estimator="path", sampler="ddim", eta=0.0)


@pytest.mark.parametrize("estimator,threshold", [("prior", 0.0), ("path", 0.05), ("path", 0.0), ("average", 0.0)])
def test_grouped_evaluation_reproduces_the_plain_loop(estimator, threshold):
    cfg, unets = tiny_unets(3)
    sched = sampling_scheduler(NoiseSchedule(), "ddpm")
    priors = class_priors(torch.tensor([[10.0] * 10, [5.0] * 10, [1.0] * 10]))
    labels = torch.tensor([0, 3, 7, 10, 10, 2, 5, 10])
    outs, evaluations = [], []
    for shards, evaluation in (([UNetDenoiser(u, cfg.null_label) for u in unets], "loop"),
                               (ShardStack(unets), "grouped"), (GroupedUNet(unets), "grouped"),
                               (GroupedUNet(unets), "batched")):
        comp = CompositeDenoiser(shards, priors, estimator, scheduler=sched, evaluation=evaluation,
                                 threshold=threshold, generator=torch.Generator().manual_seed(1))
        outs.append(CDMPipeline(comp, sched, (1, 8, 8))(labels, 20, generator=torch.Generator().manual_seed(0)))
        evaluations.append(comp.evaluations)
    for out in outs[1:]:
        assert torch.allclose(outs[0], out, atol=1e-4)
    assert evaluations[0] == evaluations[1] == evaluations[2]  # the same (shard, sample) pairs, padding not counted


def test_auto_evaluation_groups_small_steps_and_loops_large_ones():
    cfg, unets = tiny_unets(3)
    priors = class_priors(torch.tensor([[10.0] * 10, [5.0] * 10, [1.0] * 10]))
    calls = {"grouped": 0, "single": 0}

    class Both:  # the shards one by one and as one grouped network, counting which is used
        def __init__(self):
            self.grouped = GroupedUNet(unets)
            self.single = [UNetDenoiser(u, cfg.null_label) for u in unets]

        def __len__(self):
            return len(unets)

        def __getitem__(self, i):
            calls["single"] += 1
            return self.single[i]

        def __call__(self, x_t, t, labels, index):
            calls["grouped"] += 1
            return self.grouped(x_t, t, labels, index=index)

    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 500)
    labels = torch.full((6,), 10)
    comp = CompositeDenoiser(Both(), priors, "average", evaluation="auto", grouped_rows=6)
    calls.update(grouped=0, single=0)  # construction looks at each member (guidance): count the evaluation only
    comp(x, t, labels)
    assert calls == {"grouped": 1, "single": 0}
    comp = CompositeDenoiser(Both(), priors, "average", evaluation="auto", grouped_rows=5)
    calls.update(grouped=1, single=0)
    comp(x, t, labels)
    assert calls == {"grouped": 1, "single": 3}
    with pytest.raises(ValueError, match="one by one"):
        CompositeDenoiser(GroupedUNet(unets), priors, "average", evaluation="auto")
    with pytest.raises(ValueError, match="needs a stack"):
        CompositeDenoiser(Both().single, priors, "average", evaluation="grouped")


def test_stratified_allocation_gives_each_label_its_shares_exactly():
    """The `prior` draw per label group by systematic sampling: counts within one of lambda_i(y) n_y, never a shard
    with lambda 0 (excluded or without the label), and each shard lambda-often in expectation."""
    from cdm.compose import stratified_choice

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]] * 100 + [[0.05, 0.05, 0.0, 0.9]] * 7)
    labels = torch.tensor([0] * 100 + [1] * 7)
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(4)
    for _ in range(200):
        c = stratified_choice(probs, labels, g)
        assert c[:100].bincount(minlength=4).tolist() == [50, 30, 20, 0]
        assert c[100:].bincount(minlength=4)[2] == 0 and (c[100:].bincount(minlength=4) - probs[100] * 7).abs().max() < 1
        total += c[100:].bincount(minlength=4)
    assert torch.allclose(total / (200 * 7), probs[100], atol=0.03)
    # Each position (not only each group) gets shard i lambda_i-often: the order is shuffled, not sorted by shard.
    first = torch.stack([stratified_choice(probs, labels, g)[0] for _ in range(400)]).bincount(minlength=4) / 400
    assert torch.allclose(first.float(), probs[0], atol=0.08), first
