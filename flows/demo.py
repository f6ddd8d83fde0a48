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
def demo(out: str = "demo-workspace", quick: bool = True, owners: int = 4, partition: str = "iid",
         progress: bool = False, base: bool = True) -> dict:
    """The story in a fresh workspace. `base`: the paper's recipe — a fifth of the non-held-out digits becomes
    public data that belongs to no owner, `cdm pretrain` trains the shared base on it, and every shard and the
    paragon fine-tune from it (`train.init: public`)."""
    import torch

    from cdm.data import save_grid, write_demo_owners
    from cdm.platform.models.composites import load_production
    from cdm.platform.workspace.context import Context
    from cdm.platform.create import init_workspace
    from cdm.platform.data.ingest import IngestionRejected
    from cdm.platform.workspace.owner_records import sign_revocation
    from cdm.platform.models.shards import load_plan
    from flows.composition import compose
    from flows.evaluation import evaluate
    from flows.ingestion import ingest
    from flows.training import pretrain, run_training
    from flows.unlearning import unlearn_owner

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    root = Path(out).resolve()
    if root.exists() and any(p for p in root.iterdir() if p.name != ".cdm"):
        raise FileExistsError(f"{root} exists and is not empty; choose another --out or remove it")
    # The owners' side: their folders live beside the workspace, not in it (nothing of theirs is ours to keep).
    sources = write_demo_owners(root.parent / f"{root.name}.sources", owners, partition,
                                public_fraction=0.2 if base else 0.0)
    owner_ids = sorted(o for o in sources if o not in ("heldout", "public"))
    params = demo_params(quick)
    if base:
        params.train.init = "public"
        params.train.init_steps = params.train.steps * 2  # the base sees the public digits at least as long
    sizes = sorted(sum(1 for _ in sources[o].glob("*/*.png")) for o in owner_ids)
    if len(sizes) >= 3:
        params.train.min_shard_samples = sizes[1] + 1  # the two smallest owners share a shard
    init_workspace(root, params=params)
    ctx = Context.load(root)
    if base:  # 0. The shared base, on public data only (registered as cdm-init; no owner's data in it).
        t = time.perf_counter()
        pretrain(str(root), str(sources["public"]), progress=progress)
        times["pretrain"] = time.perf_counter() - t

    # 1. Ingestion: one batch with a corrupt file is rejected first, then every owner's good batch.
    t = time.perf_counter()
    bad = root.parent / f"{root.name}.sources" / "owner-01-bad"
    _corrupt_copy(sources["owner-01"], bad)
    try:
        ingest(ctx, "owner-01", str(bad))
        rejection = "NOT rejected (unexpected)"
    except IngestionRejected as e:
        rejection = e.summary()
    tokens = {}
    for owner in owner_ids:
        r = ingest(ctx, owner, str(sources[owner]), "cc-by" if owner != "owner-00" else "proprietary")
        tokens[owner] = r["token"]
    times["ingest"] = time.perf_counter() - t

    # 2. Shards and paragon; 3. composite live; 4. samples with attribution.
    t = time.perf_counter()
    run_training(ctx, paragon=True, progress=progress)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    compose(str(root))
    times["compose"] = time.perf_counter() - t
    with load_production(ctx) as model:
        sample = model.predict({"n": 40, "seed": 1})
    grid = save_grid(torch.from_numpy(sample["images"]), root / "outputs" / "samples-before.png", nrow=10)
    names = {ctx.ws.owner_key(o): o for o in ctx.ws.owners()}

    # 5. Evaluation before revocation.
    t = time.perf_counter()
    before = evaluate(str(root), str(root / "outputs" / "metrics-before.json"))
    times["evaluate"] = time.perf_counter() - t

    # 6. Revoke one owner (the one in a shared shard if there is one: shows slice retraining), by their token.
    plan = load_plan(ctx.ws)
    shared = [os_ for os_ in plan.values() if len(os_) > 1]
    victim = shared[0][-1] if shared else "owner-01"
    victim_key = ctx.ws.owner_key(victim)
    t = time.perf_counter()
    request = sign_revocation(tokens[victim], victim_key, "demo: consent withdrawn")  # the owner's signed request
    cert = unlearn_owner(str(root), victim_key, signature=request["signature"], issued_at=request["issued_at"],
                         reason=request["reason"])
    times["revoke"] = time.perf_counter() - t

    # 7. The baseline: retraining the paragon without the owner; then re-evaluation.
    t = time.perf_counter()
    run_training(ctx, paragon=True, progress=progress)
    times["paragon_retrain"] = time.perf_counter() - t
    after = evaluate(str(root), str(root / "outputs" / "metrics-after.json"))
    with load_production(ctx) as model:
        sample_after = model.predict({"n": 40, "seed": 1})
    save_grid(torch.from_numpy(sample_after["images"]), root / "outputs" / "samples-after.png", nrow=10)
    times["total"] = time.perf_counter() - t0

    summary = {
        "workspace": str(root), "owners": owners, "partition": partition, "quick": quick,
        "shared_base": ({"public_images": sum(1 for _ in sources["public"].glob("*/*.png")),
                         "steps": params.train.init_steps} if base else None),
        "rejected_batch": rejection, "shards": {s: len(o) for s, o in plan.items()},
        "revoked_key": victim_key, "request_id": cert["request_id"],
        "fid_before": before["fid"], "fid_after": after["fid"],
        "fid_ci_before": before["fid_ci"], "fid_ci_after": after["fid_ci"], "floor_real": before["floor_real"],
        "fid_change": after["fid"] / before["fid"] - 1,
        "fid_ratio_before": before.get("fid_ratio"), "fid_ratio_after": after.get("fid_ratio"),
        "fid_ratio_ci_before": before.get("fid_ratio_ci"), "fid_ratio_ci_after": after.get("fid_ratio_ci"),
        "nll_before": before["nll"]["composite_bpd"], "nll_after": after["nll"]["composite_bpd"],
        "nll_gap_before": before["nll"].get("gap_bpd"), "nll_gap_after": after["nll"].get("gap_bpd"),
        "regressions_before": before["regressions"], "regressions_after": after["regressions"],
        "verdicts_before": before.get("verdicts", {}), "verdicts_after": after.get("verdicts", {}),
        "membership_auc_before": (cert["forgetting"] or {}).get("auc_before"),
        "membership_auc_after": (cert["forgetting"] or {}).get("auc_after"),
        "membership_auc_control": (cert["forgetting"] or {}).get("auc_control"),
        "membership_verdict": (cert["forgetting"] or {}).get("verdict"),
        "seconds_to_live": cert["seconds_to_live"], "seconds_to_complete": cert["seconds_to_complete"],
        "purge_seconds": (cert["purged"] or {}).get("seconds"),
        "paragon_retrain_seconds": times["paragon_retrain"],
        "speedup_live_vs_retrain": times["paragon_retrain"] / max(cert["seconds_to_live"], 1e-9),
        "verification_ok": (cert["verification"] or {}).get("ok"),
        "stores_scanned": (cert["verification"] or {}).get("scan", {}).get("scanned"),
        "attribution_before": before["attribution"],  # by owner key: this file is kept
        "times": {k: round(v, 1) for k, v in times.items()},
        "grid": str(grid),
    }
    (root / "outputs" / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["report"] = report(summary, ctx, {**names, victim_key: victim})
    return summary


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _ci(v, bounds, spec=".2f"):
    """`value [low, high]` (the 95% interval), or n/a."""
    if v is None or bounds is None:
        return "n/a"
    return f"{v:{spec}} [{bounds[0]:{spec}}, {bounds[1]:{spec}}]"


def _bpd(d):
    return "n/a" if d is None else _ci(d["mean"], (d["low"], d["high"]), ".3f")


def report(s: dict, ctx, names: dict[str, str]) -> str:
    """The summary people read (printed, not stored: it names owners)."""
    rows = [
        ("FID (composite)", _ci(s["fid_before"], s["fid_ci_before"]), _ci(s["fid_after"], s["fid_ci_after"])),
        ("FID / paragon FID", _ci(s["fid_ratio_before"], s["fid_ratio_ci_before"], ".3f"),
         _ci(s["fid_ratio_after"], s["fid_ratio_ci_after"], ".3f")),
        ("NLL bound, bits/dim (composite)", _bpd(s["nll_before"]), _bpd(s["nll_after"])),
        ("NLL gap to the paragon, bits/dim", _bpd(s["nll_gap_before"]), _bpd(s["nll_gap_after"])),
        ("membership AUC (revoked owner)", _fmt(s["membership_auc_before"]), _fmt(s["membership_auc_after"])),
    ]
    regressions = [f"before: {r}" for r in s["regressions_before"]] + [f"after: {r}" for r in s["regressions_after"]]
    faster = s["paragon_retrain_seconds"] / max(s["purge_seconds"] or 1e-9, 1e-9)
    victim = names.get(s["revoked_key"], s["revoked_key"])
    lines = [
        "", "cdm demo summary", "================",
        f"workspace: {s['workspace']}  ({s['owners']} owners, {s['partition']}, shards: {s['shards']})",
        ("shared base: pretrained on {public_images} public digits (no owner's) for {steps} steps; every shard and the "
         "paragon fine-tuned from it".format(**s["shared_base"]) if s["shared_base"] else
         "shared base: none (shards and paragon from random weights; `--base` for the paper's recipe)"),
        f"rejected batch: {s['rejected_batch']}",
        f"revoked: {victim} ({s['request_id']}), verification {'ok' if s['verification_ok'] else 'FAILED'} "
        f"({len(s['stores_scanned'] or {})} stores scanned)",
        "", f"{'metric [95% CI]':<34}{'before':>24}{'after':>24}", "-" * 82,
        *[f"{a:<34}{b:>24}{c:>24}" for a, b, c in rows],
        "-" * 82,
        f"noise floor (real vs real at the same N): FID {_ci(s['floor_real']['mean'], (s['floor_real']['low'], s['floor_real']['high']))}",
        "REGRESSIONS found by the evaluation: " + ("; ".join(regressions) if regressions else "none"),
        f"FID change after forgetting: {100 * s['fid_change']:+.1f}% (reference: the remaining owners' data, "
        f"{ctx.params.evaluate.sets} sample sets of {ctx.params.evaluate.n_samples}; compare the intervals above)",
        f"revocation live in {s['seconds_to_live']:.1f} s; purge {s['purge_seconds']:.1f} s; the whole revocation "
        f"{s['seconds_to_complete']:.1f} s. Retraining the paragon without the owner took "
        f"{s['paragon_retrain_seconds']:.1f} s: {s['speedup_live_vs_retrain']:.0f}x the time to go live, "
        f"{faster:.1f}x the purge",
        f"membership check of the revoked owner (a statistical test of the models' behaviour; 'verification' above "
        f"is the scan of every store for the owner's bytes, a different question): {s['membership_verdict']}",
        *[f"verdict {k.replace('_', ' ')}: before {v}; after {s['verdicts_after'].get(k, 'n/a')}"
          for k, v in s["verdicts_before"].items()],
        "attribution of samples before revocation: " + ", ".join(
            f"{names.get(k, k)} {w:.2f}" for k, w in sorted(s["attribution_before"].items())),
        f"times (s): {s['times']}",
        f"sample grids: {ctx.ws.root / 'outputs'}/samples-before.png, samples-after.png",
        "", "Browse the result:",
        f"  .venv/bin/cdm ui --workspace {ctx.ws.root}      (MLflow UI on this workspace's store; prints the Prefect UI command)",
        f"  .venv/bin/cdm status --workspace {ctx.ws.root}",
    ]
    return "\n".join(lines)
