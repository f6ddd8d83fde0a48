"""LoRA compartments: an adapter trains on the frozen shared initialization, is stored alone (a fraction of a
UNet's bytes), merges back into the base exactly, and a `prior` composite of adapters runs one network call per
step that reproduces the shard-by-shard loop."""

import torch

from cdm.adapters import AdapterConfig, merged, save_adapter, size
from cdm.compose import CompositeDenoiser, class_priors
from cdm.data import digits_dataset
from cdm.grouped_unet import GroupedUNet
from cdm.model import ModelConfig, UNetDenoiser, build_unet
from cdm.pipeline import CDMPipeline
from cdm.safetensors_io import state_sha256
from cdm.schedulers import NoiseSchedule, sampling_scheduler
from cdm.train import TrainConfig, train_shard

CFG = ModelConfig.preset("tiny")


def lora_shard(base_state, data, seed):
    cfg = TrainConfig(steps=40, batch_size=32, seed=seed, lr=1e-2, init_sha256=state_sha256(base_state),
                      adapter=AdapterConfig(rank=4, alpha=4))
    return train_shard(data, CFG, cfg, init_state=base_state, progress=False)


def test_an_adapter_trains_alone_and_merges_back_into_the_base(tmp_path):
    base = build_unet(CFG, seed=0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    result = lora_shard(base_state, digits_dataset().subset(range(128)), seed=1)
    assert sum(result.losses[-10:]) < sum(result.losses[:10])  # it learns
    assert result.adapter and all("lora_" in k for k in result.adapter)
    full = size(result.unet.state_dict())
    assert size(result.adapter)["bytes"] < 0.25 * full["bytes"]
    # The merged shard differs from the base (the adapter learned something) where adapters attach.
    changed = [k for k, v in result.unet.state_dict().items() if not torch.equal(v, base_state[k])]
    assert changed and all(any(t in k for t in ("conv1", "conv2", "time_emb_proj", "class_embedding"))
                           for k in changed)
    # Stored alone and merged into a fresh copy of the base: the same network as the trained one.
    folder = save_adapter(result.adapter, AdapterConfig(rank=4, alpha=4), tmp_path / "adapter")
    fresh = build_unet(CFG)
    fresh.load_state_dict(base_state)
    again = merged(fresh, folder)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 10])
    with torch.no_grad():
        assert torch.allclose(again(x, t, class_labels=y).sample, result.unet(x, t, class_labels=y).sample,
                              atol=1e-5)


def test_a_prior_composite_of_adapters_is_one_call_per_step_and_equals_the_loop():
    base_state = build_unet(CFG, seed=0).state_dict()
    data = digits_dataset()
    unets = [lora_shard(base_state, data.subset(range(64 * i, 64 * i + 64)), seed=i).unet for i in range(3)]
    priors = class_priors(torch.stack([data.subset(range(64 * i, 64 * i + 64)).class_counts(10)
                                       for i in range(3)]).float())
    sched = sampling_scheduler(NoiseSchedule(), "ddpm")
    labels = torch.tensor([0, 3, 7, 10, 10, 2, 5, 10])

    class Counted(GroupedUNet):
        calls = 0

        def forward(self, *args, **kwargs):
            Counted.calls += 1
            return super().forward(*args, **kwargs)

    outs = []
    for shards, evaluation in (([UNetDenoiser(u, CFG.null_label) for u in unets], "loop"),
                               (Counted(unets), "grouped")):
        comp = CompositeDenoiser(shards, priors, "prior", scheduler=sched, evaluation=evaluation,
                                 generator=torch.Generator().manual_seed(1))
        outs.append(CDMPipeline(comp, sched, (1, 8, 8))(labels, 20, generator=torch.Generator().manual_seed(0)))
    assert Counted.calls == 20  # one network call per denoising step, for every shard the batch draws
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
