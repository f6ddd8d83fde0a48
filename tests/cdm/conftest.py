"""Trained models on the bundled digits, shared by the core tests that need real data (session scope: trained once)."""

import pytest

from cdm.model import ModelConfig

CFG = ModelConfig.preset("tiny")
STEPS = 300  # per model: enough for digit-like samples on 2 CPU cores (~25 s each)


@pytest.fixture(scope="session")
def digits_split():
    """(owners' data, held-out data) of the bundled digits."""
    from cdm.data import digits_dataset, digits_uint8, heldout_split

    _, labels = digits_uint8()
    own, held = heldout_split(labels)
    return digits_dataset(own), digits_dataset(held)


@pytest.fixture(scope="session")
def digits_feature_net(digits_split):
    from cdm.metrics import train_feature_net

    return train_feature_net(digits_split[1], steps=600)


@pytest.fixture(scope="session")
def by_class_shards(digits_split):
    """Two shards of the owners' data, labels 0-4 and 5-9: ([unet_low, unet_high], (data_low, data_high))."""
    from cdm.train import TrainConfig, train_shard

    owners = digits_split[0]
    low = owners.subset((owners.y < 5).nonzero().flatten())
    high = owners.subset((owners.y >= 5).nonzero().flatten())
    cfg = TrainConfig(steps=STEPS, batch_size=64, seed=0)
    return [train_shard(d, CFG, cfg, progress=False).unet for d in (low, high)], (low, high)


@pytest.fixture(scope="session")
def digits_paragon(digits_split):
    """The paragon: one UNet on all owners' data, trained like one shard."""
    from cdm.train import TrainConfig, train_shard

    return train_shard(digits_split[0], CFG, TrainConfig(steps=STEPS, batch_size=64, seed=0), progress=False).unet
