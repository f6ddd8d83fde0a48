"""Real data: two tiny shards on the digits (labels 0-4 and 5-9), composed unconditionally."""

import torch

from cdm.compose import CompositeDenoiser, ShardStack, class_priors
from cdm.metrics import fid_kid
from cdm.model import ModelConfig, UNetDenoiser
from cdm.pipeline import CDMPipeline
from cdm.schedulers import NoiseSchedule, sampling_scheduler

CFG = ModelConfig.preset("tiny")


def test_feature_net_classifies_heldout_digits(digits_split, digits_feature_net):
    owners, _ = digits_split  # the net never saw these (trained on the held-out digits_split)
    acc = (digits_feature_net.predict(owners.x) == owners.y).float().mean()
    assert acc > 0.9, acc


def test_fid_separates_real_from_noise(digits_split, digits_feature_net):
    owners, _ = digits_split
    perm = torch.randperm(len(owners), generator=torch.Generator().manual_seed(0))
    a, b = owners.x[perm[:600]], owners.x[perm[600:1200]]
    noise = torch.rand(600, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real_real, real_noise = fid_kid(a, b, digits_feature_net), fid_kid(a, noise, digits_feature_net)
    assert real_real.fid * 20 < real_noise.fid, (real_real, real_noise)
    assert real_real.kid_mean < real_noise.kid_mean
    assert real_real.feature_sha256 == digits_feature_net.sha256() and len(real_real.feature_sha256) == 64


def test_unconditional_composite_attributes_samples_to_the_right_shard(by_class_shards, digits_feature_net):
    unets, (low, high) = by_class_shards
    counts = torch.stack([low.class_counts(10), high.class_counts(10)]).float()
    priors = class_priors(counts)
    sched = sampling_scheduler(NoiseSchedule(), "ddpm")
    comp = CompositeDenoiser([UNetDenoiser(u, CFG.null_label) for u in unets], priors, "path", scheduler=sched)
    labels = torch.full((200,), CFG.null_label)  # unconditional: only the estimator can separate the shards
    x = CDMPipeline(comp, sched, (1, 8, 8))(labels, 100, generator=torch.Generator().manual_seed(0))
    read = digits_feature_net.predict(x)
    w = comp.attribution()["final"]
    reads_high = read >= 5
    assert 0.2 < reads_high.float().mean() < 0.8  # both shards contribute
    right_high = (w[reads_high, 1] > 0.9).float().mean()
    right_low = (w[~reads_high, 0] > 0.9).float().mean()
    # Chance (weights unrelated to the digit) is ~0.5; the feature net also misreads some generated digits, so the
    # bar is 0.85, not 1 (measured 0.88 and 0.92 on the shards these fixtures train).
    assert right_high > 0.85 and right_low > 0.85, (right_high, right_low)


def test_batched_composite_matches_loop_on_trained_shards(by_class_shards):
    unets, (low, high) = by_class_shards
    priors = class_priors(torch.stack([low.class_counts(10), high.class_counts(10)]).float())
    sched = sampling_scheduler(NoiseSchedule(), "ddpm")
    labels = torch.tensor([0, 4, 5, 9, 10, 10, 10, 10])
    outs = []
    for shards, ev in (([UNetDenoiser(u, CFG.null_label) for u in unets], "loop"), (ShardStack(unets), "batched")):
        comp = CompositeDenoiser(shards, priors, "path", scheduler=sched, evaluation=ev)
        outs.append(CDMPipeline(comp, sched, (1, 8, 8))(labels, 50, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(outs[0], outs[1], atol=1e-3)
