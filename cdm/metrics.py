"""Evaluation (docs/design.md §6): FID/KID with our own feature network, memorization, membership inference.

The feature network is a small classifier trained on a held-out split that belongs to no owner, so no weights are
downloaded. Every score carries the sha256 of the feature network's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdm.data import Dataset
from cdm.model import Denoiser, require_pointwise


class FeatureNet(torch.nn.Module):
    """Classifier on [-1, 1] images; `forward` returns the penultimate features (torchmetrics' `feature` module)."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, num_features: int = 64):
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, width=width, num_features=num_features)
        self.num_features = num_features
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), torch.nn.SiLU(),
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(8 * width, num_features), torch.nn.SiLU(),
        )
        self.classifier = torch.nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> features [B, num_features] (float64 for torchmetrics' statistics)."""
        return self.body(x.float()).double()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x.float()))

    def predict(self, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.logits(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])

    def sha256(self) -> str:
        """Hash of the weights (names, shapes and bytes, in a fixed order)."""
        from cdm.safetensors_io import state_sha256

        return state_sha256(self.state_dict())


def train_feature_net(data: Dataset, num_classes: int = 10, steps: int = 800, batch_size: int = 128,
                      lr: float = 2e-3, seed: int = 0) -> FeatureNet:
    """Train the feature network on (held-out) labelled images, with small random shifts as augmentation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet(data.x.shape[1], num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        x = data.x[idx]
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(net.logits(x), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def save_feature_net(net: FeatureNet, path: str | Path) -> str:
    """Save as safetensors (config in the metadata). Returns the weights' sha256."""
    import json

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"config": json.dumps(net.config)})
    return net.sha256()


def load_feature_net(path: str | Path, expected_sha256: str | None = None) -> FeatureNet:
    """Load a feature network; refuses weights whose hash differs from `expected_sha256`."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    net = FeatureNet(**config)
    net.load_state_dict(state)
    net.eval()
    if expected_sha256 and net.sha256() != expected_sha256:
        raise ValueError(f"{path}: feature network hash {net.sha256()[:12]} != recorded {expected_sha256[:12]}")
    return net


@dataclass
class DistributionScores:
    fid: float
    kid_mean: float
    kid_std: float
    n_real: int
    n_fake: int
    feature_sha256: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, net: FeatureNet, kid_subsets: int = 50) -> DistributionScores:
    """FID and KID (torchmetrics) between two image sets [N, C, H, W] in [-1, 1], through `net`'s features."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    import warnings

    subset = min(len(real), len(fake), 1000)
    fid = FrechetInceptionDistance(feature=net, normalize=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=net, subsets=kid_subsets, subset_size=subset, normalize=False)
    with torch.no_grad():
        for metric in (fid, kid):
            for i in range(0, len(real), 512):
                metric.update(real[i:i + 512], real=True)
            for i in range(0, len(fake), 512):
                metric.update(fake[i:i + 512], real=False)
        kid_mean, kid_std = kid.compute()
        return DistributionScores(float(fid.compute()), float(kid_mean), float(kid_std), len(real), len(fake),
                                  net.sha256())


def memorization(generated: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3) -> dict:
    """Share of generated samples whose nearest training image is much closer than the second nearest.

    Returns:
        {"share": fraction with d1 / d2 < ratio, "flags": [N] bool, "nearest": [N] index of the nearest image}.
    """
    if len(train) < 2:
        raise ValueError("memorization needs at least two training images")
    d = torch.cdist(generated.flatten(1).double(), train.flatten(1).double())  # [N, M]
    two = d.topk(2, dim=1, largest=False)
    flags = two.values[:, 0] < ratio * two.values[:, 1]
    return {"share": float(flags.float().mean()), "flags": flags, "nearest": two.indices[:, 0]}


def memorization_check(generated: torch.Tensor, train: torch.Tensor, noise: float = 0.05, planted: int = 50,
                       seed: int = 0) -> dict:
    """`memorization` with its interval and its positive control: `planted` training images with Gaussian noise
    of sd `noise` (on [-1, 1]) added, near-copies a memorizing model would emit, put through the same detector.
    When the detector misses them (fewer than 90% flagged) it cannot see copies in these images, and its share on
    the samples is no evidence of anything: `fired` is False and a reader prints no verdict.

    Returns {"share", "low", "high" (Wilson 95%), "n", "control_found" (share of planted copies flagged),
    "fired"}."""
    from scipy.stats import binomtest

    m = memorization(generated, train)
    k = int(m["flags"].sum())
    ci = binomtest(k, len(generated)).proportion_ci(method="wilson")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=g)[: min(planted, len(train))]
    copies = (train[pick] + noise * torch.randn(train[pick].shape, generator=g, dtype=train.dtype)).clamp(-1, 1)
    found = float(memorization(copies, train)["flags"].float().mean())
    return {"share": m["share"], "low": float(ci.low), "high": float(ci.high), "n": len(generated),
            "control_found": found, "fired": found >= 0.9}


@torch.no_grad()
def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor,
                   timesteps: tuple[int, ...] = (50, 100, 200, 300, 400), repeats: int = 4,
                   seed: int = 0) -> torch.Tensor:
    """Per-sample denoising loss (mean squared error of the predicted noise) over fixed timesteps. -> [N]."""
    require_pointwise(denoiser, "denoising_loss()")
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(x0), dtype=torch.float64)
    for t_val in timesteps:
        for _ in range(repeats):
            eps = torch.randn(x0.shape, generator=g)
            a = alphas_cumprod[t_val].float()
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            t = torch.full((len(x0),), t_val, dtype=torch.long)
            if hasattr(denoiser, "reset"):
                denoiser.reset()
            pred = denoiser(x_t, t, labels)
            total += ((pred - eps) ** 2).flatten(1).mean(1).double()
    return (total / (len(timesteps) * repeats)).float()


# The membership attack's score (docs/design.md §6): the denoising loss at low noise levels, where a model that
# memorized an image predicts its noise best, averaged over 32 noise draws per image so that the score's own noise
# does not drown the signal (a handful of draws at mid t gave AUC 0.55 on a paragon trained on the images).
MEMBERSHIP_TIMESTEPS = (5, 10, 20, 40)
MEMBERSHIP_DRAWS = 32


def membership_loss(denoiser: Denoiser, x0: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor,
                    seed: int = 0) -> torch.Tensor:
    """Per-image membership score (lower: more likely a member), [N]."""
    return denoising_loss(denoiser, x0, labels, alphas_cumprod, MEMBERSHIP_TIMESTEPS,
                          MEMBERSHIP_DRAWS // len(MEMBERSHIP_TIMESTEPS), seed)


def membership_verdict(auc_before: float | None, auc_after: float | None, n_members: int, n_nonmembers: int,
                       auc_control: float | None = None) -> str:
    """A revocation's membership check, read from 95% intervals (`auc_interval_of`) against a negative control:

    The control is the attack on the same images through a model that never saw any of them (the shared base,
    `auc_control`); without one it is 0.5, which assumes the owner's images and the held-out images come from one
    distribution (images by the same writers as other owners' score as "members" of a model that never saw them:
    that is resemblance, not memory).

    - `inconclusive` when the attack had no power on the owner before the revocation (its interval does not lie
      above the control's), so the AUC after it is no evidence of forgetting;
    - `failed` when the attack still tells the owner's images from unseen ones after, beyond the control;
    - `met` when it fired before, is at the control's level after, and the drop is larger than both intervals;
      an AUC that fell less than that is `inconclusive` too."""
    if auc_before is None or auc_after is None:
        return "not measured"
    before = auc_interval_of(auc_before, n_members, n_nonmembers)
    after = auc_interval_of(auc_after, n_members, n_nonmembers)
    if auc_control is None:
        level, c_low, c_high, name = "0.5", 0.5, 0.5, "0.5 (no model that never saw them to compare with)"
    else:
        control = auc_interval_of(auc_control, n_members, n_nonmembers)
        level, c_low, c_high, name = str(control), control.low, control.high, f"the base that never saw them ({control})"
    n = f"{n_members} vs {n_nonmembers} images; control: {name}"
    if before.low <= c_high:
        return (f"inconclusive: the attack had no power on this owner before the revocation (AUC {before} does not "
                f"lie above the control {level}; {n}), so the AUC after it is no evidence of forgetting")
    if after.low > c_high:
        return (f"failed: the attack still separates the owner's images after the revocation (AUC {after}), beyond "
                f"the control {level} ({n})")
    if after.high >= before.low:
        return (f"inconclusive: the attack fired before the revocation (AUC {before}) but the AUC after it ({after}) "
                f"did not drop by more than the two intervals' noise ({n})")
    return (f"met: the attack fired before the revocation (AUC {before}) and after it scores the owner's images as "
            f"the control does (AUC {after}; {n})")


def auc(scores_pos: np.ndarray | torch.Tensor, scores_neg: np.ndarray | torch.Tensor) -> float:
    """Area under the ROC curve (scikit-learn): P(score_pos > score_neg) + 0.5 P(tie)."""
    from sklearn.metrics import roc_auc_score

    pos, neg = np.asarray(scores_pos, dtype=np.float64), np.asarray(scores_neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both positive and negative scores")
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def auc_interval(scores_pos: np.ndarray | torch.Tensor, scores_neg: np.ndarray | torch.Tensor):
    """AUC with its 95% interval (`auc_interval_of`). An attack "fires" when the interval lies above 0.5; an
    interval that holds 0.5 says the two sets cannot be told apart at this sample size."""
    return auc_interval_of(auc(scores_pos, scores_neg), len(scores_pos), len(scores_neg))


def auc_interval_of(a: float, n_pos: int, n_neg: int):
    """The 95% interval of an AUC measured on n_pos positives and n_neg negatives, as a `cdm.quality.Interval`
    (n: the items scored): a score interval (Newcombe 2006), every A with (a - A)^2 <= z^2 var(A), where var(A) is
    Hanley and McNeil's (1982) variance evaluated at the candidate A, not at the estimate. The Wald interval
    a +- z se(a) collapses to zero width at a = 1 (se(1) = 0: "1.000 [1.000, 1.000]" on 24 vs 24); the score
    interval keeps its width there as Wilson's does for a proportion."""
    from scipy.optimize import brentq

    from cdm.quality import Interval

    if n_pos < 1 or n_neg < 1:
        raise ValueError("an AUC interval needs positives and negatives")
    z2 = 1.959964 ** 2

    def gap(x: float) -> float:  # <= 0 inside the interval; gap(a) = -z^2 var(a) <= 0
        q1, q2 = x / (2 - x), 2 * x * x / (1 + x)
        var = (x * (1 - x) + (n_pos - 1) * (q1 - x * x) + (n_neg - 1) * (q2 - x * x)) / (n_pos * n_neg)
        return (a - x) ** 2 - z2 * max(var, 0.0)

    tiny = 1e-12  # var vanishes at 0 and 1: start just inside, where gap < 0
    lo_end, hi_end = max(a - tiny, 0.0) if a >= 1 else a, min(a + tiny, 1.0) if a <= 0 else a
    low = brentq(gap, 0.0, lo_end) if a > 0 and gap(0.0) > 0 else 0.0
    high = brentq(gap, hi_end, 1.0) if a < 1 and gap(1.0) > 0 else 1.0
    return Interval(a, float(min(low, a)), float(max(high, a)), n_pos + n_neg)


def membership_auc(loss_members: torch.Tensor, loss_heldout: torch.Tensor) -> float:
    """Membership-inference AUC: lower loss means "member". 0.5 = the model cannot tell them apart."""
    return auc(-loss_members.numpy(), -loss_heldout.numpy())
