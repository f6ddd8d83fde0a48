import numpy as np
import pytest
import torch

from cdm.metrics import auc, memorization, membership_auc


def test_auc():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(0)
    assert abs(auc(rng.normal(size=4000), rng.normal(size=4000)) - 0.5) < 0.03
    with pytest.raises(ValueError):
        auc([], [1])


def test_membership_auc_lower_loss_is_member():
    assert membership_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.6])) == 1.0


def test_memorization_flags_copies_only():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 1, 8, 8, generator=g)
    copies = train[:10] + 0.01 * torch.randn(10, 1, 8, 8, generator=g)
    fresh = torch.randn(30, 1, 8, 8, generator=g)
    m = memorization(torch.cat([copies, fresh]), train)
    assert m["flags"][:10].all() and not m["flags"][10:].any()
    assert m["share"] == pytest.approx(0.25)
    assert m["nearest"][:10].tolist() == list(range(10))


def test_membership_is_met_only_when_the_attack_fired_before():
    from cdm.metrics import membership_verdict

    assert membership_verdict(0.95, 0.52, 100, 100).startswith("met")
    # No power: 0.58 on 40 + 40 images has an interval that holds 0.5 (on 1,000 + 1,000 it would fire).
    assert membership_verdict(0.58, 0.50, 40, 40).startswith("inconclusive")
    assert membership_verdict(0.58, 0.50, 1000, 1000).startswith("met")
    assert membership_verdict(0.95, 0.80, 100, 100).startswith("failed")
    # Fired, and "cannot tell" after, but the AUC barely moved: no evidence that the revocation changed anything.
    assert membership_verdict(0.62, 0.55, 150, 150).startswith("inconclusive")
    assert membership_verdict(None, 0.5, 100, 100) == "not measured"


def test_the_membership_verdict_reads_against_the_negative_control_on_the_same_images():
    """The owner's images resemble the remaining owners' (same writers): a model that never saw them scores AUC 0.62
    on them too. Read against 0.5 that is "failed"; against the control it is what forgetting looks like; and an
    attack that was at the control's level before had no power."""
    from cdm.metrics import membership_verdict

    assert membership_verdict(0.90, 0.62, 300, 300).startswith("failed")
    assert membership_verdict(0.90, 0.62, 300, 300, auc_control=0.62).startswith("met")
    assert membership_verdict(0.90, 0.80, 300, 300, auc_control=0.62).startswith("failed")
    assert membership_verdict(0.64, 0.62, 300, 300, auc_control=0.62).startswith("inconclusive")


def test_the_auc_interval_covers_the_truth_at_its_stated_rate():
    """Hanley-McNeil's interval on two normal score sets with a known AUC (Phi(d / sqrt 2)) covers it in ~95% of
    draws, and an attack on identical distributions is called "cannot tell" about as often."""
    from scipy import stats

    from cdm.metrics import auc_interval

    rng = np.random.default_rng(0)
    for d, n in ((0.0, 60), (0.8, 60), (0.8, 300), (3.0, 24)):
        truth = float(stats.norm.cdf(d / np.sqrt(2)))
        hits = [(i.low <= truth <= i.high) for i in (auc_interval(rng.normal(d, 1, n), rng.normal(0, 1, n))
                                                      for _ in range(400))]
        assert 0.9 <= np.mean(hits) <= 0.995, (d, n, np.mean(hits))


def test_auc_bounds_at_one_and_zero_are_not_zero_width():
    """24 vs 24 perfectly separated scores: the Wald interval said "1.000 [1.000, 1.000]"; the score interval keeps
    a lower bound below 1 (and above 0.5: the attack fired), and mirrors at 0."""
    from cdm.metrics import auc_interval, auc_interval_of

    top = auc_interval(np.arange(24) + 100.0, np.arange(24.0))
    assert top.mean == 1.0 and top.high == 1.0 and 0.5 < top.low < 0.97
    bottom = auc_interval_of(0.0, 24, 24)
    assert bottom.low == 0.0 and bottom.high == pytest.approx(1 - top.low, abs=1e-6)
    assert auc_interval_of(1.0, 500, 500).low > top.low  # more items, a tighter bound


def test_the_membership_score_separates_an_overfitted_denoiser():
    """A denoiser that knows its members' noise-free images exactly has low loss on them: the attack must fire."""
    from cdm.metrics import membership_loss

    g = torch.Generator().manual_seed(0)
    members, others = torch.randn(16, 1, 4, 4, generator=g), torch.randn(16, 1, 4, 4, generator=g)
    ac = torch.linspace(0.9999, 0.01, 1000)

    class Memorizer(torch.nn.Module):  # eps of the nearest member: exact on members, wrong elsewhere
        def forward(self, x_t, t, labels):
            a = ac[t].view(-1, 1, 1, 1)
            eps = (x_t[:, None] - a.sqrt()[:, None] * members[None]) / (1 - a).sqrt()[:, None]
            return eps.gather(1, eps.flatten(2).pow(2).sum(2).argmin(1).view(-1, 1, 1, 1, 1)
                              .expand(-1, 1, *eps.shape[2:])).squeeze(1)

    loss_m = membership_loss(Memorizer(), members, torch.zeros(16, dtype=torch.long), ac)
    loss_o = membership_loss(Memorizer(), others, torch.zeros(16, dtype=torch.long), ac)
    assert membership_auc(loss_m, loss_o) > 0.9


def test_the_memorization_check_fires_its_control_and_says_when_it_is_blind():
    """On distinct digits the planted near-copies are found (the control fires) and copies are counted with a Wilson
    interval; on a training set where every image is duplicated the nearest and second-nearest are the same image,
    the detector cannot see a copy (d1/d2 is undefined) and the control says so instead of reporting a clean 0."""
    from cdm.data import digits_dataset
    from cdm.metrics import memorization_check

    d = digits_dataset()
    train = d.x[:600]
    copies = memorization_check(train[:100], train)
    assert copies["fired"] and copies["share"] == 1.0 and copies["low"] < 1.0
    fresh = memorization_check(d.x[1200:1400], train)
    assert fresh["fired"] and fresh["share"] < 0.05 and fresh["high"] > fresh["share"]
    blind = memorization_check(d.x[1200:1400], torch.cat([train, train]))
    assert not blind["fired"] and blind["control_found"] < 0.9
