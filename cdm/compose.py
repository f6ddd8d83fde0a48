"""Composition of shard denoisers (docs/design.md §2). One module on purpose (~350 lines): the four estimators,
the batched `ShardStack` and the router share the composite's per-step state and read best side by side. The
grouped network (all shards in one call with grouped layers) is `cdm.grouped_unet.GroupedUNet`.

    eps(x_t, t, y) = sum_i w_i(x_t, t, y) eps_i(x_t, t, y),    w_i = p(i | x_t, y)

`CompositeDenoiser` looks like one denoiser `(x_t, t, labels) -> eps` (improved-diffusion's wrapped model): the
sampler never knows how many shards there are. It is stateful along one trajectory (path weights, the prior's
draw, the attribution trace); `reset()` starts a new trajectory and the pipeline calls it.

Estimators of w:
- `path`: log w starts at log lambda_i(y); after each stochastic step add -|x_prev - mu_i(x_t)|^2 / (2 sigma_t^2).
- `router`: a classifier r(x_t, t, y) -> shard trained on noised samples (`train_router`).
- `prior`: one shard per sample drawn from lambda(y) (ancestral sampling); `allocation="stratified"` gives each
  label's samples to the shards in proportion to lambda(y) (systematic sampling: each sample's shard is still
  lambda-distributed, but a batch's shard counts no longer fluctuate: a measurement's variance reduction).
- `average`: w = lambda(y), fixed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from cdm.data import Dataset
from cdm.model import Denoiser
from cdm.schedulers import NoiseSchedule, check_linear, train_scheduler, transition

EstimatorName = Literal["path", "router", "prior", "average"]
ESTIMATORS: tuple[str, ...] = get_args(EstimatorName)
EvaluationName = Literal["loop", "batched", "grouped", "auto"]
EVALUATIONS: tuple[str, ...] = get_args(EvaluationName)


def class_priors(counts: torch.Tensor) -> torch.Tensor:
    """lambda_i(y) from per-shard class counts.

    Args:
        counts: [N_shards, K] samples of each label in each shard.
    Returns:
        [N_shards, K + 1]: column y is lambda(y) = |D_i ∩ y| / |D ∩ y| (0 for a label nobody holds), the last
        column (the null label) the unconditional prior |D_i| / |D|.
    """
    counts = counts.double()
    per_label = counts / counts.sum(0, keepdim=True).clamp(min=1)
    total = counts.sum(1, keepdim=True) / counts.sum().clamp(min=1)
    return torch.cat([per_label, total], dim=1).float()


def stratified_choice(probs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """One shard per sample, [B] long, from probs [B, N] that depend on the label only: per label group of n_y
    samples, shard i gets floor(c_i + u) - floor(c_{i-1} + u) of them (c the cumulative sum of p n_y, one
    u ~ U(0, 1) per group: systematic sampling, E[count_i] = p_i n_y exactly), in a random order."""
    choice = torch.empty(len(labels), dtype=torch.long)
    for y in labels.unique().tolist():
        rows = (labels == y).nonzero().flatten()
        u = float(torch.rand((), generator=generator))
        edges = torch.floor(torch.cat([torch.zeros(1, dtype=torch.float64),
                                       probs[rows[0]].double().cumsum(0) * len(rows)]) + u).long()
        counts = edges.diff().clamp(min=0)
        counts[probs[rows[0]].argmax()] += len(rows) - int(counts.sum())  # float rounding at the top: keep n_y
        shard = torch.repeat_interleave(torch.arange(probs.shape[1]), counts)
        choice[rows] = shard[torch.randperm(len(rows), generator=generator)]
    return choice


def check_path_sampler(scheduler, eta: float) -> None:
    """The path estimator scores each stochastic transition; a sampler without noise leaves it nothing to score."""
    from diffusers import DDIMScheduler

    if scheduler is None:
        raise ValueError("the path estimator needs the sampling scheduler")
    check_linear(scheduler)
    if isinstance(scheduler, DDIMScheduler) and eta <= 0:
        raise ValueError("the path estimator needs a stochastic sampler (DDPM, or DDIM with eta > 0): with eta = 0 "
                         "no step carries evidence and the weights would stay at the prior (the average estimator)")


class ShardStack(torch.nn.Module):
    """Several UNets with one architecture evaluated in one call: stacked parameters, `functional_call` + `vmap`.

    Calling with `index` evaluates only those shards (their stacked parameters are sliced, not copied per sample).
    """

    def __init__(self, unets: Sequence[torch.nn.Module]):
        super().__init__()
        if not unets:
            raise ValueError(f"{type(self).__name__} needs at least one UNet")
        params, buffers = torch.func.stack_module_state(list(unets))
        self.names_p, self.names_b = list(params), list(buffers)
        for i, (k, v) in enumerate(params.items()):
            self.register_buffer(f"p{i}", v)
        for i, (k, v) in enumerate(buffers.items()):
            self.register_buffer(f"b{i}", v)
        # The architecture without weights; kept out of the module tree so that .to(device) skips it.
        self.__dict__["base"] = copy.deepcopy(unets[0]).to("meta")
        self.n = len(unets)
        self._selected: tuple[tuple, tuple[dict, dict]] | None = None

    def __len__(self) -> int:
        return self.n

    def stacked(self, index: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(parameters, buffers) of the selected shards, each {name: [n, *shape]}. The last selection's are kept,
        so the steps of a trajectory (whose selection rarely changes) slice them once."""
        key = (None if index is None else tuple(index.tolist()), self.p0.device, self.p0.dtype)
        if self._selected is None or self._selected[0] != key:
            params = {k: getattr(self, f"p{i}") for i, k in enumerate(self.names_p)}
            buffers = {k: getattr(self, f"b{i}") for i, k in enumerate(self.names_b)}
            if index is not None:
                index = index.to(self.p0.device)
                params = {k: v[index] for k, v in params.items()}
                buffers = {k: v[index] for k, v in buffers.items()}
            self._selected = (key, (params, buffers))
        return self._selected[1]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """-> eps of each (selected) shard, [n, B, C, H, W]."""
        params, buffers = self.stacked(index)
        shared = x_t.dim() == 4  # one batch for every shard, or a batch per shard [n, G, C, H, W]
        dims = (0, 0, None, None, None) if shared else (0, 0, 0, 0, 0)
        return torch.vmap(self._one, in_dims=dims)(params, buffers, x_t, t, labels)

    def _one(self, p, b, x, tt, y):
        return torch.func.functional_call(self.base, (p, b), (x, tt), {"class_labels": y}).sample


class CompositeDenoiser(torch.nn.Module):
    """The composite of docs/design.md §2 as one denoiser `(x_t, t, labels) -> eps`.

    Args:
        shards: the shard denoisers (a sequence of callables), or a stack that evaluates several shards in one call,
            `stack(x_t, t, labels, index=...) -> [n, ...]` (`ShardStack`, `cdm.grouped_unet.GroupedUNet`).
        priors: [N, K + 1] lambda_i(y) from `class_priors` (last column: null label).
        estimator: how the weights are estimated (see module docstring).
        scheduler: the sampling scheduler (needed by `path`: it defines mu_i and sigma_t); `eta` for DDIM.
        subset: indices of the shards allowed (access rights, forgetting); weights renormalize over them.
        threshold: sparse evaluation — a shard whose weight is below it for a sample is not evaluated for that
            sample and, for `path`, dropped from that sample's trajectory. 0 evaluates every allowed shard.
        evaluation: `loop` calls each shard on the samples that need it; `batched` evaluates the needed shards
            in one vmapped call over the whole batch; `grouped` gathers each needed shard's own samples, pads the
            groups to one size and evaluates all of them in one vmapped call (work ~ the samples routed, not
            shards x batch). `batched` and `grouped` require a stack. `auto` groups a step whose largest group has
            at most `grouped_rows` rows and loops otherwise; it needs shards that are both (indexable and a stack).
        grouped_rows: the `auto` crossover on a CPU; None groups every step. Measured on the 2-core CPU with the
            tiny UNet, the grouped network costs what one UNet call on all the rows costs up to ~100 rows a shard
            and loses to the loop beyond (grouped convolutions over large batches are slower there than one
            convolution per shard). On other devices `auto` groups every step: launches dominate there (on an
            H200 one vmapped call for 8 shards took 2.6 ms/image where the loop took 9.6, bench/gpu_check.h200.json).
        router: the trained router (estimator `router`).
        generator: randomness of the `prior` draw.
        allocation: the `prior` draw per sample independently (`draw`, multinomial) or per label group
            (`stratified`: counts lambda_i(y) n_y rounded by systematic sampling, positions shuffled).
    """

    def __init__(
        self,
        shards: Sequence[Denoiser] | ShardStack,
        priors: torch.Tensor,
        estimator: EstimatorName = "path",
        scheduler=None,
        eta: float = 1.0,
        subset: Sequence[int] | None = None,
        threshold: float = 0.0,
        evaluation: EvaluationName = "loop",
        router: "Router | None" = None,
        generator: torch.Generator | None = None,
        grouped_rows: int | None = 96,
        allocation: Literal["draw", "stratified"] = "draw",
    ):
        super().__init__()
        n = len(shards)
        if priors.shape[0] != n:
            raise ValueError(f"priors has {priors.shape[0]} rows for {n} shards")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        if estimator == "path":
            check_path_sampler(scheduler, eta)
        if estimator == "router" and router is None:
            raise ValueError("the router estimator needs a trained router")
        if evaluation not in EVALUATIONS:
            raise ValueError(f"unknown evaluation {evaluation!r}; choose one of {EVALUATIONS}")
        # Every member one by one where the shards can be indexed (a list, a ShardSet); a stack's UNets carry none.
        members = [shards[i] for i in range(n)] if hasattr(shards, "__getitem__") else []
        if any(getattr(s, "guidance_scale", 0.0) for s in members):
            # Each shard would subtract its own unconditional prediction, not the mixture's (whose weights are
            # p(i | x_t) without y): the guided composite would be no composition of anything.
            raise ValueError("classifier-free guidance inside a composite's shards is not supported; "
                             "use shards with guidance_scale 0")
        if evaluation != "loop" and not callable(shards):
            raise ValueError(f"{evaluation} evaluation needs a stack (ShardStack or GroupedUNet), not a list")
        if evaluation in ("loop", "auto") and not hasattr(shards, "__getitem__"):
            raise ValueError(f"{evaluation} evaluation needs the shards one by one, not only a stack")
        self.shards = shards
        self.n = n
        self.register_buffer("priors", priors.float())
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[list(range(n)) if subset is None else list(subset)] = True
        if not allowed.any():
            raise ValueError("the subset allows no shard")
        if estimator == "router":
            trained_on = set(router.config.get("trained_on") or range(n))
            if trained_on != set(allowed.nonzero().flatten().tolist()):
                # A router is p(i | x_t, y) estimated on its training shards' data: it has seen the excluded
                # owners' data and would renormalize over the wrong set.
                raise ValueError(f"the router was trained on shards {sorted(trained_on)} but the composite may use "
                                 f"{allowed.nonzero().flatten().tolist()}; train a router on exactly the allowed "
                                 "shards' data, or use the prior or path estimator")
        self.register_buffer("allowed", allowed)
        self.estimator, self.scheduler, self.eta = estimator, scheduler, eta
        self.threshold, self.evaluation, self.router, self.generator = threshold, evaluation, router, generator
        self.grouped_rows = grouped_rows
        if allocation not in ("draw", "stratified"):
            raise ValueError(f"unknown allocation {allocation!r}; choose draw or stratified")
        self.allocation = allocation
        self.reset()

    @property
    def pointwise(self) -> bool:
        """Whether eps is a function of (x_t, t, y) alone (`average`, `router`): what a likelihood bound or a
        membership score may evaluate. `path` weights follow the trajectory, `prior` draws a shard per sample."""
        return self.estimator in ("average", "router")

    def reset(self) -> None:
        """Start a new trajectory: clears path weights, the prior's draw and the trace."""
        self.log_w: torch.Tensor | None = None  # [B, N] (path)
        self.choice: torch.Tensor | None = None  # [B] (prior)
        self._pending: tuple[torch.Tensor, float] | None = None  # (mu_i [N, B, ...], sigma) awaiting x_prev
        self.trace: list[torch.Tensor] = []  # weights [B, N] at each call
        self.evaluations = 0  # (shard, sample) denoiser evaluations, for cost accounting

    def _log_prior(self, labels: torch.Tensor) -> torch.Tensor:
        """log lambda_i(y) masked to the allowed shards, [B, N] (-inf where excluded or lambda = 0)."""
        lam = self.priors[:, labels].T  # [B, N]
        lam = torch.where(self.allowed[None, :], lam, torch.zeros_like(lam))
        if (lam.sum(1) == 0).any():
            bad = labels[lam.sum(1) == 0].unique().tolist()
            raise ValueError(f"no allowed shard holds data for label(s) {bad}")
        return lam.log()

    def weights(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Current weights [B, N] (rows sum to 1 over the allowed shards)."""
        log_prior = self._log_prior(labels)
        if self.estimator == "average":
            return log_prior.softmax(1)
        if self.estimator == "prior":
            if self.choice is None:
                probs = log_prior.softmax(1).cpu()  # the generator lives on the CPU
                if self.allocation == "stratified":
                    self.choice = stratified_choice(probs, labels.cpu(), self.generator).to(labels.device)
                else:
                    self.choice = torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(labels.device)
            return F.one_hot(self.choice, self.n).float()
        if self.estimator == "router":
            logits = self.router(x_t, t, labels).float()
            return (logits + torch.where(log_prior.isinf(), log_prior, torch.zeros_like(log_prior))).softmax(1)
        # path: fold in the transition just observed, then normalize.
        if self.log_w is None:
            self.log_w = log_prior.double()
        if self._pending is not None:
            mu, sigma = self._pending
            if mu.shape[1] != x_t.shape[0]:
                raise RuntimeError("batch changed mid-trajectory; call reset() first")
            sq = ((x_t.double()[None] - mu.double()) ** 2).flatten(2).sum(2).T  # [B, N]
            self.log_w = self.log_w - sq / (2 * sigma**2)
            self._pending = None
        return self.log_w.softmax(1).float()

    def _shard_eps(self, x_t, t, labels, need: torch.Tensor) -> torch.Tensor:
        """eps_i for the (shard, sample) pairs in `need` [B, N]; zeros elsewhere. -> [N, B, C, H, W]."""
        out = x_t.new_zeros((self.n, *x_t.shape))
        active = need.any(0).nonzero().flatten()
        mode = self.evaluation
        if mode == "auto":
            limit = self.grouped_rows if x_t.device.type == "cpu" else None
            small = limit is None or int(need.sum(0).max()) <= limit
            mode = "grouped" if small else "loop"
        if mode == "batched":
            out[active] = self.shards(x_t, t, labels, index=active)
            self.evaluations += len(active) * x_t.shape[0]
            return out
        if mode == "grouped":
            # Each active shard's rows, padded to the largest group by repeating its first row.
            cols = need[:, active]  # [B, n]
            size = int(cols.sum(0).max())
            order = torch.argsort(cols.to(torch.int8), dim=0, descending=True, stable=True)[:size].T  # [n, G]
            valid = torch.gather(cols.T, 1, order)  # [n, G]: False on padding
            order = torch.where(valid, order, order[:, :1])
            eps = self.shards(x_t[order], t[order], labels[order], index=active)  # [n, G, C, H, W]
            shard_idx = active[:, None].expand_as(order)
            out[shard_idx[valid], order[valid]] = eps[valid]
            self.evaluations += int(valid.sum())
            return out
        for i in active.tolist():
            rows = need[:, i].nonzero().flatten()
            if len(rows) == x_t.shape[0]:
                out[i] = self.shards[i](x_t, t, labels)
            else:
                out[i, rows] = self.shards[i](x_t[rows], t[rows], labels[rows])
            self.evaluations += len(rows)
        return out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # 1. Weights at (x_t, t, y), after folding in the last transition (path).
        w = self.weights(x_t, t, labels)  # [B, N]
        # 2. Sparse rule: drop (shard, sample) pairs below the threshold and renormalize. Dense (threshold 0)
        #    evaluates every allowed shard with lambda_i(y) > 0, even where its weight underflowed.
        #    `prior` is sparse by construction: only the drawn shard is evaluated.
        if self.estimator == "prior":
            need = w > 0
        else:
            need = w > self.threshold if self.threshold > 0 else self._log_prior(labels).isfinite()
        need &= self.allowed[None, :]
        need[torch.arange(len(w), device=w.device), w.argmax(1)] = True  # never drop a sample's best shard
        w = torch.where(need, w, torch.zeros_like(w))
        w = w / w.sum(1, keepdim=True)
        if self.estimator == "path" and self.threshold > 0:
            self.log_w = torch.where(need, self.log_w, torch.full_like(self.log_w, -math.inf))
        self.trace.append(w.detach().cpu())
        # 3. Evaluate the shards that matter and mix their predictions.
        eps_i = self._shard_eps(x_t, t, labels, need)  # [N, B, C, H, W]
        eps = torch.einsum("bn,nb...->b...", w.to(eps_i.dtype), eps_i)
        # 4. Remember each shard's transition mean for the next call (path, stochastic steps only).
        if self.estimator == "path":
            a, b, sigma = transition(self.scheduler, int(t.flatten()[0]), self.eta)
            if sigma > 0:
                self._pending = (a * x_t[None] + b * eps_i, sigma)
        return eps

    def attribution(self) -> dict[str, torch.Tensor]:
        """Per-sample shard weights over the trajectory: `mean` (averaged over steps) and `final`, each [B, N]."""
        if not self.trace:
            raise RuntimeError("no trajectory recorded yet")
        stacked = torch.stack(self.trace)  # [T, B, N]
        return {"mean": stacked.mean(0), "final": stacked[-1]}


# ---------------------------------------------------------------------------------------------------------------
# Router: the published method's weight estimator.


class Router(torch.nn.Module):
    """A small classifier r(x_t, t, y) -> logits over shards.

    Conv features of x_t, modulated by embeddings of the timestep and the label (last label index: null).
    """

    def __init__(self, n_shards: int, channels: int = 1, num_classes: int = 10, width: int = 32,
                 num_train_timesteps: int = 1000, trained_on: list[int] | None = None):
        super().__init__()
        # trained_on: the shard indices whose data the router saw (a composite refuses it for any other subset).
        self.config = dict(n_shards=n_shards, channels=channels, num_classes=num_classes, width=width,
                           num_train_timesteps=num_train_timesteps, trained_on=trained_on)
        self.conv1 = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.t_embed = torch.nn.Sequential(torch.nn.Linear(32, 2 * width), torch.nn.SiLU(),
                                           torch.nn.Linear(2 * width, 2 * width))
        self.y_embed = torch.nn.Embedding(num_classes + 1, 2 * width)
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * width, 2 * width), torch.nn.SiLU(),
                                        torch.nn.Linear(2 * width, n_shards))

    def _time_features(self, t: torch.Tensor) -> torch.Tensor:
        s = t.float()[:, None] / self.config["num_train_timesteps"]
        freqs = torch.exp(torch.linspace(0, math.log(1000), 16, device=t.device))[None]
        return torch.cat([torch.sin(s * freqs * math.pi), torch.cos(s * freqs * math.pi)], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x_t))
        h = self.conv2(h)
        h = h + (self.t_embed(self._time_features(t)) + self.y_embed(labels))[:, :, None, None]
        h = F.silu(h).mean((2, 3))
        return self.head(h)


@dataclass
class RouterConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    width: int = 32
    label_dropout: float = 0.3  # the router must also know p(i | x_t) for unconditional sampling
    seed: int = 0


def train_router(data: Dataset, shard_of: torch.Tensor, n_shards: int, num_classes: int, cfg: RouterConfig,
                 schedule: NoiseSchedule | None = None, progress: bool = False) -> tuple[Router, list[float]]:
    """Train the router with cross-entropy on noised samples of all shards.

    Samples are drawn uniformly from the union of the shards' data, so the classifier estimates p(i | x_t, y)
    with the data's own class priors.

    Args:
        data: all shards' samples together.
        shard_of: [N] shard index of each sample.
        n_shards: number of shards (classes of the router).
        num_classes: number of labels (the null label is `num_classes`).
        cfg: optimisation settings.
        schedule: the forward process shared with the shards.
    Returns:
        The trained router (eval mode) and its loss history.
    """
    from tqdm.auto import tqdm

    schedule = schedule or NoiseSchedule()
    noise = train_scheduler(schedule)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the router's initial weights from its seed; the caller's RNG untouched
        torch.manual_seed(cfg.seed)
        router = Router(n_shards, data.x.shape[1], num_classes, cfg.width, schedule.num_train_timesteps,
                        trained_on=sorted(shard_of.unique().tolist()))
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="router", disable=not progress, leave=False):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
        t = torch.randint(0, schedule.num_train_timesteps, (cfg.batch_size,), generator=g)
        eps = torch.randn((cfg.batch_size, *data.x.shape[1:]), generator=g)
        y = torch.where(torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout,
                        torch.full_like(data.y[idx], num_classes), data.y[idx])
        loss = F.cross_entropy(router(noise.add_noise(data.x[idx], eps, t), t, y), shard_of[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return router.eval(), losses
