import json

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
