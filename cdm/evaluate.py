"""Evaluation of the production composite (DESIGN.md §6): FID/KID with our feature network, ratio to the
paragon, attribution summary, memorization, membership inference on revoked owners, regression thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cdm import registry
from cdm.config import Params
from cdm.data import Dataset, digits_dataset, digits_uint8, heldout_split
from cdm.workspace import Workspace, WorkspaceError

FEATURE_NET = "feature-net.safetensors"


def heldout(params: Params) -> Dataset:
    """The public held-out split that belongs to no owner (the bundled digits' fixed 20%)."""
    d = params.data
    if (d.image_size, d.channels, sorted(d.labels)) != (8, 1, list(range(10))):
        raise WorkspaceError("the bundled held-out split fits 8x8 grey digits only; this workspace's data differs")
    _, labels = digits_uint8()
    return digits_dataset(heldout_split(labels)[1])


def feature_net(ws: Workspace, params: Params):
    """The feature network, trained once on the held-out split and cached (safetensors + recorded sha256)."""
    from cdm.metrics import load_feature_net, save_feature_net, train_feature_net

    path, record = ws.cache_dir / FEATURE_NET, ws.cache_dir / "feature-net.json"
    if path.exists() and record.exists():
        return load_feature_net(path, json.loads(record.read_text())["sha256"])
    data = heldout(params)
    net = train_feature_net(data, num_classes=10, steps=params.evaluate.feature_steps, seed=0)
    ws.cache_dir.mkdir(parents=True, exist_ok=True)
    sha = save_feature_net(net, path)
    record.write_text(json.dumps({"sha256": sha, "trained_on": "digits held-out split", "samples": len(data)}))
    return net


def owners_data(ws: Workspace, params: Params) -> Dataset:
    d = params.data
    return Dataset.concat([ws.load_owner(o, d.image_size, d.channels, d.labels) for o in ws.owners()])


def sample_paragon(c, n: int, seed: int) -> torch.Tensor | None:
    import mlflow

    mv = registry.latest(c, registry.PARAGON)
    if mv is None:
        return None
    model = mlflow.pyfunc.load_model(f"models:/{registry.PARAGON}/{mv.version}")
    return torch.from_numpy(model.predict({"n": n, "seed": seed})["images"])


def evaluate(ws: Workspace, c, params: Params) -> dict:
    """Metrics of the production composite against the owners' current data."""
    from cdm.composites import load_production, production
    from cdm.metrics import fid_kid, memorization

    e = params.evaluate
    prod = production(c)
    if prod is None:
        raise WorkspaceError("no production composite; run `cdm compose` first")
    version, spec = prod
    real = owners_data(ws, params)
    net = feature_net(ws, params)
    out = load_production(c).predict({"n": e.n_samples, "seed": e.seed})
    fake = torch.from_numpy(out["images"])
    scores = fid_kid(real.x, fake, net)
    key_to_owner = {ws.owner_key(o): o for o in ws.owners()}
    share: dict[str, float] = {}
    for row in out["attribution"]:
        for k, v in row.items():
            share[key_to_owner.get(k, k)] = share.get(key_to_owner.get(k, k), 0.0) + v / len(out["attribution"])
    metrics = {
        "composite_version": version, "estimator": spec["estimator"], "shards": len(spec["shards"]),
        "n_samples": len(fake), "n_real": len(real), "fid": scores.fid, "kid": scores.kid_mean,
        "kid_std": scores.kid_std, "feature_sha256": scores.feature_sha256,
        "attribution": {k: round(v, 4) for k, v in sorted(share.items())},
        "memorization": memorization(fake, real.x)["share"],
    }
    paragon_mv = registry.latest(c, registry.PARAGON)
    active_keys = sorted(key_to_owner)
    if paragon_mv is not None and json.loads(paragon_mv.tags.get("cdm.owner_keys", "[]")) == active_keys:
        para = sample_paragon(c, e.n_samples, e.seed)
        p_scores = fid_kid(real.x, para, net)
        metrics.update(paragon_version=paragon_mv.version, paragon_fid=p_scores.fid, paragon_kid=p_scores.kid_mean,
                       fid_ratio=scores.fid / p_scores.fid, paragon_memorization=memorization(para, real.x)["share"])
    else:
        metrics.update(paragon_version=None, fid_ratio=None,
                       paragon_note="no paragon trained on exactly the current owners (`cdm train --paragon`)")
    metrics["membership_auc"] = revoked_membership(ws)
    metrics["regressions"] = regressions(metrics, params)
    return metrics


def revoked_membership(ws: Workspace) -> dict[str, float]:
    """Membership-inference AUC measured for each revoked owner when it was revoked (their data is gone now)."""
    out = {}
    for f in sorted(ws.revocations_dir.glob("*.json")) if ws.revocations_dir.exists() else []:
        state = json.loads(f.read_text())
        auc = (state.get("forgetting") or {}).get("auc_after")
        if state.get("completed") and auc is not None:
            out[state["owner_key"]] = auc
    return out


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


def log_evaluation(c, ws: Workspace, metrics: dict) -> str:
    """An MLflow run in experiment `cdm-evaluation` with the numeric metrics and metrics.json."""
    import tempfile

    import mlflow

    exp = registry.experiment_id(c, ws.artifact_root, "cdm-evaluation")
    with mlflow.start_run(experiment_id=exp, run_name=f"evaluate-composite-v{metrics['composite_version']}") as run:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        mlflow.set_tags({"cdm.composite_version": str(metrics["composite_version"]),
                         "cdm.feature_sha256": metrics["feature_sha256"]})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "metrics.json"
            p.write_text(json.dumps(metrics, indent=2, sort_keys=True))
            mlflow.log_artifact(str(p))
    return run.info.run_id
