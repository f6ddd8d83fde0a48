"""The files the DVC pipeline (`dvc.yaml`) tracks: what `cdm train`, `cdm compose` and `cdm evaluate` write when
a stage asks, so that `dvc repro` skips what did not change, `dvc metrics diff` compares evaluations and
`dvc plots show` draws them. The commands are the same a user runs; these are only their outputs as files.

    pipeline/train.json        the version of each shard and of the paragon             train stage out
    pipeline/train_loss/       <shard>.csv (step, loss): the smoothed training loss of   train stage plots
                               each shard's newest servable version
    pipeline/compose.json      the candidate composite registered                       compose stage out
    metrics.json               the evaluation (tracked in git: `dvc metrics diff main`)  evaluate stage metric
    pipeline/evaluations.csv   one row per evaluation: FID and NLL with their intervals  evaluate stage plot
    pipeline/samples.png       a sample grid of the candidate: not tracked (generated   evaluate side file
                               from owners' data, it must not outlive a revocation in
                               git history; the purge deletes it)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.fileio import atomic_write

EVALUATION_COLUMNS = ("composite_version", "fid", "fid_low", "fid_high", "floor_real", "fid_ratio",
                      "fid_ratio_low", "fid_ratio_high", "nll_bpd", "nll_bpd_low", "nll_bpd_high", "memorization")


def write_json(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    return path


def write_loss_curves(ctx: Context, folder: str | Path) -> Path:
    """`folder/<shard>.csv` (step, loss) for each shard: its newest servable version's `train_loss` history (from
    its MLflow run). The folder is rewritten: a dropped shard's curve goes with it."""
    import shutil

    from cdm.platform.models import gate
    from cdm.platform.models.shards import load_plan

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for sid in sorted(load_plan(ctx.ws)):
        mv = gate.servable(ctx, registry.SHARD_PREFIX + sid)
        if mv is None:
            continue
        history = sorted(ctx.client.get_metric_history(mv.run_id, "train_loss"), key=lambda m: m.step)
        with open(folder / f"{sid}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows([m.step, round(m.value, 6)] for m in history)
    return folder


def write_grid(ctx: Context, path: str | Path, alias: str = "production") -> Path:
    """The sample grid (`composites.sample_grid`) of the composite `alias` names."""
    from cdm.platform.models.composites import load_production, sample_grid

    with load_production(ctx, alias) as model:
        return sample_grid(model, Path(path))


def train_record(result: dict) -> dict:
    """What the train stage hands to the next: the versions each shard (and the paragon) is at. No times or
    hosts: a re-run that changed no version leaves the file as it was, and `compose` is skipped."""
    shards = {sid: r.get("version") for sid, r in result["shards"].items()}
    paragon = result.get("paragon") or {}
    return {"shards": shards, "paragon": paragon.get("version")}


def evaluation_row(m: dict) -> dict:
    """The figures of one evaluation with their 95% intervals, flat."""
    nll = (m.get("nll") or {}).get("composite_bpd") or {}
    ratio_ci = m.get("fid_ratio_ci") or (None, None)
    return {"composite_version": m["composite_version"], "fid": m["fid"], "fid_low": m["fid_ci"][0],
            "fid_high": m["fid_ci"][1], "floor_real": m["floor_real"]["mean"], "fid_ratio": m.get("fid_ratio"),
            "fid_ratio_low": ratio_ci[0], "fid_ratio_high": ratio_ci[1], "nll_bpd": nll.get("mean"),
            "nll_bpd_low": nll.get("low"), "nll_bpd_high": nll.get("high"), "memorization": m.get("memorization")}


def append_evaluation(path: str | Path, m: dict) -> Path:
    """Add this evaluation's row to the history (one row per composite version: a re-evaluation replaces it)."""
    path = Path(path)
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["composite_version"] != str(m["composite_version"])]
    rows.append({k: ("" if v is None else v) for k, v in evaluation_row(m).items()})
    rows.sort(key=lambda r: int(r["composite_version"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        # extrasaction: rows written before a column was retired (KID, unreadable units) keep the rest
        writer = csv.DictWriter(f, fieldnames=list(EVALUATION_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
