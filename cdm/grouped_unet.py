"""N shard UNets of one architecture run as one network, every layer holding the N shards side by side.

Activations are laid out [G, N * C, H, W]: row g carries one sample per shard, shard k's channels in block k.
Each layer of the UNet becomes one call for all N shards:

    convolution        groups = N, the N weights concatenated along the output channels
    group norm         N x its groups, the N affine parameters concatenated
    linear (time, class, attention projections)   a batched matmul over the shard axis
    skip connections   concatenated per shard (block k of the skip joins block k of the hidden state)
    attention          each shard's heads attend within that shard's block

So a step of the composite launches as many kernels as one UNet does, where the loop over shards launches N times
as many; the arithmetic is the same. That is what matters where launches or per-call overhead dominate (a GPU, or
small requests on a CPU). The network is written out here from the UNet's own modules and weights; architectures
other than the ones `cdm.model.build_unet` makes are refused.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from cdm.compose import ShardStack

# What the written-out forward below reproduces; anything else is refused rather than silently computed wrong.
_SUPPORTED = {
    "down_block_types": {"DownBlock2D", "AttnDownBlock2D"},
    "up_block_types": {"UpBlock2D", "AttnUpBlock2D"},
    "mid_block_type": {"UNetMidBlock2D", None},
}
_FIXED = {"time_embedding_type": "positional", "class_embed_type": None, "resnet_time_scale_shift": "default",
          "act_fn": "silu", "center_input_sample": False, "downsample_type": "conv", "upsample_type": "conv"}


def check_groupable(unet) -> None:
    """Raise ValueError unless `unet` is a UNet2DModel the grouped forward reproduces exactly."""
    cfg = unet.config
    for key, allowed in _SUPPORTED.items():
        values = cfg.get(key)
        values = values if isinstance(values, (list, tuple)) else [values]
        if not set(values) <= allowed:
            raise ValueError(f"grouped evaluation does not support {key}={values}")
    for key, value in _FIXED.items():
        if cfg.get(key, value) != value:
            raise ValueError(f"grouped evaluation needs {key}={value!r}, not {cfg.get(key)!r}")
    if cfg.get("num_class_embeds") is None:
        raise ValueError("grouped evaluation needs a class-conditional UNet (num_class_embeds)")
    for name, module in unet.named_modules():
        if type(module).__name__ == "Attention":
            if module.spatial_norm is not None or module.norm_q is not None or not module.scale_qk:
                raise ValueError(f"grouped evaluation does not support the attention at {name}")
            if abs(module.scale - (module.inner_dim // module.heads) ** -0.5) > 1e-12:
                raise ValueError(f"grouped evaluation needs the default attention scale at {name}")


class GroupedUNet(ShardStack):
    """N UNets with one architecture evaluated in one call with grouped layers.

    Same interface and stacked weights as `cdm.compose.ShardStack`: `forward(x_t, t, labels, index=None)` where
    `x_t` is one batch for every shard ([B, C, H, W]) or a batch per shard ([n, G, C, H, W], `t` and `labels`
    [n, G]); returns each selected shard's eps, [n, B or G, C, H, W].
    """

    def __init__(self, unets: Sequence[torch.nn.Module]):
        for unet in unets:
            check_groupable(unet)
        super().__init__(unets)  # stacked weights; `base`, the architecture on the meta device
        self.__dict__["time_proj"] = copy.deepcopy(unets[0].time_proj)  # sinusoidal features, no weights

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """-> eps of each (selected) shard, [n, B, C, H, W] (shared batch) or [n, G, C, H, W]."""
        return self.network(self.stacked(index)[0], x_t, t, labels)

    def network(self, w: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """The grouped forward pass with weights `w` ({name: [n, *shape]}); tensors in, tensors out, no Python state,
        so it can be compiled (on a GPU, `torch.compile(..., mode="reduce-overhead")` replays it as a CUDA graph)."""
        n = w[self.names_p[0]].shape[0]
        base = self.base
        shared = x_t.dim() == 4
        rows = x_t.shape[0] if shared else x_t.shape[1]
        if shared:
            t = t.expand(n, rows) if t.dim() == 1 else t
            labels = labels.expand(n, rows) if labels.dim() == 1 else labels

        # 1. Time and class embedding per (shard, sample): [n, G, D].
        t_emb = self.time_proj(t.reshape(-1)).to(x_t.dtype).view(n, rows, -1)
        emb = _linear(w, "time_embedding.linear_2", F.silu(_linear(w, "time_embedding.linear_1", t_emb)))
        table = w["class_embedding.weight"]  # [n, K + 1, D]
        emb = emb + table[torch.arange(n, device=table.device)[:, None], labels]

        # 2. Input convolution into the grouped layout [G, n * C, H, W]. A shared batch needs no copy per shard:
        #    one ungrouped convolution with the n weights stacked gives every shard's channels.
        if shared:
            h = F.conv2d(x_t, w["conv_in.weight"].flatten(0, 1), w["conv_in.bias"].flatten(),
                         padding=base.conv_in.padding)
        else:
            h = _conv(w, "conv_in", base.conv_in, x_t.transpose(0, 1).flatten(1, 2), n)

        # 3. Down blocks: resnets (each followed by its attention, if any), then the downsampler.
        skips = [h]
        for i, block in enumerate(base.down_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for j, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
                h = _resnet(w, f"down_blocks.{i}.resnets.{j}", resnet, h, emb, n)
                if attn is not None:
                    h = _attention(w, f"down_blocks.{i}.attentions.{j}", attn, h, n)
                skips.append(h)
            if block.downsamplers is not None:
                for k, down in enumerate(block.downsamplers):
                    if getattr(down, "padding", 1) == 0:
                        h = F.pad(h, (0, 1, 0, 1))
                    h = _conv(w, f"down_blocks.{i}.downsamplers.{k}.conv", down.conv, h, n)
                skips.append(h)

        # 4. Mid block: resnet, then (attention, resnet) pairs.
        if base.mid_block is not None:
            mid = base.mid_block
            h = _resnet(w, "mid_block.resnets.0", mid.resnets[0], h, emb, n)
            for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
                if attn is not None:
                    h = _attention(w, f"mid_block.attentions.{j}", attn, h, n)
                h = _resnet(w, f"mid_block.resnets.{j + 1}", resnet, h, emb, n)

        # 5. Up blocks: each resnet takes the last skip, joined to the hidden state shard by shard.
        for i, block in enumerate(base.up_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for j, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
                h = _join(h, skips.pop(), n)
                h = _resnet(w, f"up_blocks.{i}.resnets.{j}", resnet, h, emb, n)
                if attn is not None:
                    h = _attention(w, f"up_blocks.{i}.attentions.{j}", attn, h, n)
            if block.upsamplers is not None:
                for k, up in enumerate(block.upsamplers):
                    h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                    h = _conv(w, f"up_blocks.{i}.upsamplers.{k}.conv", up.conv, h, n)

        # 6. Output head, back to one tensor per shard: [n, G, C, H, W].
        h = F.silu(_group_norm(w, "conv_norm_out", base.conv_norm_out, h, n))
        h = _conv(w, "conv_out", base.conv_out, h, n)
        return h.view(rows, n, -1, *h.shape[2:]).transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Layers of the grouped network. `w` maps each parameter name to its n stacked copies, [n, *shape].


def _linear(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """Shard k's linear layer on x[k]: [n, M, in] -> [n, M, out]."""
    return torch.baddbmm(w[f"{name}.bias"][:, None, :], x, w[f"{name}.weight"].transpose(1, 2))


def _conv(w: dict, name: str, module, h: torch.Tensor, n: int) -> torch.Tensor:
    """Shard k's convolution on channel block k: [G, n * Cin, H, W] -> [G, n * Cout, H', W']."""
    bias = w.get(f"{name}.bias")
    return F.conv2d(h, w[f"{name}.weight"].flatten(0, 1), None if bias is None else bias.flatten(),
                    stride=module.stride, padding=module.padding, groups=n)


def _group_norm(w: dict, name: str, module, h: torch.Tensor, n: int) -> torch.Tensor:
    """Shard k's group norm on channel block k (groups never straddle two blocks)."""
    return F.group_norm(h, n * module.num_groups, w[f"{name}.weight"].flatten(), w[f"{name}.bias"].flatten(),
                        module.eps)


def _join(h: torch.Tensor, skip: torch.Tensor, n: int) -> torch.Tensor:
    """torch.cat([h, skip], dim=1) for each shard: [G, n * (Ch + Cs), H, W], shard k's block = [h_k, skip_k]."""
    g, _, height, width = h.shape
    return torch.cat([h.view(g, n, -1, height, width), skip.view(g, n, -1, height, width)], 2).flatten(1, 2)


def _resnet(w: dict, name: str, module, h: torch.Tensor, emb: torch.Tensor, n: int) -> torch.Tensor:
    """ResnetBlock2D (pre-norm, additive time embedding) for every shard."""
    x = F.silu(_group_norm(w, f"{name}.norm1", module.norm1, h, n))
    x = _conv(w, f"{name}.conv1", module.conv1, x, n)
    temb = _linear(w, f"{name}.time_emb_proj", F.silu(emb))  # [n, G, Cout]
    x = x + temb.transpose(0, 1).flatten(1)[:, :, None, None]
    x = F.silu(_group_norm(w, f"{name}.norm2", module.norm2, x, n))
    x = _conv(w, f"{name}.conv2", module.conv2, x, n)
    if module.conv_shortcut is not None:
        h = _conv(w, f"{name}.conv_shortcut", module.conv_shortcut, h, n)
    return (h + x) / module.output_scale_factor


def _attention(w: dict, name: str, module, h: torch.Tensor, n: int) -> torch.Tensor:
    """Spatial self-attention (group norm, residual) for every shard; shard k's heads see only block k."""
    g, _, height, width = h.shape
    x = _group_norm(w, f"{name}.group_norm", module.group_norm, h, n)
    tokens = x.view(g, n, -1, height * width).permute(1, 0, 3, 2).flatten(1, 2)  # [n, G * L, C]

    def heads(proj: torch.Tensor) -> torch.Tensor:  # [n, G * L, C] -> [n * G, heads, L, C / heads]
        return proj.view(n * g, height * width, module.heads, -1).transpose(1, 2)

    q, k, v = (heads(_linear(w, f"{name}.{p}", tokens)) for p in ("to_q", "to_k", "to_v"))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, g * height * width, -1)
    out = _linear(w, f"{name}.to_out.0", out)  # [n, G * L, C]
    out = out.view(n, g, height * width, -1).permute(1, 0, 3, 2).reshape(h.shape)
    if module.residual_connection:
        out = out + h
    return out / module.rescale_output_factor
