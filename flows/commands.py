"""The CLI's commands: read params and the workspace (entry points), run flows, format results."""

from __future__ import annotations

from pathlib import Path

from flows.cli import CliError


def _ws(args):
    from cdm.workspace import Workspace

    return Workspace(args.workspace).require()


def _params(ws):
    from cdm.config import Params

    return Params.load(ws.params_path)


def cmd_init(args):
    from cdm.workspace import init_workspace

    ws = init_workspace(args.dir, remote=args.remote, endpoint_url=args.endpoint_url, artifact_root=args.artifact_root)
    return {"workspace": str(ws.root), "tracking_uri": ws.tracking_uri}, f"workspace ready: {ws.root}"


def cmd_ingest(args):
    from cdm.ingest import IngestionRejected
    from flows.ingestion import ingest_owner

    ws = _ws(args)
    _params(ws)
    try:
        result = ingest_owner(str(ws.root), args.owner, args.source, args.license)
    except IngestionRejected as e:
        raise CliError(str(e)) from None
    text = f"ingested {result['added']} new samples for {args.owner} ({result['total']} in all); data {result['data_hash']}"
    if result.get("token"):
        text += f"\nowner token (shown once; needed for `cdm revoke {args.owner} --token`): {result['token']}"
    return result, text


def cmd_train(args):
    from flows.training import run_training

    ws = _ws(args)
    owners = [o.strip() for o in args.owners.split(",")] if args.owners else None
    result = run_training(str(ws.root), owners, args.paragon, progress=not args.json)
    lines = [f"{s}: " + ("unchanged" if r["skipped"] else f"v{r['version']} ({r['seconds']} s)")
             for s, r in result["shards"].items()]
    if result["paragon"]:
        lines.append(f"paragon: v{result['paragon']['version']}")
    return result, "\n".join(lines + [f"total {result['seconds']} s"])


def cmd_pretrain(args):
    from cdm.ingest import IngestionRejected
    from flows.training import pretrain

    ws = _ws(args)
    _params(ws)
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    try:
        result = pretrain(str(ws.root), args.source, args.steps, progress=not args.json)
    except IngestionRejected as e:
        raise CliError(str(e)) from None
    return result, (f"cdm-init v{result['version']}: {result['samples']} public samples, {result['steps']} steps "
                    f"({result['seconds']} s); set `train.init: public` in params.yaml to start shards from it")


def cmd_compose(args):
    from flows.composition import compose

    ws = _ws(args)
    result = compose(str(ws.root), args.estimator)
    return result, f"cdm-composite v{result['version']} is production ({result['estimator']}, {len(result['shards'])} shards)"


def cmd_sample(args):
    import torch

    from cdm import registry
    from cdm.composites import load_production
    from cdm.config import Consumers
    from cdm.data import save_grid

    ws = _ws(args)
    params = _params(ws)
    if args.n < 1 or args.n > 10_000:
        raise CliError("--n must be between 1 and 10000")
    labels = params.data.labels
    if args.label is not None and args.label not in labels:
        raise CliError(f"--label {args.label} is not in the label set {labels}")
    allowed = None
    if args.consumer:
        consumers = Consumers.load(ws.consumers_path)
        licenses = {o: ws.manifest(o).get("license") for o in ws.owners()}
        try:
            owners = consumers.allowed_owners(args.consumer, licenses)
        except KeyError as e:
            raise CliError(str(e.args[0])) from None
        allowed = [ws.owner_key(o) for o in owners]
    c = registry.client(ws.tracking_uri)
    model = load_production(c)
    try:
        out = model.predict({"n": args.n, "label": args.label, "allowed_owners": allowed, "seed": args.seed})
    except PermissionError as e:
        raise CliError(f"consumer {args.consumer!r}: {e}") from None
    path = Path(args.out) if args.out else ws.root / "outputs" / "samples.png"
    save_grid(torch.from_numpy(out["images"]), path)
    names = {ws.owner_key(o): o for o in ws.owners()}
    samples = [{"index": i, "attribution": {names.get(k, k): round(v, 6) for k, v in a.items()}}
               for i, a in enumerate(out["attribution"])]
    result = {"image": str(path), "n": args.n, "label": args.label, "consumer": args.consumer,
              "shards": out["shards"], "samples": samples}
    totals = {}
    for s in samples:
        for o, w in s["attribution"].items():
            totals[o] = totals.get(o, 0.0) + w / len(samples)
    text = f"wrote {path}\nattribution (mean over samples): " + ", ".join(
        f"{o} {w:.2f}" for o, w in sorted(totals.items(), key=lambda kv: -kv[1]))
    return result, text


def cmd_revoke(args):
    from cdm.workspace import check_owner_id
    from flows.unlearning import unlearn_owner

    ws = _ws(args)
    check_owner_id(args.owner)
    cert = unlearn_owner(str(ws.root), args.owner, args.reason, args.token)
    text = (f"revoked {args.owner} ({cert['request_id']}): live in {cert['seconds_to_live']} s, complete in "
            f"{cert['seconds_to_complete']} s; dropped {cert['shards_dropped']}, retrained {cert['shards_retrained']}; "
            f"verification {'ok' if (cert['verification'] or {}).get('ok') else 'FAILED'}")
    return cert, text


def cmd_evaluate(args):
    from flows.evaluation import evaluate

    ws = _ws(args)
    metrics = evaluate(str(ws.root), args.out)
    text = "\n".join(f"{k}: {v}" for k, v in metrics.items() if k not in ("attribution",))
    if args.fail_on_regression and metrics["regressions"]:
        raise CliError("regression: " + "; ".join(metrics["regressions"]), code=1, result=metrics, text=text)
    return metrics, text


def cmd_status(args):
    from cdm import ledger, registry
    from cdm.composites import production
    from cdm.shards import load_plan

    ws = _ws(args)
    c = registry.client(ws.tracking_uri)
    owners = [{"id": o, "samples": len(ws.manifest(o)["samples"]), "state": "active",
               "license": ws.manifest(o).get("license")} for o in ws.owners()]
    active_keys = {ws.owner_key(o["id"]) for o in owners}
    owners += [{"id": key, "samples": 0, "state": rec.get("state", "unknown")}
               for key, rec in sorted(ws.owner_records().items()) if key not in active_keys]
    shards = []
    for sid, members in sorted(load_plan(ws).items()):
        mv = registry.latest(c, registry.SHARD_PREFIX + sid)
        shards.append({"id": sid, "owners": members, "model_version": mv.version if mv else None})
    prod = production(c)
    composite = None if prod is None else {"version": prod[0], "shards": [s["id"] for s in prod[1]["shards"]],
                                           "estimator": prod[1]["estimator"]}
    check = ledger.verify(ws.ledger_path)
    result = {"workspace": str(ws.root), "owners": owners, "shards": shards, "production": composite,
              "ledger": check.as_dict()}
    lines = [f"workspace {ws.root}", "owners:"] + [f"  {o['id']:<24} {o['state']:<8} {o['samples']} samples"
                                                   for o in owners]
    lines += ["shards:"] + [f"  {s['id']:<14} v{s['model_version']}  {', '.join(s['owners'])}" for s in shards]
    lines += ["production: " + (f"cdm-composite v{composite['version']} ({composite['estimator']}, "
                                 f"{len(composite['shards'])} shards)" if composite else "none")]
    lines += [f"ledger: {check.entries} entries, " + ("chain verified" if check.ok else f"TAMPERED: {check.problem}")]
    if not check.ok:
        raise CliError(f"audit ledger verification failed: {check.problem}", code=1, result=result,
                       text="\n".join(lines))
    return result, "\n".join(lines)


def cmd_demo(args):
    from flows.demo import demo

    result = demo(args.out, quick=args.quick, owners=args.owners, partition=args.partition)
    return result, result["report"]


def cmd_serve(args):
    from flows.deployments import serve

    serve(str(_ws(args).root))
    return None, ""
