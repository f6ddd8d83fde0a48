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
