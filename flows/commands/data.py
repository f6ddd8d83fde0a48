"""`cdm` commands, data in: creating a workspace, ingesting an owner's batch, recording a new consent, the shared init."""

from __future__ import annotations

from pathlib import Path

from cdm.platform.workspace.errors import CommandFailed, WorkspaceError
from flows.commands.common import _ctx


def init(dir: str, remote: str | None, endpoint_url: str | None, artifact_root: str | None,
         conditioning: str = "class"):
    from cdm.config import Params
    from cdm.platform.create import init_workspace

    existing = Path(dir) / "params.yaml"
    if existing.is_file() and (kind := Params.load(existing).data.conditioning) != conditioning:
        raise WorkspaceError(f"{dir} is already a {kind} workspace; its params.yaml stays as it is")
    ws = init_workspace(dir, remote=remote, endpoint_url=endpoint_url, artifact_root=artifact_root,
                        params=Params.text() if conditioning == "text" else None)
    uri = ws.tracking_uri()
    return ({"workspace": str(ws.root), "tracking_uri": uri, "conditioning": conditioning},
            f"{conditioning} workspace ready: {ws.root} (MLflow store {uri})")


def ingest_ready(workspace: str, owner: str, source: str):
    """`cdm ingest`'s refusals that need no flow: an owner id that is not allowed, a source folder that is not there
    (an s3:// source is read by the flow)."""
    from cdm.platform.workspace.paths import check_owner_id

    check_owner_id(owner)
    _ctx(workspace)  # not a workspace: refused here
    if not source.startswith("s3://") and not Path(source).expanduser().is_dir():
        raise WorkspaceError(f"{source}: source folder not found")
    return None, ""


def ingest(workspace: str, owner: str, source: str, license: str | None, cron: str | None,
           token_stdin: bool = False, operator: bool = False):
    from cdm.platform.data.ingest import IngestionRejected
    from cdm.platform.data.sources import SourceError
    from cdm.platform.workspace.paths import check_owner_id
    from flows.ingestion import ingest as run_ingestion

    check_owner_id(owner)
    ctx = _ctx(workspace)
    from flows.commands.revocation import read_token

    changed_by = _source_change(ctx, owner, source, read_token(None, token_stdin), operator)
    try:
        result = run_ingestion(ctx, owner, source, license, cron)
    except IngestionRejected as e:
        raise CommandFailed(f"{e.summary()}; report: {e.report.docs}", code=2,
                            result={"owner": owner, "rejected": e.report.as_dict()}) from None
    except SourceError as e:
        raise WorkspaceError(f"{source}: {e}") from None
    if changed_by:  # recorded once the batch from the new source is in (a refused batch changes nothing)
        from cdm.platform.workspace import ledger
        from cdm.platform.models import registry
        from cdm.platform.workspace.paths import now

        _, head = ledger.record(ctx.ws, {"event": "source-changed", "owner_key": result["owner_key"],
                                         "by": changed_by, "received": now()})
        registry.anchor_ledger(ctx.client, head)
        result["source_changed_by"] = changed_by
    text = (f"ingested {result['added']} new samples for {owner} ({result['total']} in all; owner key "
            f"{result['owner_key']}); data {result['data_hash']}")
    if result.get("token"):
        text += f"\nowner token (shown once; proves `cdm revoke {owner} --token ...`): {result['token']}"
    return result, text


def _source_change(ctx, owner: str, source: str, token: str | None, operator: bool) -> str | None:
    """Who changes an existing owner's recorded source: the owner (their token) or an operator who says so
    (`--operator`, written in the ledger); anyone else is refused — whoever could re-point a source could feed the
    workspace data in the owner's name. None when the source is new or unchanged."""
    from cdm.platform.workspace import owner_records
    from cdm.platform.data.ingest import absolute_source

    _, rec = owner_records.record_of(ctx.ws, owner)
    if rec is None or not rec.source or rec.source == absolute_source(source):
        return None
    if token:
        return owner_records.authorize(ctx.ws, owner, token)  # PermissionError (exit 2) for another's token
    if operator:
        return "operator"
    raise PermissionError(f"{owner!r} already ingests from another source; changing it needs the owner's token "
                          "(--token-stdin or CDM_OWNER_TOKEN) or --operator (recorded in the ledger)")


def consent(workspace: str, owner: str):
    from cdm.platform.workspace import ledger, owner_records
    from cdm.platform.models import registry
    from cdm.platform.workspace.paths import check_owner_id, now

    ctx = _ctx(workspace)
    key, rec = owner_records.record_of(ctx.ws, check_owner_id(owner))
    if rec is None:
        raise WorkspaceError(f"no record of owner {owner!r}: a first `cdm ingest` records their consent")
    if rec.state != "revoked":
        raise WorkspaceError(f"owner {owner!r} has not revoked consent; nothing to record")
    from cdm.platform.forgetting.record import load

    if rec.revocation and not load(ctx.ws, rec.revocation).completed:
        raise WorkspaceError(f"the revocation of {owner!r} is still in progress; consent can follow once it ends")
    entry, head = ledger.record(ctx.ws, {"event": "consent", "owner_key": key, "received": now()})
    registry.anchor_ledger(ctx.client, head)
    owner_records.update(ctx.ws, key, state="pending", consents=rec.consents + [now()],
                         drop=("revocation", "revoked"))
    token = owner_records.issue_token(ctx.ws, key)
    return ({"owner": owner, "owner_key": key, "token": token, "ledger_seq": entry["seq"]},
            f"consent of {owner} recorded (ledger entry {entry['seq']}); `cdm ingest {owner} SOURCE` may bring their "
            f"data in again\nowner token (shown once): {token}")


def pretrain(workspace: str, source: str | None, steps: int | None, progress: bool, brought: str | None = None,
             trained_on: str | None = None):
    from cdm.platform.data.ingest import IngestionRejected
    from flows.training import pretrain as run_pretrain

    ctx = _ctx(workspace)
    if brought is not None or source is None or trained_on is not None:
        if brought is None or source is not None or steps is not None or trained_on is None:
            raise WorkspaceError("give either SOURCE (public data to train the base on) or --from DIR with "
                                 "--trained-on TEXT (a base you already have), not both")
        from cdm.platform.models.pretrain import register_brought_init, register_text_base

        if ctx.params.data.conditioning == "text":
            if not trained_on.strip():
                raise WorkspaceError("say what the base was trained on (--trained-on): the certificate quotes it")
            result = register_text_base(ctx, brought, str(Path(brought).resolve()), trained_on=trained_on)
        else:
            result = register_brought_init(ctx, brought, trained_on)
        return result, (f"cdm-init v{result['version']} (alias current): brought from {brought}, trained on: "
                        f"{result['trained_on']}" + _init_hint(ctx))
    try:
        result = run_pretrain(str(Path(workspace).resolve()), source, steps, progress=progress)
    except IngestionRejected as e:
        raise CommandFailed(f"public data: {e.summary()}", result={"rejected": e.report.as_dict()}) from None
    return result, (f"cdm-init v{result['version']} (alias current): {result['samples']} public samples, "
                    f"{result['steps']} steps ({result['seconds']} s)" + _init_hint(ctx))


def _init_hint(ctx) -> str:
    """What to do next with a new base: a text workspace's compartments always adapt it; a class workspace's
    shards start from it once `train.init` says so."""
    if ctx.params.data.conditioning == "text":
        return "; `cdm train` fits each compartment on it"
    if ctx.params.train.init == "public":
        return "; shards start from it at the next `cdm train`"
    return "; set `train.init: public` in params.yaml to start shards from it"
