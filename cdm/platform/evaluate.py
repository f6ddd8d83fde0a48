"""Evaluation of the production composite (docs/design.md §6): FID/KID with our feature network, ratio to the
paragon, attribution summary, memorization, membership inference on revoked owners, regression thresholds.

Outputs name owners by key only (they are logged to MLflow and written to metrics.json). KID is torchmetrics' value
as is (the unbiased polynomial-kernel MMD² in the feature network's own units), never multiplied: its magnitude
depends on the feature scale, so it compares runs with the same `feature_sha256`, not Inception-based KIDs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cdm.config import Params
from cdm.data import Dataset, digits_dataset, digits_uint8, heldout_split
from cdm.platform import registry
from cdm.platform.context import Context
from cdm.platform.errors import WorkspaceError

FEATURE_NET = "feature-net.safetensors"


def heldout(params: Params) -> Dataset:
    """The public held-out split that belongs to no owner (the bundled digits' fixed 20%)."""
    d = params.data
    if (d.image_size, d.channels, sorted(d.labels)) != (8, 1, list(range(10))):
        raise WorkspaceError("the bundled held-out split fits 8x8 grey digits only; this workspace's data differs")
    _, labels = digits_uint8()
    return digits_dataset(heldout_split(labels)[1])


def feature_net(ctx: Context):
    """The feature network, trained once on the held-out split and cached (safetensors + recorded sha256)."""
    from cdm.metrics import load_feature_net, save_feature_net, train_feature_net

    ws = ctx.ws
    path, record = ws.cache_dir / FEATURE_NET, ws.cache_dir / "feature-net.json"
    if path.exists() and record.exists():
        return load_feature_net(path, json.loads(record.read_text())["sha256"])
    data = heldout(ctx.params)
    net = train_feature_net(data, num_classes=10, steps=ctx.params.evaluate.feature_steps, seed=0)
    ws.cache_dir.mkdir(parents=True, exist_ok=True)
    sha = save_feature_net(net, path)
    record.write_text(json.dumps({"sha256": sha, "trained_on": "digits held-out split", "samples": len(data)}))
    return net


def owners_data(ctx: Context) -> Dataset:
    d = ctx.params.data
    return Dataset.concat([ctx.ws.load_owner(o, d.image_size, d.channels, d.labels) for o in ctx.ws.owners()])


def sample_paragon(c, n: int, seed: int) -> torch.Tensor | None:
    import mlflow

    mv = registry.latest(c, registry.PARAGON)
    if mv is None:
        return None
    model = mlflow.pyfunc.load_model(f"models:/{registry.PARAGON}/{mv.version}")
    return torch.from_numpy(model.predict({"n": n, "seed": seed})["images"])


def evaluate(ctx: Context) -> dict:
    """Metrics of the production composite against the owners' current data."""
    from cdm.metrics import fid_kid, memorization
    from cdm.platform.composites import load_production, production

    e, c = ctx.params.evaluate, ctx.client
    prod = production(ctx)
    if prod is None:
        raise WorkspaceError("no production composite; run `cdm compose` first")
    version, spec = prod
    real = owners_data(ctx)
    net = feature_net(ctx)
    out = load_production(ctx).predict({"n": e.n_samples, "seed": e.seed})
    fake = torch.from_numpy(out["images"])
    scores = fid_kid(real.x, fake, net)
    share: dict[str, float] = {}
    for row in out["attribution"]:
        for k, v in row.items():
            share[k] = share.get(k, 0.0) + v / len(out["attribution"])
    metrics = {
        "composite_version": version, "estimator": spec["estimator"], "shards": len(spec["shards"]),
        "n_samples": len(fake), "n_real": len(real), "fid": scores.fid, "kid": scores.kid_mean,
        "kid_std": scores.kid_std, "feature_sha256": scores.feature_sha256,
        "attribution": {k: round(v, 4) for k, v in sorted(share.items())},  # by owner key
        "memorization": memorization(fake, real.x)["share"],
    }
    paragon_mv = registry.latest(c, registry.PARAGON)
    active_keys = sorted(ctx.ws.owner_key(o) for o in ctx.ws.owners())
    if paragon_mv is not None and json.loads(paragon_mv.tags.get("cdm.owner_keys", "[]")) == active_keys:
        para = sample_paragon(c, e.n_samples, e.seed)
        p_scores = fid_kid(real.x, para, net)
        metrics.update(paragon_version=str(paragon_mv.version), paragon_fid=p_scores.fid, paragon_kid=p_scores.kid_mean,
                       fid_ratio=scores.fid / p_scores.fid, paragon_memorization=memorization(para, real.x)["share"])
    else:
        metrics.update(paragon_version=None, fid_ratio=None,
                       paragon_note="no paragon trained on exactly the current owners (`cdm train --paragon`)")
    metrics["membership_auc"] = revoked_membership(ctx)
    metrics["regressions"] = regressions(metrics, ctx.params)
    return metrics


def revoked_membership(ctx: Context) -> dict[str, float]:
    """Membership-inference AUC measured for each revoked owner when it was revoked (their data is gone now)."""
    from cdm.platform.revocations import all_revocations

    return {r.owner_key: r.forgetting_check.auc_after for r in all_revocations(ctx.ws)
            if r.completed and r.forgetting_check is not None and r.forgetting_check.auc_after is not None}


def regressions(metrics: dict, params: Params) -> list[str]:
    e, out = params.evaluate, []
    if metrics.get("fid_ratio") is not None and metrics["fid_ratio"] > e.fid_ratio_max:
        out.append(f"fid_ratio {metrics['fid_ratio']:.3f} > {e.fid_ratio_max}")
    if e.fid_max is not None and metrics["fid"] > e.fid_max:
        out.append(f"fid {metrics['fid']:.3f} > {e.fid_max}")
    for key, auc in metrics.get("membership_auc", {}).items():
        if auc > e.membership_auc_max:
            out.append(f"membership AUC {auc:.3f} on revoked {key} > {e.membership_auc_max}")
    if metrics["memorization"] > e.memorization_max:
        out.append(f"memorization {metrics['memorization']:.3f} > {e.memorization_max}")
    return out


def log_evaluation(ctx: Context, metrics: dict) -> str:
    """An MLflow run in experiment `cdm-evaluation` with the numeric metrics and metrics.json (keys, no raw ids)."""
    c = ctx.client
    exp = registry.experiment_id(c, ctx.artifact_root, "cdm-evaluation")
    run = c.create_run(exp, run_name=f"evaluate-composite-v{metrics['composite_version']}",
                       tags={"cdm.composite_version": str(metrics["composite_version"]),
                             "cdm.feature_sha256": metrics["feature_sha256"]})
    rid = run.info.run_id
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            c.log_metric(rid, k, float(v))
    c.log_dict(rid, metrics, "metrics.json")
    c.set_terminated(rid)
    return rid


def composite_membership_auc(ctx: Context, versions: dict[str, str], members: Dataset,
                             nonmembers: Dataset) -> dict[str, float]:
    """Membership-inference AUC per composite version; each distinct shard version is loaded and scored once.
    Score: the lowest unconditional denoising loss over the composite's shards."""
    import mlflow

    from cdm.metrics import denoising_loss, membership_auc
    from cdm.model import UNetDenoiser, model_config_of
    from cdm.schedulers import NoiseSchedule, train_scheduler
    from cdm.platform.weights import UNET_ARTIFACT, load_verified_unet

    specs = {}
    for tag, version in versions.items():
        spec_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.COMPOSITE}/{version}",
                                                            tracking_uri=ctx.tracking_uri))
        specs[tag] = json.loads((spec_dir / "artifacts" / "spec.json").read_text())
    losses: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs.values():
        alphas_cumprod = train_scheduler(NoiseSchedule(**spec.get("schedule", {}))).alphas_cumprod
        for shard in spec["shards"]:
            ref = (shard["model"], shard["version"])
            if ref in losses:
                continue
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{ref[0]}/{ref[1]}",
                                                             tracking_uri=ctx.tracking_uri))
            unet = load_verified_unet(local / "artifacts" / UNET_ARTIFACT, shard["weights_sha256"])
            null_label = model_config_of(unet).null_label
            den = UNetDenoiser(unet, null_label)
            losses[ref] = tuple(denoising_loss(den, d.x, torch.full((len(d),), null_label), alphas_cumprod, repeats=2)
                                for d in (members, nonmembers))
    out = {}
    for tag, spec in specs.items():
        refs = [(s["model"], s["version"]) for s in spec["shards"]]
        out[tag] = membership_auc(torch.stack([losses[r][0] for r in refs]).min(0).values,
                                  torch.stack([losses[r][1] for r in refs]).min(0).values)
    return out
