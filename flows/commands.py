"""What each `cdm` command does: load the workspace's `Context` once, check the request, run flows, and return
`(result for --json, text for people)`. Refusals raise `WorkspaceError` / `CommandFailed` (flows/cli.py maps them).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from cdm.platform.errors import CommandFailed, WorkspaceError


def _ctx(workspace: str):
    from cdm.platform.context import Context

    return Context.load(workspace)


def _status(text: str, show: bool):
    """A spinner on stderr saying what is happening (only on a terminal)."""
    import contextlib

    if not show or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


def init(dir: str, remote: str | None, endpoint_url: str | None, artifact_root: str | None):
    from cdm.platform.create import init_workspace

    ws = init_workspace(dir, remote=remote, endpoint_url=endpoint_url, artifact_root=artifact_root)
    uri = ws.tracking_uri()
    return {"workspace": str(ws.root), "tracking_uri": uri}, f"workspace ready: {ws.root} (MLflow store {uri})"


def ingest(workspace: str, owner: str, source: str, license: str | None, cron: str | None):
    from cdm.platform.ingest import IngestionRejected
    from cdm.platform.sources import SourceError
    from cdm.platform.workspace import check_owner_id
    from flows.ingestion import ingest as run_ingestion

    check_owner_id(owner)
    ctx = _ctx(workspace)
    try:
        result = run_ingestion(ctx, owner, source, license, cron)
    except IngestionRejected as e:
        raise CommandFailed(f"{e.summary()}; report: {e.report.docs}", code=2,
                            result={"owner": owner, "rejected": e.report.as_dict()}) from None
    except SourceError as e:
        raise WorkspaceError(f"{source}: {e}") from None
    text = (f"ingested {result['added']} new samples for {owner} ({result['total']} in all; owner key "
            f"{result['owner_key']}); data {result['data_hash']}")
    if result.get("token"):
        text += f"\nowner token (shown once; proves `cdm revoke {owner} --token ...`): {result['token']}"
    return result, text


def consent(workspace: str, owner: str):
    from cdm.platform import ledger, owner_records, registry
    from cdm.platform.gitrepo import commit
    from cdm.platform.workspace import check_owner_id, now

    ctx = _ctx(workspace)
    key, rec = owner_records.record_of(ctx.ws, check_owner_id(owner))
    if rec is None:
        raise WorkspaceError(f"no record of owner {owner!r}: a first `cdm ingest` records their consent")
    if rec.state != "revoked":
        raise WorkspaceError(f"owner {owner!r} has not revoked consent; nothing to record")
    from cdm.platform.revocations import load

    if rec.revocation and not load(ctx.ws, rec.revocation).completed:
        raise WorkspaceError(f"the revocation of {owner!r} is still in progress; consent can follow once it ends")
    with ctx.ws.lock():
        entry = ledger.append(ctx.ws.ledger_path, ctx.ws.secret(),
                              {"event": "consent", "owner_key": key, "received": now()})
        commit(ctx.ws.root, f"ledger: consent {key}", "ledger.jsonl")
        registry.anchor_ledger(ctx.client, ledger.head(ledger.read(ctx.ws.ledger_path)))
        owner_records.update(ctx.ws, key, state="pending", consents=rec.consents + [now()],
                             drop=("revocation", "revoked"))
    token = owner_records.issue_token(ctx.ws, key)
    return ({"owner": owner, "owner_key": key, "token": token, "ledger_seq": entry["seq"]},
            f"consent of {owner} recorded (ledger entry {entry['seq']}); `cdm ingest {owner} SOURCE` may bring their "
            f"data in again\nowner token (shown once): {token}")


def _owner_keys(ctx, owners: str | None) -> list[str] | None:
    from cdm.platform.workspace import check_owner_id

    if not owners:
        return None
    names = [check_owner_id(o.strip()) for o in owners.split(",") if o.strip()]
    unknown = sorted(set(names) - set(ctx.ws.owners()))
    if unknown:
        raise WorkspaceError(f"unknown owner(s): {', '.join(unknown)}")
    return [ctx.ws.owner_key(o) for o in names]


def train(workspace: str, owners: str | None, paragon: bool, progress: bool):
    from flows.training import run_training

    ctx = _ctx(workspace)
    keys = _owner_keys(ctx, owners)
    result = run_training(ctx, keys, paragon, progress=progress)
    lines = [f"{s}: " + ("unchanged" if r["skipped"] else f"v{r['version']} ({r['seconds']} s, final train_loss "
                                                           f"{r['final_loss']})")
             for s, r in result["shards"].items()]
    if result["paragon"]:
        lines.append(f"paragon: v{result['paragon']['version']}")
    return result, "\n".join(lines + [f"total {result['seconds']} s"])


def pretrain(workspace: str, source: str, steps: int | None, progress: bool):
    from cdm.platform.ingest import IngestionRejected
    from flows.training import pretrain as run_pretrain

    _ctx(workspace)
    try:
        result = run_pretrain(str(Path(workspace).resolve()), source, steps, progress=progress)
    except IngestionRejected as e:
        raise CommandFailed(f"public data: {e.summary()}", result={"rejected": e.report.as_dict()}) from None
    return result, (f"cdm-init v{result['version']} (alias current): {result['samples']} public samples, "
                    f"{result['steps']} steps ({result['seconds']} s); set `train.init: public` in params.yaml to "
                    "start shards from it")


def compose(workspace: str, estimator: str | None, progress: bool):
    from flows.composition import compose as run_compose

    ctx = _ctx(workspace)
    with _status("composing: registering the composite and sampling its preview grid", progress):
        result = run_compose(str(ctx.ws.root), estimator, progress)
    return result, f"cdm-composite v{result['version']} is production ({result['estimator']}, {len(result['shards'])} shards)"


def sample(workspace: str, n: int, label: int | None, consumer: str | None, seed: int, out: str | None):
    import torch

    from cdm.config import Consumers
    from cdm.data import save_grid
    from cdm.platform.composites import load_production, production

    ctx = _ctx(workspace)
    if n < 1 or n > 10_000:
        raise WorkspaceError("--n must be between 1 and 10000")
    labels = ctx.params.data.labels
    if label is not None and label not in labels:
        raise WorkspaceError(f"--label {label} is not in the label set {labels}")
    allowed = None
    if consumer:
        consumers = Consumers.load(ctx.ws.consumers_path)
        licenses = {o: ctx.ws.manifest(o).get("license") for o in ctx.ws.owners()}
        try:
            owners = consumers.allowed_owners(consumer, licenses)
        except KeyError as e:
            raise WorkspaceError(str(e.args[0])) from None
        allowed = [ctx.ws.owner_key(o) for o in owners]
    prod = production(ctx)
    if prod is None:
        raise WorkspaceError("no production composite; run `cdm compose` first")
    shards = [s for s in prod[1]["shards"] if allowed is None or set(s["owners"]) <= set(allowed)]
    if not shards:
        raise WorkspaceError(f"consumer {consumer!r}: no shard is composed solely of owners it may use")
    served = sorted({y for s in shards for y, count in enumerate(s["class_counts"]) if count > 0})
    if label is not None and label not in served:
        raise WorkspaceError(f"no remaining owner's data holds label {label}; the shards served cover labels {served}")
    out_dict = load_production(ctx).predict({"n": n, "label": label, "allowed_owners": allowed, "seed": seed})
    path = Path(out) if out else ctx.ws.root / "outputs" / "samples.png"
    save_grid(torch.from_numpy(out_dict["images"]), path)
    names = {ctx.ws.owner_key(o): o for o in ctx.ws.owners()}
    samples = [{"index": i, "attribution": {names.get(k, k): round(v, 6) for k, v in a.items()}}
               for i, a in enumerate(out_dict["attribution"])]
    result = {"image": str(path), "n": n, "label": label, "consumer": consumer, "shards": out_dict["shards"],
              "samples": samples}
    totals: dict[str, float] = {}
    for s in samples:
        for o, w in s["attribution"].items():
            totals[o] = totals.get(o, 0.0) + w / len(samples)
    text = f"wrote {path}\nattribution (mean over samples): " + ", ".join(
        f"{o} {w:.2f}" for o, w in sorted(totals.items(), key=lambda kv: -kv[1]))
    return result, text


def revoke(workspace: str, owner: str, reason: str | None, token: str | None, wait: bool, progress: bool):
    """Checked and begun here (the token stays in this process), out of serving in this process, the rest in a
    background process unless `wait` (it gets the token through a pipe, to search the stores for it)."""
    from cdm.platform import owner_records, unlearn
    from cdm.platform.revocations import load
    from cdm.platform.workspace import check_owner_id
    from flows.unlearning import known_token, unlearn_owner

    ctx = _ctx(workspace)
    key, rec = owner_records.record_of(ctx.ws, check_owner_id(owner))
    if rec is None or (rec.state != "revoked" and owner not in ctx.ws.owners()):
        raise WorkspaceError(f"unknown owner {owner!r}")
    resuming = rec.state == "revoked" and rec.revocation is not None
    if resuming and load(ctx.ws, rec.revocation).completed:
        raise WorkspaceError(f"owner {owner!r} was already revoked (request {rec.revocation})")
    if token is not None and not resuming:
        owner_records.authorize(ctx.ws, owner, token)  # PermissionError (exit 2) before anything changes
    rev = unlearn.begin(ctx, key, hashlib.sha256(token.encode()).hexdigest() if token else None, reason)
    marker = known_token.set(token)
    try:
        if wait:
            with _status(f"revoking {owner}: live without them, retrain, purge, scan, certify", progress):
                cert = unlearn_owner(str(ctx.ws.root), key, progress=progress)
            return _revoked(owner, cert)
        live = unlearn_owner(str(ctx.ws.root), key, until="go_live")
    finally:
        known_token.reset(marker)
    log = ctx.ws.logs_dir / f"{rev.request_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "finish-revocation", key, "--workspace",
                                 str(ctx.ws.root)] + (["--token-stdin"] if token else []),
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=str(ctx.ws.root))
        proc.stdin.write((token or "") + "\n")
        proc.stdin.close()
    version = live["live"]["composite_live"]
    serving = f"production is cdm-composite v{version} without their shards" if version else "nothing is served"
    result = {**live, "background": {"pid": proc.pid, "log": str(log)}}
    return result, (f"{owner} is out of serving ({rev.request_id}): {serving}, live in "
                    f"{live['live']['seconds_to_live']:.1f} s; their ingestion schedule is removed.\n"
                    f"The purge continues in the background (pid {proc.pid}, log {log}); `cdm status` shows its "
                    f"progress (`--wait` waits for it).")


def _revoked(owner: str, cert: dict):
    v = cert.get("verification") or {}
    text = (f"revoked {owner} ({cert['request_id']}): live in {cert['seconds_to_live']} s, complete in "
            f"{cert['seconds_to_complete']} s; dropped {cert['shards_dropped']}, retrained "
            f"{cert['shards_retrained']}; verification {'ok' if v.get('ok') else 'FAILED'} "
            f"({sum(v.get('scan', {}).get('scanned', {}).values())} items in "
            f"{len(v.get('scan', {}).get('scanned', {}))} stores scanned)")
    if not v.get("ok"):
        raise CommandFailed("verification found traces of the owner: " + json.dumps(
            v.get("scan", {}).get("findings", [])[:3]), code=1, result=cert, text=text)
    return cert, text


def finish_revocation(workspace: str, owner_key: str, token_stdin: bool):
    from flows.unlearning import known_token, unlearn_owner

    ctx = _ctx(workspace)
    token = sys.stdin.readline().strip() if token_stdin else None
    marker = known_token.set(token or None)
    try:
        cert = unlearn_owner(str(ctx.ws.root), owner_key)
    finally:
        known_token.reset(marker)
    return _revoked(owner_key, cert)


def evaluate(workspace: str, out: str | None, fail_on_regression: bool):
    from flows.evaluation import evaluate as run_evaluation

    ctx = _ctx(workspace)
    metrics = run_evaluation(str(ctx.ws.root), out)
    text = evaluation_text(metrics)
    if fail_on_regression and metrics["regressions"]:
        raise CommandFailed(f"{len(metrics['regressions'])} regression(s): " + "; ".join(metrics["regressions"]),
                            code=1, result=metrics, text=text)
    return metrics, text


def evaluation_text(m: dict) -> str:
    def f(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    lines = [f"composite v{m['composite_version']} ({m['estimator']}, {m['shards']} shards), "
             f"{m['n_samples']} samples vs {m['n_real']} owners' images",
             f"  FID {f(m['fid'], '.2f')}   paragon FID {f(m.get('paragon_fid'), '.2f')}   fid_ratio {f(m['fid_ratio'])}",
             f"  KID {f(m['kid'], '.4f')} ± {f(m['kid_std'], '.4f')} (unbiased MMD², conventional scale)",
             f"  memorization {f(m['memorization'])} (paragon {f(m.get('paragon_memorization'))})",
             "  membership AUC of revoked owners: " + (", ".join(f"{k} {v:.3f}" for k, v in
                                                               m["membership_auc"].items()) or "none revoked"),
             "  attribution by owner key: " + ", ".join(f"{k} {v:.2f}" for k, v in m["attribution"].items())]
    if m.get("paragon_note"):
        lines.append(f"  note: {m['paragon_note']}")
    lines.append("regressions: " + ("; ".join(m["regressions"]) if m["regressions"] else "none"))
    return "\n".join(lines)


def status(workspace: str):
    from cdm.platform import ledger, owner_records, registry
    from cdm.platform.composites import production
    from cdm.platform.revocations import all_revocations
    from cdm.platform.shards import load_plan

    ctx = _ctx(workspace)
    ws, c = ctx.ws, ctx.client
    owners = [{"id": o, "samples": len(ws.manifest(o)["samples"]), "state": "active",
               "license": ws.manifest(o).get("license")} for o in ws.owners()]
    active = {ws.owner_key(o["id"]) for o in owners}
    owners += [{"id": key, "samples": 0, "state": rec.state} for key, rec in sorted(owner_records.records(ws).items())
               if key not in active and rec.state != "pending"]
    shards = [{"id": sid, "owners": members,
               "model_version": (mv.version if (mv := registry.latest(c, registry.SHARD_PREFIX + sid)) else None)}
              for sid, members in sorted(load_plan(ws).items())]
    prod = production(ctx)
    composite = None if prod is None else {"version": prod[0], "shards": [s["id"] for s in prod[1]["shards"]],
                                           "estimator": prod[1]["estimator"]}
    in_progress = [{"request_id": r.request_id, "owner_key": r.owner_key, "done": r.steps_done, "next": r.next_step}
                   for r in all_revocations(ws) if not r.completed]
    check = ledger.verify(ws.ledger_path, ws.secret(), registry.ledger_anchor(c))
    result = {"workspace": str(ws.root), "owners": owners, "shards": shards, "production": composite,
              "revocations_in_progress": in_progress, "ledger": check.as_dict()}
    lines = [f"workspace {ws.root}", "owners:"] + [f"  {o['id']:<24} {o['state']:<8} {o['samples']} samples"
                                                   for o in owners]
    lines += ["shards:"] + [f"  {s['id']:<14} v{s['model_version']}  {', '.join(s['owners'])}" for s in shards]
    lines += ["production: " + (f"cdm-composite v{composite['version']} ({composite['estimator']}, "
                                 f"{len(composite['shards'])} shards)" if composite else "none")]
    lines += [f"revocation in progress: {r['request_id']} ({r['owner_key']}): done {', '.join(r['done'])}; "
              f"next {r['next']}" for r in in_progress]
    lines += [f"ledger: {check.entries} entries, " + ("chain verified, anchor matches" if check.ok
                                                      else f"TAMPERED: {check.problem}")]
    if not check.ok:
        raise CommandFailed(f"audit ledger verification failed: {check.problem}", code=1, result=result,
                            text="\n".join(lines))
    return result, "\n".join(lines)


def demo(out: str, quick: bool, owners: int, partition: str, progress: bool):
    from flows.demo import demo as run_demo

    result = run_demo(out, quick=quick, owners=owners, partition=partition, progress=progress)
    return result, result["report"]


def serve(workspace: str):
    from flows.deployments import serve as run_serve

    run_serve(str(_ctx(workspace).ws.root))
    return None, ""


def ui(workspace: str, port: int, print_only: bool):
    ctx = _ctx(workspace)
    mlflow_cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ctx.tracking_uri, "--port", str(port)]
    prefect = f"PREFECT_HOME={ctx.ws.prefect_home} {sys.executable} -m prefect server start"
    text = (f"MLflow UI:  {' '.join(mlflow_cmd)}   (http://127.0.0.1:{port})\n"
            f"Prefect UI: {prefect}   (http://127.0.0.1:4200)")
    result = {"mlflow": mlflow_cmd, "prefect": prefect}
    if print_only:
        return result, text
    print(text, file=sys.stderr)
    subprocess.run(mlflow_cmd, check=False)
    return result, ""
