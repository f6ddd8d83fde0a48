"""LoRA compartments: an owner's compartment as a low-rank adapter on the frozen shared initialization (peft, the
way diffusers fine-tunes a UNet), instead of a full copy of the UNet.

    train   attach(base, cfg) -> a peft model whose only trainable weights are the adapter's
    store   adapter_state(model) -> {name: tensor}, written as `adapter_model.safetensors` + `adapter_config.json`
            (`save_adapter`): a few percent of a UNet's bytes, and nothing of the base
    serve   merged(base, folder) -> a plain `UNet2DModel` with base + B A folded into its weights, so a composite of
            LoRA compartments runs through the same grouped network (one forward call per step) as full shards

The base holds no owner's data (it is trained on public samples only), so forgetting an owner deletes their adapter
and never touches it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class AdapterConfig:
    rank: int = 8
    alpha: int = 8  # the update is scaled by alpha / rank: 1 at the defaults, so the rank can change alone
    # Every convolution of the residual blocks, their timestep projection, the class embedding (a compartment's
    # labels differ from the base's mixture) and the attention projections where the UNet has attention.
    targets: tuple[str, ...] = ("conv1", "conv2", "time_emb_proj", "class_embedding", "to_q", "to_k", "to_v",
                                "to_out.0")
    init: str = "gaussian"  # A ~ N(0, 1/r), B = 0: the adapter starts as the identity (the base itself)

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          init_lora_weights=self.init)


def attach(unet: torch.nn.Module, cfg: AdapterConfig, name: str = "default"):
    """`unet` (its weights the base's) wrapped with a fresh adapter; the base's weights are frozen."""
    from peft import get_peft_model

    return get_peft_model(unet, cfg.lora_config(), adapter_name=name)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer (and the EMA) updates: the adapter's, or every one of a plain UNet."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights only (CPU, contiguous), as peft names them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(state: dict[str, torch.Tensor], cfg: AdapterConfig, folder: str | Path) -> Path:
    """`folder/adapter_model.safetensors` and `folder/adapter_config.json` (our `AdapterConfig`). Returns folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(asdict(cfg), indent=2))
    return folder


def load_adapter_config(folder: str | Path) -> AdapterConfig:
    raw = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    return AdapterConfig(**{**raw, "targets": tuple(raw["targets"])})


def merged(base: torch.nn.Module, folder: str | Path):
    """The base UNet with the adapter in `folder` folded into its weights: a plain `UNet2DModel` (eval mode).
    `base` is consumed (its modules are reused). Refuses an adapter whose weights do not fit the base."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = attach(base, load_adapter_config(folder))
    state = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{folder}: adapter weights that fit no layer of the base ({missing[0]}, ...)")
    return model.merge_and_unload().eval()


def size(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Parameters and bytes of an adapter (or of any state dict)."""
    return {"parameters": sum(v.numel() for v in state.values()),
            "bytes": sum(v.numel() * v.element_size() for v in state.values())}
