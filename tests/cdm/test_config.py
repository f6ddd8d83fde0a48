import pytest

from cdm.config import ConfigError, Consumers, Params


def test_params_round_trip_and_clear_errors(tmp_path):
    p = tmp_path / "params.yaml"
    Params().dump(p)
    assert Params.load(p) == Params()
    p.write_text("train:\n  steps: -3\n")
    with pytest.raises(ConfigError, match="train.steps"):
        Params.load(p)
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Params.load(p)
    p.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="trian"):
        Params.load(p)
    with pytest.raises(ConfigError, match="not found"):
        Params.load(tmp_path / "missing.yaml")
    p.write_text("train:\n  compartment: lora\n")  # an adapter needs the shared base to adapt
    with pytest.raises(ConfigError, match="train.init: public"):
        Params.load(p)
    p.write_text("train:\n  compartment: lora\n  init: public\n  lora_rank: 4\n")
    assert Params.load(p).train.lora_rank == 4


def test_consumers_policy(tmp_path):
    p = tmp_path / "consumers.yaml"
    p.write_text("consumers:\n  a: {owners: [x, y]}\n  b: {licenses: [cc-by]}\n")
    c = Consumers.load(p)
    owners = {"x": "cc-by", "y": None, "z": "cc-by"}
    assert c.allowed_owners("a", owners) == ["x", "y"]
    assert c.allowed_owners("b", owners) == ["x", "z"]
    with pytest.raises(KeyError, match="unknown consumer"):
        c.allowed_owners("nobody", owners)
    p.write_text("consumers:\n  a: {owners: [x], licenses: [y]}\n")
    with pytest.raises(ConfigError, match="exactly one"):
        Consumers.load(p)
    p.write_text("consumers: 3\n")
    with pytest.raises(ConfigError):
        Consumers.load(p)
