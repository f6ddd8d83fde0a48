import json
import threading

import pytest
import torch

from cdm.model import ModelConfig, build_unet, save_unet
from cdm.platform.serving import build_composite
from cdm.platform.weights import WEIGHTS_FILE, load_verified_unet, sha256_file


def test_weights_whose_hash_differs_from_the_record_are_refused(tmp_path):
    torch.manual_seed(0)
    folder = save_unet(build_unet(ModelConfig.preset("tiny")), tmp_path / "unet")
    good = sha256_file(folder / WEIGHTS_FILE)
    assert load_verified_unet(folder, good) is not None
    with pytest.raises(ValueError, match="does not match"):
        load_verified_unet(folder, "0" * 64)
    (folder / WEIGHTS_FILE).unlink()
    torch.save({}, folder / "diffusion_pytorch_model.bin")  # a pickle file is never loaded
    with pytest.raises(ValueError, match="safetensors only"):
        load_verified_unet(folder, None)


def test_consumer_subset_only_keeps_shards_made_solely_of_allowed_owners():
    cfg = ModelConfig.preset("tiny")
    unets = [build_unet(cfg).eval() for _ in range(3)]
    spec = {"shards": [{"owners": {"a": 5}, "class_counts": [1] * 10}, {"owners": {"a": 1, "b": 1},
                                                                          "class_counts": [1] * 10},
                       {"owners": {"c": 3}, "class_counts": [1] * 10}],
            "model_config": json.loads(cfg.to_json()), "sampler": "ddpm", "estimator": "path", "eta": 1.0,
            "num_inference_steps": 5}
    _, _, subset = build_composite(spec, unets, allowed_owner_keys=["a", "c"])
    assert subset == [0, 2]  # the shard shared with b is excluded
    with pytest.raises(PermissionError):
        build_composite(spec, unets, allowed_owner_keys=["b"])


@pytest.mark.parametrize("evaluation", ["loop", "auto"])
def test_a_served_composite_loads_only_the_shards_a_request_uses(evaluation):
    """A composite of many shards serves a consumer's subset, or `prior` draws, without loading the others;
    a shard is loaded once and kept for the next requests."""
    from cdm.platform.serving import LazyShard, ShardSet, sample_composite

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    unets = [build_unet(cfg).eval() for _ in range(4)]
    loads: list[int] = []

    def loader(i):
        return lambda: (loads.append(i), unets[i])[1]

    shards = [LazyShard(loader(i), cfg.null_label) for i in range(4)]
    if evaluation == "auto":  # as the pyfunc serves: small steps in one grouped call over the needed shards
        shards = ShardSet(shards)
    spec = {"shards": [{"owners": {k: 5}, "class_counts": [1] * 10} for k in "abcd"],
            "model_config": json.loads(cfg.to_json()), "sampler": "ddpm", "estimator": "prior", "eta": 1.0,
            "num_inference_steps": 3}
    comp, sampler, subset = build_composite(spec, shards, allowed_owner_keys=["c"], evaluation=evaluation)
    assert loads == [] and subset == [2]  # building the composite loads nothing
    sample_composite(comp, sampler, spec, torch.full((3,), 10), seed=0)
    assert loads == [2]
    comp, sampler, _ = build_composite(spec, shards, seed=1, evaluation=evaluation)
    sample_composite(comp, sampler, spec, torch.full((1,), 10), seed=1)  # one sample: one shard drawn
    assert len(loads) <= 2 and len(set(loads)) == len(loads)  # at most the drawn one more, none twice
    before = list(loads)
    again = build_composite(spec, shards, allowed_owner_keys=["c"], evaluation=evaluation)
    sample_composite(*again[:2], spec, torch.full((2,), 10), 0)
    assert loads == before  # kept, not loaded again


def test_a_request_abandons_its_trajectory_as_soon_as_a_shard_it_uses_is_revoked(monkeypatch):
    """A revocation accepted while a request samples is seen within the request (the registry is asked every
    CHECK_EVERY_SECONDS), not after the trajectory: the request starts again without the shard and answers with
    the others only."""
    from cdm.platform import serving

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    unets = [build_unet(cfg).eval() for _ in range(2)]
    steps: list[int] = []

    class Counting(serving.ShardSet):  # counts the network calls (one per step: the shards' grouped network)
        def __call__(self, *args, **kwargs):
            steps.append(1)
            return super().__call__(*args, **kwargs)

    class Watch:  # the registry's answer: shard 0 revoked from the second look on
        looks = 0

        def check(self):
            Watch.looks += 1
            return {0} if Watch.looks > 1 else set()

    model = serving.CompositeModel()
    model.spec = {"shards": [{"id": f"s{i}", "owners": {k: 5}, "class_counts": [1] * 10} for i, k in enumerate("ab")],
                  "model_config": json.loads(cfg.to_json()), "sampler": "ddpm", "estimator": "average",
                  "eta": 1.0, "num_inference_steps": 50, "threshold": 0.0}
    model.watch, model._dropped, model.router, model._lock = Watch(), set(), None, threading.Lock()
    model.shards = Counting([serving.LazyShard(lambda u=u: u, cfg.null_label) for u in unets])
    monkeypatch.setattr(serving, "CHECK_EVERY_SECONDS", 0.0)
    out = model.predict(None, {"n": 2, "seed": 0})
    assert out["shards"] == ["s1"] and out["images"].shape == (2, 1, 8, 8)
    # The first trajectory stopped after its first step (checked then), the second ran its 50 steps: 51 network
    # calls, not the 100 of a request that finishes a trajectory before looking.
    assert len(steps) == 1 + 50, len(steps)
    with pytest.raises(PermissionError):
        model.shards[0].denoiser()  # the revoked shard's weights are gone from this process
    # A request that never used the revoked shard (a consumer allowed only b's) is not started again.
    Watch.looks, steps[:] = 0, []
    model.watch, model._dropped = Watch(), set()
    model.shards = Counting([serving.LazyShard(lambda u=u: u, cfg.null_label) for u in unets])
    out = model.predict(None, {"n": 2, "seed": 0, "allowed_owners": ["b"]})
    assert out["shards"] == ["s1"] and len(steps) == 50
