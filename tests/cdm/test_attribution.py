import pytest
import torch

from cdm.attribution import attribute, owner_matrix


def test_shared_shard_split_by_contribution():
    owners, m = owner_matrix([{"a": 10}, {"b": 30, "c": 10}])
    assert owners == ["a", "b", "c"]
    out = attribute(torch.tensor([[0.2, 0.8], [1.0, 0.0]]), [{"a": 10}, {"b": 30, "c": 10}])
    assert out[0] == pytest.approx({"a": 0.2, "b": 0.6, "c": 0.2})
    assert out[1] == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.0})
