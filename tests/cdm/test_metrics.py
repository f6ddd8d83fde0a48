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
    from cdm.metrics import MEMBERSHIP_POWER, membership_verdict

    assert membership_verdict(0.95, 0.52, 0.6).startswith("met")
    assert membership_verdict(0.55, 0.50, 0.6).startswith("inconclusive")  # no power: "after" proves nothing
    assert membership_verdict(0.95, 0.80, 0.6).startswith("failed")
    assert membership_verdict(None, 0.5, 0.6) == "not measured" and MEMBERSHIP_POWER == 0.7


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
