"""The demo: the whole story on scikit-learn's digits in a fresh workspace, in one process.

owners made from digits -> ingestion (one bad batch rejected) -> shards + paragon -> composite live -> samples
with attribution -> evaluation -> one owner revoked -> paragon retrained without them (the baseline) ->
re-evaluation -> summary table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prefect import flow

from cdm.config import Params


def demo_params(quick: bool) -> Params:
    p = Params()
    if quick:
        p.train.steps = 500
        p.compose.num_inference_steps = 50
        p.evaluate.n_samples = 300
        p.evaluate.feature_steps = 500
    else:
        p.train.steps = 2000
        p.train.preset = "small"
        p.evaluate.n_samples = 1000
    return p


def _corrupt_copy(src: Path, dst: Path) -> None:
    """A copy of an owner's batch with one truncated PNG: the ingestion must reject it and change nothing."""
    shutil.copytree(src, dst)
    victim = sorted(dst.glob("*/*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:30])


@flow(name="cdm-demo")
def demo(out: str = "demo-workspace", quick: bool = True, owners: int = 4, partition: str = "iid") -> dict:
    from cdm import registry
    from cdm.data import save_grid, write_demo_owners
    from cdm.ingest import IngestionRejected
    from cdm.workspace import init_workspace
    from flows.composition import compose
    from flows.evaluation import evaluate
    from flows.ingestion import ingest_owner
    from flows.training import run_training
    from flows.unlearning import unlearn_owner

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    root = Path(out).resolve()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; choose another --out or remove it")
    sources = write_demo_owners(root / "sources", owners, partition)  # git-ignored: stands for the owners' side
    params = demo_params(quick)
    sizes = sorted(sum(1 for _ in f.glob("*/*.png")) for o, f in sources.items() if o != "heldout")
    if len(sizes) >= 3:
        params.train.min_shard_samples = sizes[1] + 1  # the two smallest owners share a shard
    ws = init_workspace(root, params=params)
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "/sources/\n")

    # 1. Ingestion: one batch with a corrupt file is rejected first, then every owner's good batch.
    t = time.perf_counter()
    bad = root / "sources" / "owner-01-bad"
    _corrupt_copy(sources["owner-01"], bad)
    try:
        ingest_owner(str(root), "owner-01", str(bad))
        rejection = "NOT rejected (unexpected)"
    except IngestionRejected as e:
        rejection = "; ".join(f"{p.file}: {p.reason}" for p in e.report.problems)
    tokens = {}
    for owner in sorted(o for o in sources if o != "heldout"):
        r = ingest_owner(str(root), owner, str(sources[owner]), "cc-by" if owner != "owner-00" else "proprietary")
        tokens[owner] = r["token"]
    times["ingest"] = time.perf_counter() - t

    # 2. Shards and paragon; 3. composite live; 4. samples with attribution.
    t = time.perf_counter()
    run_training(str(root), paragon=True)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    compose(str(root))
    times["compose"] = time.perf_counter() - t
    from cdm.composites import load_production
    import torch

    c = registry.client(ws.tracking_uri)
    sample = load_production(c).predict({"n": 40, "seed": 1})
    grid = save_grid(torch.from_numpy(sample["images"]), root / "outputs" / "samples-before.png", nrow=10)
    names = {ws.owner_key(o): o for o in ws.owners()}

    # 5. Evaluation before revocation.
    t = time.perf_counter()
    before = evaluate(str(root), str(root / "outputs" / "metrics-before.json"))
    times["evaluate"] = time.perf_counter() - t

    # 6. Revoke one owner: the one in a shared shard if there is one (shows slice retraining).
    from cdm.shards import load_plan

    plan = load_plan(ws)
    shared = [os_ for os_ in plan.values() if len(os_) > 1]
    victim = shared[0][-1] if shared else "owner-01"
    t = time.perf_counter()
    cert = unlearn_owner(str(root), victim, "demo: consent withdrawn", tokens[victim])
    times["revoke"] = time.perf_counter() - t

    # 7. The baseline: retraining the paragon without the owner; then re-evaluation.
    t = time.perf_counter()
    run_training(str(root), paragon=True)
    times["paragon_retrain"] = time.perf_counter() - t
    after = evaluate(str(root), str(root / "outputs" / "metrics-after.json"))
    sample_after = load_production(c).predict({"n": 40, "seed": 1})
    save_grid(torch.from_numpy(sample_after["images"]), root / "outputs" / "samples-after.png", nrow=10)
    times["total"] = time.perf_counter() - t0

    summary = {
        "workspace": str(root), "owners": owners, "partition": partition, "quick": quick,
        "rejected_batch": rejection, "shards": {s: len(o) for s, o in plan.items()},
        "revoked": victim, "request_id": cert["request_id"],
        "fid_before": before["fid"], "fid_after": after["fid"],
        "fid_change": after["fid"] / before["fid"] - 1,
        "fid_ratio_before": before.get("fid_ratio"), "fid_ratio_after": after.get("fid_ratio"),
        "kid_before": before["kid"], "kid_after": after["kid"],
        "memorization_composite": before["memorization"], "memorization_paragon": before.get("paragon_memorization"),
        "membership_auc_before": (cert["forgetting"] or {}).get("auc_before"),
        "membership_auc_after": (cert["forgetting"] or {}).get("auc_after"),
        "seconds_to_live": cert["seconds_to_live"], "seconds_to_complete": cert["seconds_to_complete"],
        "paragon_retrain_seconds": times["paragon_retrain"],
        "speedup_live_vs_retrain": times["paragon_retrain"] / max(cert["seconds_to_live"], 1e-9),
        "verification_ok": (cert["verification"] or {}).get("ok"),
        "attribution_before": {names.get(k, k): v for k, v in before["attribution"].items()},
        "times": {k: round(v, 1) for k, v in times.items()},
        "grid": str(grid),
    }
    (root / "outputs" / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["report"] = report(summary, ws)
    return summary


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def report(s: dict, ws) -> str:
    rows = [
        ("FID (composite)", _fmt(s["fid_before"], ".2f"), _fmt(s["fid_after"], ".2f")),
        ("FID / paragon FID", _fmt(s["fid_ratio_before"]), _fmt(s["fid_ratio_after"])),
        ("KID", _fmt(s["kid_before"], ".4f"), _fmt(s["kid_after"], ".4f")),
        ("membership AUC (revoked owner)", _fmt(s["membership_auc_before"]), _fmt(s["membership_auc_after"])),
    ]
    lines = [
        "", "cdm demo summary", "================",
        f"workspace: {s['workspace']}  ({s['owners']} owners, {s['partition']}, shards: {s['shards']})",
        f"rejected batch: {s['rejected_batch']}",
        f"revoked: {s['revoked']} ({s['request_id']}), verification {'ok' if s['verification_ok'] else 'FAILED'}",
        "", f"{'metric':<34}{'before':>12}{'after':>12}", "-" * 58,
        *[f"{a:<34}{b:>12}{c:>12}" for a, b, c in rows],
        "-" * 58,
        f"revocation live in {s['seconds_to_live']:.1f} s, purge complete in {s['seconds_to_complete']:.1f} s; "
        f"retraining the paragon without the owner took {s['paragon_retrain_seconds']:.1f} s "
        f"({s['speedup_live_vs_retrain']:.0f}x slower than going live)",
        f"FID change after forgetting: {100 * s['fid_change']:+.1f}%; memorization composite "
        f"{_fmt(s['memorization_composite'])} vs paragon {_fmt(s['memorization_paragon'])}",
        "attribution of samples before revocation: " + ", ".join(
            f"{o} {w:.2f}" for o, w in sorted(s["attribution_before"].items())),
        f"times (s): {s['times']}",
        f"sample grids: {ws.root / 'outputs'}/samples-before.png, samples-after.png",
        "", "Browse the result:",
        f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {ws.tracking_uri} --port 5000",
        "  Prefect UI: .venv/bin/prefect server start   (then http://127.0.0.1:4200; runs of this demo were recorded"
        " in the local Prefect database)",
        f"  Status:     .venv/bin/cdm status --workspace {ws.root}",
    ]
    return "\n".join(lines)
