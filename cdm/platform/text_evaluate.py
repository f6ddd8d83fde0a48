"""Prompt alignment of a served text model (docs/design.md §2b, TIFA's idea without a VQA model): generate one image
per prompt through the model's own pyfunc, let an attribute classifier trained on public images only answer each
prompt's questions (which digit, what colour, on which side), and report the share answered right with a bootstrap
interval — beside the real images' score (the ceiling: what the classifier gets right on real held-out images)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def generate(model, prompts: Sequence[str], seed: int = 0, batch: int = 100, **request) -> dict:
    """One image per prompt from a loaded text pyfunc (`prompts` requests of up to `batch`): {"images" [N, 3, H, W],
    "attribution" [{owner key: weight}] (composites only)}."""
    images, attribution = [], []
    for i in range(0, len(prompts), batch):
        out = model.predict({"prompts": list(prompts[i:i + batch]), "seed": seed + i, **request})
        images.append(torch.from_numpy(np.asarray(out["images"])))
        attribution += out.get("attribution", [])
    return {"images": torch.cat(images), "attribution": attribution}


def owner_share(attribution: list[dict], owner_key: str) -> float:
    """The mean weight of one owner over the samples' attributions."""
    return float(np.mean([a.get(owner_key, 0.0) for a in attribution])) if attribution else 0.0


def alignment_of(model, clf, scenes, seed: int = 0, **request) -> dict:
    """The model's alignment on the scenes' captions: {score, ci, images, questions} (+ its attribution)."""
    from cdm.text.alignment import alignment
    from cdm.text.digits import caption

    out = generate(model, [caption(s) for s in scenes], seed, **request)
    return {**alignment(clf, out["images"], scenes).as_dict(), "attribution": out["attribution"]}
