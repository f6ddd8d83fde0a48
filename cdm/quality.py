"""The quality instrument (docs/design.md §6): FID with a 95% confidence interval and its noise floor.

Why one model's FID moved 40-60% between sampling seeds: the digits are ten well-separated clusters in the feature
network's space, and FID fits one Gaussian to them. A sample set's class proportions fluctuate by about sqrt(n/10)
images per class, which moves that Gaussian's mean and covariance; no outlier or feature scale is needed for it
(measured on the bundled digits, N = 500 real vs real over 20 splits: FID 15.3 ± 3.5 with random splits,
9.2 ± 1.8 with class-stratified splits; removing samples beyond the real features' 99.9th percentile norm changed
no model FID by more than 1%). So the instrument

1. samples class-conditionally with labels allocated to the reference's class proportions (`stratified_labels`),
   and compares against a class-stratified reference half;
2. scores k >= 5 independent sample sets (seeds) and reports the mean with a Student-t 95% interval over the
   sets. Each set is a fresh draw of n images, so the spread between sets holds all of the sampling noise. A
   bootstrap that resamples images within a set is not used: duplicated images shrink the covariance estimate and
   raise FID (on the demo workspace the replicates sat above the point estimate by more than the interval's width),
   so its percentiles describe the resampling, not the model;
3. prints beside it the noise floor at the same N: real vs real (a stratified control half the models never
   see in this comparison against the same reference), and one model vs itself (two sample sets).

Ratios between two models (composite / paragon) are paired: the same seed and labels for both, resampled
together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass
class Interval:
    """A measured value: the point estimate and its 95% interval."""

    mean: float
    low: float
    high: float
    n: int  # independent sample sets (or images) behind it

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def stratified_labels(counts: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """n labels in the proportions of `counts` (largest-remainder allocation), sorted. -> [n] long."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError("no class has samples")
    exact = counts / counts.sum() * n
    alloc = exact.floor().long()
    short = n - int(alloc.sum())
    alloc[(exact - alloc).argsort(descending=True)[:short]] += 1
    return torch.repeat_interleave(torch.arange(len(counts)), alloc)


def stratified_halves(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into two class-stratified halves (reference, control)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        a.append(idx[: (len(idx) + 1) // 2])
        b.append(idx[(len(idx) + 1) // 2:])
    return torch.cat(a), torch.cat(b)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets [N, F] (Gaussian fits).

    tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2 (as torchmetrics computes it), which
    stays finite when a covariance is singular (fewer samples than features), where a matrix square root does not.
    """
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_interval(reference: np.ndarray, fakes: list[np.ndarray]) -> Interval:
    """Mean FID of k independent sample sets against `reference`, with a Student-t 95% interval over the sets."""
    return t_interval([frechet_distance(reference, f) for f in fakes])


def ratio_interval(reference: np.ndarray, fakes_a: list[np.ndarray], fakes_b: list[np.ndarray]) -> Interval:
    """FID(a) / FID(b) over paired sample sets (same seed and labels for both): the ratio of the mean FIDs with a
    95% interval (`ratio_of_means`). Pairing removes what both sets share (the labels, the reference)."""
    if len(fakes_a) != len(fakes_b):
        raise ValueError("a ratio needs paired sample sets")
    return ratio_of_means([frechet_distance(reference, a) for a in fakes_a],
                          [frechet_distance(reference, b) for b in fakes_b])


def ratio_of_means(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a) / mean(b) over paired values (sample sets, or training seeds) with a Student-t 95% interval from the
    ratio estimator's linearization: R = mean(a) / mean(b), residuals d_i = a_i - R b_i, se(R) = sd(d) /
    (sqrt(k) mean(b)). Unlike the mean of per-pair ratios it has no Jensen bias (a per-pair ratio's mean sits
    above the ratio of the means by about var(b) / mean(b)^2, ~1% at the instrument's usual spread)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("a ratio of means needs paired values")
    r = float(a.mean() / b.mean())
    if len(a) < 2:
        return Interval(r, float("nan"), float("nan"), len(a))
    half = float(stats.t.ppf(0.975, len(a) - 1) * (a - r * b).std(ddof=1) / np.sqrt(len(a)) / abs(b.mean()))
    return Interval(r, r - half, r + half, len(a))


def kid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Kernel inception distance between two feature sets [N, F]: the unbiased MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y / F + 1)^3 (Binkowski et al. 2018, torchmetrics' kernel), in raw units (x1e3 is the
    convention when printing). Unlike FID it has no finite-sample bias: two sets from one distribution score ~0."""
    k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    m, n = len(f1), len(f2)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) on feature sets [N, F]: precision is the share of
    fake samples inside the real manifold (the union of balls reaching each real sample's k-th nearest real
    neighbour), recall the share of real samples inside the fake manifold. A model that buys FID with less
    diversity keeps its precision and loses recall."""
    r, f = torch.as_tensor(real), torch.as_tensor(fake)

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # k+1: the point itself is its nearest

    def inside(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= radius[None]).any(1).double().mean())

    return inside(f, r, radii(r)), inside(r, f, radii(f))


def relative_half_width(i: Interval) -> float:
    """Half the interval's width over its mean (0.03: the mean is known to +-3%)."""
    return (i.high - i.low) / 2 / abs(i.mean)


def ratio_until(reference: np.ndarray, draw_a: Callable[[int], np.ndarray], draw_b: Callable[[int], np.ndarray],
                target: float, min_sets: int = 6, max_sets: int = 100, step: int = 4,
                ) -> tuple[Interval, list[np.ndarray], list[np.ndarray]]:
    """Draw paired sample sets (set s of a and set s of b share seed s) until the ratio FID(a) / FID(b) is known to
    a relative half-width of `target`, or `max_sets` pairs are drawn. The noise of one set does not shrink with
    more sets; only the interval of the mean does, as 1 / sqrt(sets), so this is how a figure reaches a stated
    precision. Returns the interval and the feature sets (so the caller can score them further).

    Stopping on the interval's own width makes the coverage slightly optimistic (sequential testing); `min_sets`
    keeps the first estimate of the spread from being a lucky one.
    """
    fa, fb = [draw_a(s) for s in range(min_sets)], [draw_b(s) for s in range(min_sets)]
    while True:
        r = ratio_interval(reference, fa, fb)
        if relative_half_width(r) <= target or len(fa) >= max_sets:
            return r, fa, fb
        more = range(len(fa), min(len(fa) + step, max_sets))
        fa += [draw_a(s) for s in more]
        fb += [draw_b(s) for s in more]


def real_floor(reference: np.ndarray, control: np.ndarray, control_labels: np.ndarray, n: int, repeats: int = 5,
               seed: int = 0) -> Interval:
    """FID of stratified real subsets of size n (from `control`) against the reference: what a perfect model scores."""
    labels = torch.as_tensor(control_labels)
    counts = torch.bincount(labels)
    want = stratified_labels(counts, min(n, len(control)))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(repeats):
        idx = np.concatenate([rng.choice(np.flatnonzero(control_labels == c), int((want == c).sum()), replace=False)
                              for c in want.unique().tolist()])
        values.append(frechet_distance(reference, control[idx]))
    return t_interval(values)


def seed_floor(fakes: list[np.ndarray]) -> Interval:
    """FID between one model's sample sets (consecutive pairs): the instrument's own noise on a model."""
    if len(fakes) < 2:
        raise ValueError("the seed floor needs two sample sets")
    return t_interval([frechet_distance(fakes[i], fakes[i + 1]) for i in range(len(fakes) - 1)])


def t_interval(values: Sequence[float]) -> Interval:
    """Mean with a Student-t 95% interval over independent values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return Interval(float(v.mean()), float("nan"), float("nan"), len(v))
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), len(v))


def paired_interval(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> Interval:
    """Mean of a - b over paired items (images) with a normal 95% interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return Interval(float(d.mean()), float(d.mean() - half), float(d.mean() + half), len(d))


def features(net, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Feature-network embeddings [N, F] (float64) of images in [-1, 1]."""
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


# -- paired sample sets over training seeds (benchmark v3's headline; docs/design.md §6) ---------------------------
# A model's quality figure has two levels of noise: the training seed (data order, initialisation: a new model) and
# the sample set (a new draw of n images from the same model). Arrays below are [seeds, sets]; set j of seed i of
# two models shares its noise and labels (common random numbers), so their difference cancels what the sets share.


def variance_components(values: np.ndarray) -> dict:
    """Split the spread of [seeds, sets] values into the seed level and the set level (one-way random effects,
    method of moments): `set` is the pooled within-seed variance, `seed` the variance of the seed means beyond what
    their sets explain (var(seed means) - set / k, floored at 0). The standard error of the grand mean is
    sqrt((seed + set / k) / seeds): more sets only shrink the second term."""
    v = np.asarray(values, dtype=np.float64)
    seeds, k = v.shape
    within = float(v.var(axis=1, ddof=1).mean()) if k > 1 else float("nan")
    between = float(v.mean(axis=1).var(ddof=1)) if seeds > 1 else float("nan")
    seed = max(0.0, between - within / k) if k > 1 else between
    return {"seed": seed, "set": within, "seeds": seeds, "sets_per_seed": k}


def paired_ratio(a: np.ndarray, b: np.ndarray) -> Interval:
    """mean(a) / mean(b) over paired [seeds, sets] values with a delete-one-seed jackknife 95% interval (Student t,
    seeds - 1 degrees of freedom). Seeds are the independent units: the sets of one seed share its model, so they
    are averaged inside the seed, never counted as independent. The point is the plain ratio of grand means."""
    from scipy import stats

    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired values need one shape, got {a.shape} and {b.shape}")
    ma, mb = a.mean(axis=1), b.mean(axis=1)  # [seeds]
    s = len(ma)
    r = float(ma.mean() / mb.mean())
    if s < 2:
        return Interval(r, float("nan"), float("nan"), s)
    loo = np.array([np.delete(ma, i).mean() / np.delete(mb, i).mean() for i in range(s)])
    pseudo = s * r - (s - 1) * loo
    half = float(stats.t.ppf(0.975, s - 1) * pseudo.std(ddof=1) / np.sqrt(s))
    return Interval(r, r - half, r + half, s)


def paired_difference(a: np.ndarray, b: np.ndarray) -> Interval:
    """mean(a - b) over paired [seeds, sets] values: the seed means of the differences with a Student-t interval."""
    d = np.atleast_2d(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return t_interval(d.mean(axis=1))


def minus(value: Interval, floor: Interval) -> Interval:
    """value - floor for two independent measurements, the half-widths added in quadrature (the floor's own
    uncertainty carried into the floor-subtracted figure, not dropped). Conservative on purpose: against a floor of
    2 sets, Welch-Satterthwaite's interval covered 89-91% in simulation (tests/cdm/test_quality.py), this one
    96-99%."""
    half = float(np.hypot((value.high - value.low) / 2, (floor.high - floor.low) / 2))
    mid = value.mean - floor.mean
    return Interval(mid, mid - half, mid + half, min(value.n, floor.n))


def disjoint_floor(reference: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray, labels: torch.Tensor,
                   seed: int = 0) -> Interval:
    """The real-vs-real floor from disjoint draws: the pool (real images no reference image is among) is split into
    as many class-stratified sets with the sample sets' labels (`labels`, [n]) as it holds, each scored against the
    reference, and the interval is taken over those sets. Unlike overlapping draws (`real_floor`) the sets share no
    image, so their spread is the floor's sampling noise and its interval means what it says."""
    rng = np.random.default_rng(seed)
    want = torch.bincount(torch.as_tensor(labels), minlength=int(pool_labels.max()) + 1).numpy()
    by_class = {c: rng.permutation(np.flatnonzero(pool_labels == c)) for c in np.flatnonzero(want)}
    sets = min(len(by_class[c]) // want[c] for c in by_class)
    if sets < 1:
        raise ValueError("the pool holds no full set")
    values = [frechet_distance(reference, pool[np.concatenate([by_class[c][j * want[c]:(j + 1) * want[c]]
                                                               for c in by_class])]) for j in range(sets)]
    return t_interval(values)


def standardized_kid(reference: np.ndarray, fake: np.ndarray) -> float:
    """KID (x1e3) on features standardized by the reference's per-feature mean and sd. The cubic kernel on raw
    features is dominated by a few large-scale directions (the base scored KID -36.7 there, "better" than real
    images); standardized, every feature counts alike and two draws of one distribution score ~0 +- its noise.
    Read it as a difference between two models scored against the same reference (`paired_difference`)."""
    mu, sd = reference.mean(0), reference.std(0) + 1e-8
    return 1e3 * kid((reference - mu) / sd, (fake - mu) / sd)


def verdict(low: float, high: float, goal: float) -> str:
    """A figure against an upper goal, read from its 95% interval: `met` when the whole interval is at or below the
    goal, `failed` when the whole interval is above it, `inconclusive` when it holds the goal (the instrument cannot
    tell at this sample size: more sample sets would)."""
    if high != high or low != low:  # nan: one set, no interval
        return "inconclusive"
    return "met" if high <= goal else "failed" if low > goal else "inconclusive"
