"""Attribution: which owners produced a sample (docs/design.md §2).

A sample's shard weights, averaged over its trajectory (and the final ones), are split over the owners of each
shard in proportion to the samples each owner contributed to it, and summed per owner.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def owner_matrix(shard_owner_counts: Sequence[Mapping[str, int]]) -> tuple[list[str], torch.Tensor]:
    """Shares of each owner within each shard.

    Args:
        shard_owner_counts: per shard, {owner: samples it contributed}.
    Returns:
        (owners sorted, [N_shards, N_owners] rows summing to 1).
    """
    owners = sorted({o for counts in shard_owner_counts for o in counts})
    m = torch.zeros(len(shard_owner_counts), len(owners))
    for i, counts in enumerate(shard_owner_counts):
        total = sum(counts.values())
        if total <= 0:
            raise ValueError(f"shard {i} has no samples")
        for o, c in counts.items():
            m[i, owners.index(o)] = c / total
    return owners, m


def attribute(shard_weights: torch.Tensor, shard_owner_counts: Sequence[Mapping[str, int]]) -> list[dict[str, float]]:
    """Per-sample attribution to owners.

    Args:
        shard_weights: [B, N_shards] weights per sample (e.g. `CompositeDenoiser.attribution()["mean"]`).
        shard_owner_counts: per shard, {owner: samples}.
    Returns:
        One {owner: weight} per sample; weights sum to 1 (owners with zero weight are listed too).
    """
    owners, m = owner_matrix(shard_owner_counts)
    per_owner = shard_weights.float() @ m  # [B, N_owners]
    return [{o: float(v) for o, v in zip(owners, row)} for row in per_owner]
