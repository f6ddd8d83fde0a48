import pytest
import torch

from cdm.grouped_unet import GroupedUNet
from cdm.model import ModelConfig, build_unet


def distinct_unets(cfg: ModelConfig, n: int) -> list:
    """n UNets whose every parameter differs (norm scales and biases included, which start as ones and zeros)."""
    unets = [build_unet(cfg, seed=s).eval() for s in range(n)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for u in unets:
            for p in u.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unets


@pytest.mark.parametrize("attention,size", [(False, 8), (True, 8)])
def test_the_grouped_network_computes_each_shards_own_unet(attention, size):
    cfg = ModelConfig.preset("tiny", attention=attention, image_size=size)
    unets = distinct_unets(cfg, 3)
    grouped = GroupedUNet(unets)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 1, size, size, generator=g)  # a batch per shard
    t = torch.randint(0, 1000, (3, 4), generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (3, 4), generator=g)
    with torch.no_grad():
        own = torch.stack([u(x[k], t[k], class_labels=y[k]).sample for k, u in enumerate(unets)])
        assert torch.allclose(grouped(x, t, y), own, atol=1e-5)
        # One batch for every shard, and a selection of shards in a chosen order.
        shared = torch.stack([u(x[0], t[0], class_labels=y[0]).sample for u in unets])
        assert torch.allclose(grouped(x[0], t[0], y[0]), shared, atol=1e-5)
        index = torch.tensor([2, 0])
        assert torch.allclose(grouped(x[index], t[index], y[index], index=index), own[index], atol=1e-5)
    # Perturbing one shard's weights changes that shard's output only (the blocks do not mix).
    with torch.no_grad():
        unets[1].conv_out.bias.add_(1.0)
        moved = GroupedUNet(unets)(x, t, y)
    assert torch.allclose(moved[[0, 2]], own[[0, 2]], atol=1e-5)
    assert (moved[1] - own[1]).abs().min() > 0.5


def test_an_architecture_the_grouped_network_does_not_reproduce_is_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, num_class_embeds=11,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       resnet_time_scale_shift="scale_shift", add_attention=False)
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        GroupedUNet([unet])


def test_the_grouped_network_compiles_as_one_graph():
    """`network` is what a GPU captures as a CUDA graph: it must trace whole (no graph break) and compute the same."""
    unets = distinct_unets(ModelConfig.preset("tiny"), 2)
    grouped = GroupedUNet(unets)
    x, t, y = torch.randn(2, 3, 1, 8, 8), torch.full((2, 3), 400), torch.full((2, 3), 10)
    eager = grouped(x, t, y)
    grouped.network = torch.compile(grouped.network, backend="aot_eager", fullgraph=True)
    assert torch.allclose(grouped(x, t, y), eager, atol=1e-6)
