"""Shard denoisers: class-conditional diffusers UNets, their presets, saving and loading.

A shard model is a `diffusers.UNet2DModel` with `num_class_embeds = num_classes + 1`: the extra embedding is the
*null label* used for label dropout during training, so every shard also samples unconditionally and supports
classifier-free guidance. Seen from the outside, every denoiser is a callable `(x_t, t, labels) -> eps`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

PresetName = Literal["tiny", "small", "base"]


class Denoiser(Protocol):
    """Anything that predicts the noise: `(x_t [B,C,H,W], t [B] long, labels [B] long) -> eps [B,C,H,W]`."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ModelConfig:
    """Architecture of one shard's UNet. Round-trips through JSON (`to_json` / `from_json`)."""

    image_size: int = 8
    channels: int = 1
    num_classes: int = 10
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    # Attention only pays off at 16x16 and above; at 4x4 it costs far more than it is worth (measured on the 2-core CPU).
    attention: bool = False
    norm_num_groups: int = 8

    @property
    def null_label(self) -> int:
        """Index of the label-dropout embedding: sampling with it is unconditional."""
        return self.num_classes

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        data["block_out_channels"] = tuple(data["block_out_channels"])
        return cls(**data)

    @classmethod
    def preset(cls, name: PresetName, **overrides) -> "ModelConfig":
        """`tiny` for tests (CPU, well under 0.2 s per step at batch 64), `small` for CPU benchmarks, `base` for GPU."""
        presets = {
            "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
            "small": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16),
            "base": dict(block_out_channels=(64, 128, 256), layers_per_block=2, attention=True, norm_num_groups=32),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def build_unet(cfg: ModelConfig, seed: int | None = None):
    """A fresh, randomly initialised class-conditional `UNet2DModel` for `cfg`.

    With `seed`, the initial weights come from a generator of their own (`init_weights`), not from torch's global
    RNG: shards built at the same time on several threads get the weights their seed says.
    """
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    # Attention in the deepest block only, and only when asked for (base preset on GPU).
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    unet = UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        num_class_embeds=cfg.num_classes + 1,
        norm_num_groups=cfg.norm_num_groups,
        add_attention=cfg.attention,
    )
    if seed is not None:
        init_weights(unet, torch.Generator().manual_seed(seed))
    return unet


@torch.no_grad()
def init_weights(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Re-draw every parameter as PyTorch's own `reset_parameters` would, from `generator`.

    Conv and Linear: weights Kaiming-uniform with a = sqrt(5), biases uniform(±1/sqrt(fan_in)); Embedding: N(0, 1);
    GroupNorm and LayerNorm: ones and zeros. Any other module with parameters is refused, so that a new layer type
    cannot silently fall back to the global RNG.
    """
    import math

    nn = torch.nn
    for name, m in module.named_modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, generator=generator)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        else:
            raise TypeError(f"init_weights: no rule for {type(m).__name__} ({name})")
    return module


class UNetDenoiser(torch.nn.Module):
    """Wraps a UNet as a `Denoiser`, with optional classifier-free guidance.

    Args:
        unet: a class-conditional `UNet2DModel` whose last class embedding is the null label.
        null_label: index of the null label.
        guidance_scale: 0 gives the plain conditional prediction; s > 0 gives
            `eps(x, null) + (1 + s) (eps(x, y) - eps(x, null))` for conditioned samples (null-label rows are left as is).
    """

    def __init__(self, unet, null_label: int, guidance_scale: float = 0.0):
        super().__init__()
        self.unet = unet
        self.null_label = null_label
        self.guidance_scale = guidance_scale

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale == 0.0:
            return self.unet(x_t, t, class_labels=labels).sample
        null = torch.full_like(labels, self.null_label)
        both = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        guided = uncond + (1.0 + self.guidance_scale) * (cond - uncond)
        return torch.where((labels == self.null_label).view(-1, 1, 1, 1), cond, guided)


def require_pointwise(denoiser, what: str) -> None:
    """`what` scores eps(x_t, t, y) one noised image at a time. A composite whose weights follow the trajectory
    (`path`) or a draw per sample (`prior`) has no such function: its likelihood is the mixture of its shards'
    (`likelihood.mixture_elbo`), scored shard by shard."""
    if not getattr(denoiser, "pointwise", True):
        raise ValueError(f"{what} needs a denoiser that is a function of (x_t, t, y); a {denoiser.estimator!r} "
                         "composite is not: score each shard and combine them with mixture_elbo")


def save_unet(unet, path: str | Path) -> Path:
    """Save in diffusers format (config.json + safetensors weights). Returns the folder."""
    path = Path(path)
    unet.save_pretrained(path, safe_serialization=True)
    return path


def load_unet(path: str | Path):
    """Load a UNet saved by `save_unet` from a local folder; safetensors only, never pickle.

    Built from its `config.json` and filled with `load_state_dict(strict=True)` — not `from_pretrained`, which
    builds the model inside diffusers' `no_init_weights` and accelerate's `init_empty_weights`: both patch torch
    for the whole process, so a UNet built at the same moment on another thread (shards train on threads) came
    out with uninitialised or meta-device weights ("Cannot copy out of meta tensor")."""
    import json

    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no safetensors weights in {path}")
    unet = UNet2DModel.from_config(json.loads((path / "config.json").read_text()))
    unet.load_state_dict(load_file(weights), strict=True)
    return unet


def model_config_of(unet) -> ModelConfig:
    """Recover the `ModelConfig` a UNet was built from (from its diffusers config)."""
    c = unet.config
    return ModelConfig(
        image_size=c.sample_size,
        channels=c.in_channels,
        num_classes=c.num_class_embeds - 1,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        attention="AttnDownBlock2D" in c.down_block_types,
        norm_num_groups=c.norm_num_groups,
    )
