"""Gaussian shards with closed-form noise predictions: exact models for testing composition."""

from __future__ import annotations

import torch


class GaussianShard:
    """Data of shard i with label y: x0 ~ N(means[y], std^2 I); eps is exact for that distribution.

    means: [K + 1, D] per label (the last row, the null label, is only used when `mixture` is None).
    For the null label the exact eps of the shard's label mixture (weights `label_probs`) is returned.
    """

    def __init__(self, means: torch.Tensor, std: float, alphas_cumprod: torch.Tensor, label_probs: torch.Tensor):
        self.means, self.std, self.ac, self.label_probs = means.double(), std, alphas_cumprod.double(), label_probs

    def log_density(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p_t(x_t | y) per sample, [B]; null label -> mixture over labels."""
        a = self.ac[t][:, None]
        var = a * self.std**2 + (1 - a)
        x = x_t.flatten(1).double()
        d = x.shape[1]

        def logn(mean):  # mean [B, D]
            return -0.5 * (((x - a.sqrt() * mean) ** 2) / var).sum(1) - 0.5 * d * torch.log(2 * torch.pi * var[:, 0])

        k = len(self.label_probs)
        per_label = torch.stack([logn(self.means[y].expand_as(x)) for y in range(k)], 1)  # [B, K]
        mix = torch.logsumexp(per_label + self.label_probs.double().clamp(min=1e-300).log()[None], 1)
        cond = per_label.gather(1, labels.clamp(max=k - 1)[:, None]).squeeze(1)
        return torch.where(labels >= k, mix, cond)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = x_t.detach().double().requires_grad_(True)
        with torch.enable_grad():
            lp = self.log_density(x, t, labels).sum()
            (score,) = torch.autograd.grad(lp, x)
        a = self.ac[t].view(-1, *[1] * (x_t.dim() - 1))
        return (-(1 - a).sqrt() * score).to(x_t.dtype)
