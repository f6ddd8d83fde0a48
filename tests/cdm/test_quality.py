"""The quality instrument's parts: stratification, FID against torchmetrics, intervals and floors."""

import numpy as np
import pytest
import torch

from cdm.quality import (Interval, fid_interval, frechet_distance, paired_interval, ratio_interval, ratio_until, real_floor,
                         relative_half_width,
                         seed_floor, stratified_halves, stratified_labels, t_interval)


def test_stratified_labels_follow_the_proportions_exactly():
    labels = stratified_labels([30, 10, 0, 60], 20)
    assert torch.bincount(labels, minlength=4).tolist() == [6, 2, 0, 12]
    assert len(stratified_labels([1, 1, 1], 10)) == 10
    with pytest.raises(ValueError):
        stratified_labels([0, 0], 5)


def test_stratified_halves_are_disjoint_and_balanced():
    labels = torch.tensor([0] * 11 + [1] * 6 + [2] * 3)
    a, b = stratified_halves(labels)
    assert len(set(a.tolist()) & set(b.tolist())) == 0 and len(a) + len(b) == 20
    assert torch.bincount(labels[a]).tolist() == [6, 3, 2] and torch.bincount(labels[b]).tolist() == [5, 3, 1]


def test_frechet_distance_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(300, 8)), rng.normal(0.3, 1.2, size=(300, 8))

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x.double()

    fid = FrechetInceptionDistance(feature=Identity(), normalize=False)
    fid.update(torch.from_numpy(f1), real=True)
    fid.update(torch.from_numpy(f2), real=False)
    assert frechet_distance(f1, f2) == pytest.approx(float(fid.compute()), rel=1e-4)


def test_intervals_cover_and_ratios_are_paired():
    assert t_interval([1.0, 1.2, 0.8, 1.1, 0.9]).low < 1.0 < t_interval([1.0, 1.2, 0.8, 1.1, 0.9]).high
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(400, 4))
    a = [rng.normal(0.5, 1.0, size=(200, 4)) for _ in range(5)]
    same = fid_interval(ref, a)
    assert isinstance(same, Interval) and same.low <= same.mean <= same.high and same.n == 5
    r = ratio_interval(ref, a, a)
    assert r.mean == pytest.approx(1.0) and r.high - r.low < 1e-9  # a set against itself: no noise at all
    worse = [rng.normal(1.5, 1.0, size=(200, 4)) for _ in range(5)]
    assert ratio_interval(ref, worse, a).low > 2
    d = paired_interval(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0]))
    assert d.mean == pytest.approx(1.0) and d.high - d.low == pytest.approx(0.0)


def test_floors_measure_real_against_real_and_a_model_against_itself():
    rng = np.random.default_rng(2)
    ref, control = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    floor = real_floor(ref, control, np.repeat([0, 1], 250), 200)
    shifted = fid_interval(ref, [rng.normal(1.0, 1.0, size=(200, 4)) for _ in range(3)])
    assert 0 < floor.mean < shifted.low
    assert seed_floor([rng.normal(size=(200, 4)) for _ in range(3)]).n == 2


def test_fid_stays_finite_with_fewer_samples_than_features():
    rng = np.random.default_rng(3)
    value = frechet_distance(rng.normal(size=(40, 64)), rng.normal(size=(30, 64)))
    assert np.isfinite(value) and value > 0


def test_ratio_until_draws_sets_until_the_stated_precision():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(400, 4))
    draws = {"a": [], "b": []}

    def draw(which, shift):
        def f(seed):
            draws[which].append(seed)
            return np.random.default_rng([seed, int(shift * 10)]).normal(shift, 1.0, size=(100, 4))
        return f
    loose, fa, fb = ratio_until(ref, draw("a", 1.0), draw("b", 0.5), target=2.0, min_sets=3, max_sets=40)
    assert relative_half_width(loose) <= 2.0 and len(fa) == len(fb) == loose.n == 3
    tight, fa, fb = ratio_until(ref, draw("a", 1.0), draw("b", 0.5), target=0.05, min_sets=3, max_sets=40)
    # More sets were needed; the pairs share seeds and the interval reached the target (or the cap).
    assert tight.n > loose.n and draws["a"] == draws["b"]
    assert relative_half_width(tight) <= 0.05 or tight.n == 40
    capped, _, _ = ratio_until(ref, draw("a", 1.0), draw("b", 0.5), target=1e-6, min_sets=3, max_sets=9, step=4)
    assert capped.n == 9 and relative_half_width(capped) > 1e-6


def test_the_ratio_of_means_has_no_jensen_bias_and_its_interval_covers():
    from cdm.quality import ratio_of_means

    rng = np.random.default_rng(0)
    b = rng.uniform(5, 15, 8)
    r = ratio_of_means(1.2 * b, b)  # a constant ratio: exact, with no width
    assert r.mean == pytest.approx(1.2) and r.high - r.low == pytest.approx(0, abs=1e-12)
    hits, per_pair = [], []
    for _ in range(300):  # noisy pairs with true ratio of means 1.1: the interval covers it ~95% of the time
        b = rng.normal(10, 2, 6)
        a = rng.normal(11, 1, 6)
        i = ratio_of_means(a, b)
        hits.append(i.low <= 1.1 <= i.high)
        per_pair.append(np.mean(a / b))
    assert 0.9 <= np.mean(hits) <= 0.99
    assert np.mean(per_pair) > 1.1 * 1.02  # the mean of per-pair ratios is biased upwards (what this replaces)


def test_kid_is_zero_on_one_distribution_and_grows_with_a_shift():
    from cdm.quality import kid

    rng = np.random.default_rng(1)
    same = [kid(rng.normal(0, 1, (300, 16)), rng.normal(0, 1, (300, 16))) for _ in range(20)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(20) + 1e-6  # unbiased: centred on 0
    assert kid(rng.normal(0, 1, (300, 16)), rng.normal(0.5, 1, (300, 16))) > 10 * np.std(same)


def test_precision_and_recall_tell_a_collapsed_model_from_a_good_one():
    from cdm.quality import precision_recall

    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, (500, 8))
    good = precision_recall(real, rng.normal(0, 1, (500, 8)))
    collapsed = precision_recall(real, rng.normal(0, 0.2, (500, 8)))  # all samples near the mode: no diversity
    off = precision_recall(real, rng.normal(4, 1, (500, 8)))  # off the data manifold
    assert good[0] > 0.8 and good[1] > 0.8
    assert collapsed[0] > 0.9 and collapsed[1] < 0.3
    assert off[0] < 0.2


def test_the_paired_ratio_over_seeds_and_sets_covers_on_synthetic_data():
    """[seeds, sets] FIDs with a seed level (the model), a set level (the draw) shared by the pair (common random
    numbers) and a true ratio of means of 1.1: the delete-one-seed jackknife interval covers 1.1 at about its stated
    rate; the variance split recovers both levels; pairing the noise narrows the interval."""
    from cdm.quality import paired_ratio, variance_components

    rng = np.random.default_rng(0)
    hits, widths, unpaired = [], [], []
    for _ in range(400):
        seed_a, seed_b = rng.normal(0, 0.4, (8, 1)), rng.normal(0, 0.4, (8, 1))
        shared = rng.normal(0, 0.7, (8, 3))  # the set's noise, common to both models
        b = 10 + seed_b + shared + rng.normal(0, 0.1, (8, 3))
        a = 11 + seed_a + 1.1 * shared + rng.normal(0, 0.1, (8, 3))
        i = paired_ratio(a, b)
        hits.append(i.low <= 1.1 <= i.high)
        widths.append(i.high - i.low)
        j = paired_ratio(a, 10 + seed_b + rng.normal(0, 0.7, (8, 3)) + rng.normal(0, 0.1, (8, 3)))
        unpaired.append(j.high - j.low)
    assert 0.91 <= np.mean(hits) <= 0.99, np.mean(hits)
    assert np.mean(widths) < 0.8 * np.mean(unpaired)
    v = variance_components(10 + rng.normal(0, 0.5, (400, 1)) + rng.normal(0, 1.0, (400, 4)))
    assert v["seed"] == pytest.approx(0.25, rel=0.3) and v["set"] == pytest.approx(1.0, rel=0.1)


def test_the_floor_from_disjoint_sets_and_its_uncertainty_carried():
    from cdm.quality import disjoint_floor, minus, standardized_kid

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 250)
    means = rng.normal(0, 3, (4, 8))
    ref = means[labels] + rng.normal(0, 1, (1000, 8))
    pool_labels = np.repeat(np.arange(4), 400)
    pool = means[pool_labels] + rng.normal(0, 1, (1600, 8))
    floor = disjoint_floor(ref, pool, pool_labels, torch.as_tensor(np.repeat(np.arange(4), 100)))
    assert floor.n == 4 and floor.low < floor.mean < floor.high  # 400 per class / 100 per set: four disjoint sets
    with pytest.raises(ValueError):
        disjoint_floor(ref, pool[:50], pool_labels[:50], torch.as_tensor(np.repeat(np.arange(4), 100)))
    d = minus(Interval(5.0, 4.0, 6.0, 8), Interval(2.0, 1.25, 2.75, 4))
    assert d.mean == 3.0 and (d.high - d.low) / 2 == pytest.approx(np.hypot(1.0, 0.75))
    # Coverage against a floor of 2 sets: at least the stated 95% (Welch-Satterthwaite's t covered ~0.90 here).
    from cdm.quality import t_interval

    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(2000):
        d = minus(t_interval(rng.normal(5, 1, 8)), t_interval(rng.normal(2, 1, 2)))
        covered += d.low <= 3.0 <= d.high
    assert 0.95 <= covered / 2000 <= 0.995
    same = standardized_kid(ref, means[labels] + rng.normal(0, 1, (1000, 8)))
    shifted = standardized_kid(ref, means[labels] + rng.normal(0.5, 1, (1000, 8)))
    assert abs(same) < 0.2 * shifted
