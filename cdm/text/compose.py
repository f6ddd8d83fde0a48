"""Composition by prompt (docs/design.md §2b): compartments on one base, the prompt prior p(i | c), and classifier-free
guidance applied once, to the composite.

    eps_c = sum_i w_i(x_t, t, c) eps_i(x_t, t, c)        w_i(., c) ∝ lambda_i(c) p_{i,t}(x_t | c)
    eps_u = sum_i w_i(x_t, t, u) eps_i(x_t, t, u)        u: the negative prompt, or the empty one
    eps   = eps_u + s (eps_c - eps_u)                    s: guidance_scale (1: the conditional mixture alone)

Guidance is applied to the two mixtures, never inside a compartment: each compartment guided by its own
unconditional prediction would sharpen p_i(x | c) / p_i(x), not the composite's p(x | c) / p(x).

`lambda_i(c) = p(i | c)` comes from `PromptPrior`, a linear classifier over the base text encoder's pooled caption
states, trained on the owners' captions (`train_prompt_prior`): for a caption every owner holds alike it returns their
shares, for a caption only one owner's data matches it returns that owner. The empty prompt's prior is each
compartment's share of all captions.

Estimators of w (as for class labels, `cdm/compose.py`):
- `path`: log w starts at log lambda(c) (resp. lambda(u)) and gains -|x_prev - mu_i|^2 / 2 sigma_t^2 per stochastic
  step, with mu_i from eps_i(., c) (resp. eps_i(., u)). Exact for exact compartments; 2N evaluations a step.
- `average`: w = lambda, fixed. 2N evaluations a step.
- `prior`: one compartment per sample drawn from lambda(c), run alone (ancestral sampling of the conditional
  mixture); guided within the drawn compartment, whose unconditional prediction stands for the mixture's (two
  evaluations a step: the paragon's cost). The documented approximation of the exact rule above, which `path` and
  `average` apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from cdm.schedulers import check_linear, transition

TextEstimator = Literal["prior", "path", "average"]
TEXT_ESTIMATORS: tuple[str, ...] = get_args(TextEstimator)


def pooled(states: torch.Tensor, ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """A caption's features [N, D]: the mean of its token states up to and including the first end token."""
    is_end = (ids == eos_token_id).int()
    first_end = torch.where(is_end.any(1), is_end.argmax(1), torch.full_like(is_end[:, 0], ids.shape[1] - 1))
    mask = (torch.arange(ids.shape[1])[None] <= first_end[:, None]).to(states.dtype)  # [N, L]
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class PromptPrior(torch.nn.Module):
    """p(i | c): a linear classifier over pooled caption features. `shares` [N] is p(i) (the empty prompt's)."""

    def __init__(self, dim: int, n: int, shares: torch.Tensor | None = None):
        super().__init__()
        self.linear = torch.nn.Linear(dim, n)
        self.register_buffer("shares", torch.full((n,), 1.0 / n) if shares is None else shares.float())

    def forward(self, features: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
        """log p(i | c) [B, N]; rows flagged `empty` get log p(i)."""
        logp = self.linear(features).log_softmax(1)
        if empty is not None:
            logp = torch.where(empty[:, None], self.shares.log()[None].expand_as(logp), logp)
        return logp


@dataclass
class PromptPriorConfig:
    steps: int = 2000  # full-batch Adam steps: the features are few and fixed (~1.5 s for 2,000 captions on 2 cores)
    lr: float = 0.05
    # None: a prompt only one owner's captions match must get her (bench/text.py's colour x digit-half owners:
    # single-owner lambda 0.96-0.99 without it, 0.63-0.72 with 1e-3), and captions every owner holds alike still get
    # about their shares (iid owners: mean largest lambda 0.20 against 0.125 for exact shares; 0.17 with 1e-3).
    weight_decay: float = 0.0
    seed: int = 0


def train_prompt_prior(features: torch.Tensor, owner: torch.Tensor, n: int, cfg: PromptPriorConfig | None = None
                       ) -> PromptPrior:
    """Fit p(i | c) on every owner's caption features [M, D] and their compartment index [M] (cross-entropy over
    all captions at once: the classifier's optimum is each caption's empirical compartment shares)."""
    cfg = cfg or PromptPriorConfig()
    shares = torch.bincount(owner, minlength=n).float()
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        prior = PromptPrior(features.shape[1], n, shares / shares.sum())
    # The standardization is folded into the linear layer after training.
    z = (features - mean) / std
    opt = torch.optim.Adam(prior.linear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        loss = F.cross_entropy(prior.linear(z), owner)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = prior.linear.weight / std[None]
        prior.linear.bias -= (w * mean[None]).sum(1)
        prior.linear.weight.copy_(w)
    return prior.eval().requires_grad_(False)


class GuidedComposite(torch.nn.Module):
    """Compartments `(x_t, t, cond) -> eps` composed by prompt and guided once (see the module docstring).

    Args:
        shards: the compartments' denoisers; `cond` is handed to them as given (caption states [B, L, D] for
            UNets, anything indexable by rows for tests).
        estimator: `prior`, `path` or `average`.
        scheduler: the sampling scheduler (`path` scores its transitions); `eta` for DDIM.
        guidance_scale: s; 1 evaluates the conditional mixture only.
        subset: indices of the compartments allowed (access rights, forgetting); weights renormalize over them.
        generator: randomness of the `prior` draw.
    """

    def __init__(self, shards: Sequence, estimator: TextEstimator = "prior", scheduler=None, eta: float = 1.0,
                 guidance_scale: float = 1.0, subset: Sequence[int] | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if estimator not in TEXT_ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {TEXT_ESTIMATORS}")
        if estimator == "path":
            from cdm.compose import check_path_sampler

            check_path_sampler(scheduler, eta)
        elif scheduler is not None:
            check_linear(scheduler)
        # Kept as given (not copied): a server that takes a revoked compartment out of its set mid-trajectory is
        # seen by the next evaluation.
        self.shards, self.n = shards, len(shards)
        allowed = torch.zeros(self.n, dtype=torch.bool)
        allowed[list(range(self.n)) if subset is None else list(subset)] = True
        if not allowed.any():
            raise ValueError("the subset allows no compartment")
        self.register_buffer("allowed", allowed)
        self.estimator, self.scheduler, self.eta = estimator, scheduler, eta
        self.guidance_scale, self.generator = float(guidance_scale), generator
        self.start(torch.zeros(0, self.n), torch.zeros(0, self.n))

    def start(self, log_prior_c: torch.Tensor, log_prior_u: torch.Tensor) -> None:
        """A new trajectory for a batch whose priors are log lambda(c) and log lambda(u), each [B, N]."""
        def masked(lp):
            lp = torch.where(self.allowed[None], lp.double(), torch.full_like(lp.double(), -math.inf))
            if len(lp) and not lp.isfinite().any(1).all():
                raise ValueError("no allowed compartment has data for this prompt")
            return lp

        self.log_w = {"c": masked(log_prior_c), "u": masked(log_prior_u)}
        self.choice: torch.Tensor | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._sigma = 0.0
        self.trace: list[torch.Tensor] = []
        self.evaluations = 0

    def _fold(self, x_t: torch.Tensor) -> None:
        """path: the transition just observed, scored under each compartment's mean (both branches)."""
        for branch, mu in self._pending.items():
            sq = ((x_t.double()[None] - mu.double()) ** 2).flatten(2).sum(2).T  # [B, N]
            self.log_w[branch] = self.log_w[branch] - sq / (2 * self._sigma ** 2)
        self._pending = {}

    def weights(self, branch: str) -> torch.Tensor:
        return self.log_w[branch].softmax(1).float()

    def _eval(self, x_t, t, cond, need: torch.Tensor) -> torch.Tensor:
        """eps_i for the (compartment, sample) pairs in `need` [B, N]; zeros elsewhere -> [N, B, ...]."""
        out = x_t.new_zeros((self.n, *x_t.shape))
        for i in need.any(0).nonzero().flatten().tolist():
            rows = need[:, i].nonzero().flatten()
            full = len(rows) == len(x_t)
            out[i] = self.shards[i](x_t, t, cond) if full else out[i].index_put(
                (rows,), self.shards[i](x_t[rows], t[rows], cond[rows]))
            self.evaluations += len(rows)
        return out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        guided = self.guidance_scale != 1.0
        # 1. Weights: fold in the last transition (path), or draw the compartment (prior, once a trajectory).
        if self._pending:
            self._fold(x_t)
        if self.estimator == "prior":
            if self.choice is None:
                probs = self.weights("c").cpu()
                self.choice = torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(x_t.device)
            w_c = F.one_hot(self.choice, self.n).to(x_t.dtype)
            w_u = w_c
        else:
            w_c, w_u = self.weights("c").to(x_t.dtype), self.weights("u").to(x_t.dtype)
        self.trace.append(w_c.detach().cpu())
        # 2. Each branch's compartments and their mixture.
        need_c = (w_c > 0) if self.estimator == "prior" else self.log_w["c"].isfinite()
        eps_ic = self._eval(x_t, t, cond, need_c)  # [N, B, ...]
        eps_c = torch.einsum("bn,nb...->b...", w_c, eps_ic)
        eps_iu = None
        if guided:
            need_u = (w_u > 0) if self.estimator == "prior" else self.log_w["u"].isfinite()
            eps_iu = self._eval(x_t, t, uncond, need_u)
            eps_u = torch.einsum("bn,nb...->b...", w_u, eps_iu)
            eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        else:
            eps = eps_c
        # 3. path: each compartment's transition mean, scored against the step the sampler takes next.
        if self.estimator == "path":
            a, b, sigma = transition(self.scheduler, int(t.flatten()[0]), self.eta)
            if sigma > 0:
                self._sigma = sigma
                self._pending = {"c": a * x_t[None] + b * eps_ic}
                if eps_iu is not None:
                    self._pending["u"] = a * x_t[None] + b * eps_iu
        return eps

    def attribution(self) -> dict[str, torch.Tensor]:
        """Per-sample weights of the conditional mixture over the trajectory: `mean` and `final`, each [B, N]."""
        if not self.trace:
            raise RuntimeError("no trajectory recorded yet")
        stacked = torch.stack(self.trace)
        return {"mean": stacked.mean(0), "final": stacked[-1]}
