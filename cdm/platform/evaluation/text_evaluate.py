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
    schema = model.metadata.get_input_schema()
    if schema is not None and "prompts" not in schema.input_names():  # a version logged before `prompts` existed
        requests = [{"prompt": p, "n": 1, "seed": seed + i, **request} for i, p in enumerate(prompts)]
    else:
        requests = [{"prompts": list(prompts[i:i + batch]), "seed": seed + i, **request}
                    for i in range(0, len(prompts), batch)]
    for r in requests:
        out = model.predict(r)
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


# -- `cdm evaluate` on a text workspace -----------------------------------------------------------------------------
def attribute_instrument(steps: int, seed: int = 0):
    """The attribute classifier behind alignment and the FID features, trained on compositional digits rendered from
    the public glyphs of the bundled MNIST digits (no owner's data, no workspace data)."""
    from cdm.text.alignment import ClassifierConfig, train_attribute_classifier
    from cdm.text.digits import Domain, glyph_pools, glyph_split, make_scenes, render_all

    pub_i, _, _ = glyph_split(0)
    scenes = make_scenes(1500, Domain(), 1)
    x = torch.from_numpy(render_all(scenes, glyph_pools(pub_i), 1)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return train_attribute_classifier(x, scenes, ClassifierConfig(steps=steps, seed=seed))


def at_canvas(x: torch.Tensor) -> torch.Tensor:
    """Images at the classifier's 32x32 canvas."""
    import torch.nn.functional as F

    return x if x.shape[-1] == 32 else F.interpolate(x, size=32, mode="bilinear", antialias=True)


def classifier_features(clf, x: torch.Tensor) -> np.ndarray:
    """The classifier's trunk, pooled: [N, 64] (the FID features)."""
    with torch.no_grad():
        return torch.cat([clf.features(at_canvas(x[i:i + 256])).mean((2, 3))
                          for i in range(0, len(x), 256)]).double().numpy()


def _fid_boot(ref: np.ndarray, fake: np.ndarray, rng, boot: int = 200) -> list[float]:
    from cdm.quality import frechet_distance

    vals = [frechet_distance(ref[rng.integers(0, len(ref), len(ref))], fake[rng.integers(0, len(fake), len(fake))])
            for _ in range(boot)]
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]


def _ratio_boot(ref, a, b, rng, boot: int = 200) -> list[float]:
    """FID(a) / FID(b) with paired resampling (a and b from the same prompts and noise)."""
    from cdm.quality import frechet_distance

    vals = []
    for _ in range(boot):
        i, j = rng.integers(0, len(a), len(a)), rng.integers(0, len(ref), len(ref))
        vals.append(frechet_distance(ref[j], a[i]) / frechet_distance(ref[j], b[i]))
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]


def evaluate_text(ctx, alias: str = "production") -> dict:
    """A text composite against the images of the owners it serves: half of them (at most
    `evaluate.n_samples`) give the prompts, the other half is the FID reference; the prompts' own images are the
    real-vs-real floor at the same N. Alignment where the captions follow the compositional grammar (else n/a),
    with the real images' score as the ceiling. The newest servable paragon on exactly the composite's owners is
    measured on the same prompts and noise, and the ratios come with paired bootstrap intervals."""
    from cdm.platform.models import gate, registry
    from cdm.platform.models.composites import load_production, no_composite, production
    from cdm.platform.workspace.errors import WorkspaceError
    from cdm.quality import frechet_distance
    from cdm.text.alignment import alignment
    from cdm.text.captions import CaptionedDataset
    from cdm.text.digits import parse_caption

    prod = production(ctx, alias)
    if prod is None:
        raise no_composite(alias)
    version, spec = prod
    e, ws = ctx.params.evaluate, ctx.ws
    served_keys = {k for s in spec["shards"] for k in s["owners"]}
    owners = [o for o in gate.active_owners(ws) if ws.owner_key(o) in served_keys]
    data = CaptionedDataset.concat([ws.load_captioned(o, ctx.params.data.image_size) for o in owners])
    n = min(e.n_samples, len(data) // 2)
    if n < 10:
        raise WorkspaceError(f"the served owners hold {len(data)} images; an evaluation needs 20 at least")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(e.seed)).tolist()
    prompted, reference = data.subset(order[:n]), data.subset(order[n:2 * n])
    clf = attribute_instrument(e.feature_steps, e.seed)
    ref = classifier_features(clf, reference.x)
    try:
        scenes = [parse_caption(c) for c in prompted.captions]
    except ValueError:
        scenes = None  # captions outside the compositional grammar: no questions to ask of the images
    request = {"seed": e.seed}
    with load_production(ctx, alias) as model:
        out = generate(model, prompted.captions, **request)
        model.unwrap_python_model().require_unrevoked()  # no figures from weights revoked while it sampled
    rng = np.random.default_rng(e.seed)
    fake = classifier_features(clf, out["images"])
    floor = frechet_distance(ref, classifier_features(clf, prompted.x))
    metrics = {"composite_version": version, "composite_alias": alias, "estimator": spec["estimator"],
               "shards": len(spec["shards"]), "conditioning": "text", "n": n,
               "fid": frechet_distance(ref, fake), "fid_ci": _fid_boot(ref, fake, rng), "floor_real": floor,
               "attribution": {k: round(owner_share(out["attribution"], k), 4) for k in sorted(served_keys)}}
    if scenes is not None:
        metrics["alignment"] = alignment(clf, at_canvas(out["images"]), scenes).as_dict()
        metrics["alignment_ceiling"] = alignment(clf, at_canvas(prompted.x), scenes).as_dict()
    else:
        metrics["alignment_note"] = "n/a: the captions do not follow the compositional grammar (digit, colour, side)"
    para = _paragon_version(ctx, served_keys)
    if para is None:
        metrics["paragon_note"] = "no servable paragon trained on exactly the composite's owners (`cdm train --paragon`)"
    else:
        with ws.tempdir() as tmp:
            pmodel = registry.load_pyfunc(ctx.client, f"models:/{registry.PARAGON}/{para}", tmp)
            pout = generate(pmodel, prompted.captions, num_inference_steps=spec["num_inference_steps"],
                            guidance_scale=spec["guidance_scale"], **request)
        pfake = classifier_features(clf, pout["images"])
        metrics.update(paragon_version=para, fid_paragon=frechet_distance(ref, pfake),
                       fid_ratio=metrics["fid"] / frechet_distance(ref, pfake),
                       fid_ratio_ci=_ratio_boot(ref, fake, pfake, rng))
        if scenes is not None:
            metrics["alignment_paragon"] = alignment(clf, at_canvas(pout["images"]), scenes).as_dict()
    from cdm.platform.evaluation.evaluate import regressions

    metrics["regressions"] = regressions(metrics, ctx.params)  # the class gate: the figures a text composite has
    return metrics


def _paragon_version(ctx, owner_keys: set[str]) -> str | None:
    import json

    from cdm.platform.models import gate, registry

    revoked = gate.revoked_owner_keys(ctx.ws)
    for mv in reversed(registry.versions(ctx.client, registry.PARAGON)):
        if set(json.loads(mv.tags.get("cdm.owner_keys", "[]"))) == owner_keys and \
                gate.why_unservable(ctx, mv, revoked) is None:
            return str(mv.version)
    return None


def text_evaluation_text(m: dict) -> str:
    """What `cdm evaluate` prints for a text composite."""
    def a(d):
        return f"{d['score']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"

    lines = [f"cdm-composite v{m['composite_version']} ({m['estimator']}, {m['shards']} shards), {m['n']} prompts "
             "from the served owners' captions",
             f"FID {m['fid']:.3f} [{m['fid_ci'][0]:.3f}, {m['fid_ci'][1]:.3f}] (real vs real at the same N: "
             f"{m['floor_real']:.3f})"]
    if "alignment" in m:
        lines.append(f"prompt alignment {a(m['alignment'])}; real images {a(m['alignment_ceiling'])} (ceiling)")
    else:
        lines.append(f"prompt alignment {m['alignment_note']}")
    if "paragon_version" in m:
        lines.append(f"paragon v{m['paragon_version']}: FID {m['fid_paragon']:.3f}; FID ratio {m['fid_ratio']:.3f} "
                     f"[{m['fid_ratio_ci'][0]:.3f}, {m['fid_ratio_ci'][1]:.3f}]" +
                     (f"; alignment {a(m['alignment_paragon'])}" if "alignment_paragon" in m else ""))
    else:
        lines.append(m["paragon_note"])
    lines.append("regressions: " + ("; ".join(m["regressions"]) if m["regressions"] else "none"))
    return "\n".join(lines)
