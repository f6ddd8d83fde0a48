"""Prompt alignment, TIFA's idea without a VQA model: every caption of the compositional digits implies questions
(which digit is on the left? what colour is it?) whose answers are known; an attribute classifier trained on the
public split only answers them on generated images; alignment is the share answered right.

    classifier   images [N, 3, 32, 32] -> per side: digit logits (10 + empty), colour logits (6 + empty)
    alignment    for each (image, prompt): the questions of the prompt's scene, answered by the classifier

Its noise: questions of one image are not independent, so the interval is a bootstrap over images (not over
questions). Its ceiling: the same classifier on real held-out images with their own captions (what a perfect
generator would score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cdm.text.digits import COLOUR_NAMES, SIDES, Scene, questions

EMPTY_DIGIT, EMPTY_COLOUR = 10, len(COLOUR_NAMES)


def scene_targets(scenes: Sequence[Scene]) -> torch.Tensor:
    """[N, 4] long: (left digit, left colour, right digit, right colour); an empty slot is class 10 / 6."""
    rows = []
    for scene in scenes:
        row = []
        for obj in scene:
            row += [EMPTY_DIGIT, EMPTY_COLOUR] if obj is None else [obj[0], COLOUR_NAMES.index(obj[1])]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


class AttributeClassifier(torch.nn.Module):
    """A small CNN over a 32x32 RGB canvas with one head per (side, attribute)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.SiLU(), torch.nn.MaxPool2d(2),  # 16x16
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.SiLU(), torch.nn.MaxPool2d(2),  # 8x8
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.SiLU())
        # Each side reads its own half of the 8x8 feature map (columns 0-3 left, 4-7 right).
        self.digit = torch.nn.Linear(2 * width * 8 * 4, EMPTY_DIGIT + 1)
        self.colour = torch.nn.Linear(2 * width * 8 * 4, EMPTY_COLOUR + 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(x)  # [B, 2w, 8, 8]
        halves = [h[..., :4].flatten(1), h[..., 4:].flatten(1)]
        return [self.digit(halves[0]), self.colour(halves[0]), self.digit(halves[1]), self.colour(halves[1])]


@dataclass
class ClassifierConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def train_attribute_classifier(x: torch.Tensor, scenes: Sequence[Scene], cfg: ClassifierConfig | None = None
                               ) -> AttributeClassifier:
    """Train on public images [N, 3, 32, 32] in [-1, 1] and their scenes."""
    cfg = cfg or ClassifierConfig()
    targets = scene_targets(scenes)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        logits = model(x[idx])
        loss = sum(F.cross_entropy(lg, targets[idx, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def answers(model: AttributeClassifier, x: torch.Tensor) -> torch.Tensor:
    """The classifier's answers [N, 4] (left digit, left colour, right digit, right colour)."""
    return torch.stack([lg.argmax(1) for lg in model(x)], 1)


def answered(model: AttributeClassifier, x: torch.Tensor, scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """(questions answered right, questions asked) per image [N] each."""
    got, want = answers(model, x), scene_targets(scenes)
    right, asked = np.zeros(len(scenes)), np.zeros(len(scenes))
    for n, scene in enumerate(scenes):
        for side, attribute, _ in questions(scene):
            k = SIDES.index(side) * 2 + (0 if attribute == "digit" else 1)
            asked[n] += 1
            right[n] += float(got[n, k] == want[n, k])
    return right, asked


@dataclass
class Alignment:
    score: float  # share of questions answered right
    low: float  # 95% bootstrap interval over images
    high: float
    images: int
    questions: int

    def as_dict(self) -> dict:
        return {"score": round(self.score, 4), "ci": [round(self.low, 4), round(self.high, 4)],
                "images": self.images, "questions": self.questions}


def alignment(model: AttributeClassifier, x: torch.Tensor, scenes: Sequence[Scene], boot: int = 2000,
              seed: int = 0) -> Alignment:
    """Share of the prompts' questions the classifier answers right on images `x` (one per scene), with a
    bootstrap interval over images."""
    right, asked = answered(model, x, scenes)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scenes), (boot, len(scenes)))
    shares = right[idx].sum(1) / asked[idx].sum(1)
    return Alignment(float(right.sum() / asked.sum()), float(np.quantile(shares, 0.025)),
                     float(np.quantile(shares, 0.975)), len(scenes), int(asked.sum()))
