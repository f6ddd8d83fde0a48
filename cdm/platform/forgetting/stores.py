"""Every store cdm writes for a workspace, as scan stores (docs/design.md §5):

    workspace files   params, ledger, data/, outputs/, metrics.json, .cdm/ (reports, logs, checkpoints, records)
    git objects       every object of the workspace's repository
    DVC cache         .dvc/cache          DVC remote      the folder or s3:// prefix of the default remote
    MLflow backend    the SQLite file     MLflow artifacts the artifact root (folder or s3://)
    Prefect database  the SQLite file of the Prefect API in use (this workspace's home, .cdm/prefect, by default),
                      found by the flow layer (cdm does not import Prefect) and passed in

With the workspace's stack up (`cdm stack up`), the registry and Prefect live in PostgreSQL and the artifacts in
S3: the MLflow server is asked through its API for every run, logged model, registered model and version; each
database is read whole with `pg_dump` (live rows, decompressed) and the cluster's files are scanned as they lie on
disk (rows deleted but not yet vacuumed); the artifacts bucket is listed and read object by object.

The owner record (`.cdm/owners.json`, the one documented place that keeps a revoked owner's raw id) is scanned
for everything but the raw id. An MLflow tracking server or Prefect server is not a file here: it is reported
as unscanned until a store type asks it through its API.

`purge_prefect_logs` takes a revoked owner's raw id out of the Prefect database, as the scan would find it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cdm.platform.workspace.context import Context
from cdm.platform.workspace.fileio import split_s3
from cdm.platform.forgetting.scan import CommandStore, FolderStore, GitStore, Needles, S3Store, Store

# What cdm writes at a workspace's top level (a workspace may also be a project's repository: .venv, sources and
# the like are not ours to scan).
WORKSPACE_FILES = ("params.yaml", "consumers.yaml", "workspace.yaml", "dvc.yaml", "data.dvc", "ledger.jsonl",
                   "metrics.json", ".gitignore", "data", "outputs", ".cdm", ".dvc/config", ".dvc/config.local")


def _s3(ctx: Context, name: str, url: str) -> Store:
    bucket, prefix = split_s3(url)
    return S3Store(name, ctx.s3(), bucket, prefix)


def workspace_stores(ctx: Context, skip: list[Path] = (), prefect_db: Path | None = None,
                     prefect_server: str | None = None) -> list[Store]:
    """`prefect_db`: the Prefect API's SQLite file; `prefect_server`: its URL when it is a server elsewhere."""
    from cdm.platform.data import dvc

    ws = ctx.ws
    owner_record = ws.state_dir / "owners.json"
    prefect_home = ws.prefect_home
    # The stack's PostgreSQL files and its credentials are scanned as their own store (below) or hold no data.
    internal = [owner_record, ws.state_dir / "secret", prefect_home, ws.state_dir / "stack" / "pg", *skip]
    stores: list[Store] = []
    for name in WORKSPACE_FILES:
        path = ws.root / name
        if path.is_file():
            stores.append(_File("workspace files", path, ws.root))
        elif path.is_dir():
            stores.append(FolderStore("workspace files", path, tuple(internal)))
    stores.append(_File("owner record", owner_record, ws.root, allow_raw_id=True))
    stores.append(GitStore("git objects", ws.root))
    stores.append(FolderStore("DVC cache", ws.root / ".dvc" / "cache"))
    remote = dvc.remote_config(ws.root)["url"] or ""
    if remote.startswith("s3://"):
        stores.append(_s3(ctx, "DVC remote", remote))
    elif remote:
        stores.append(FolderStore("DVC remote", Path(remote)))
    uri = ctx.tracking_uri
    if ctx.stack:
        stores += stack_stores(ctx)
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        stores.append(FolderStore("MLflow backend", db.parent, tuple(
            p for p in db.parent.iterdir() if not p.name.startswith(db.name)) if db.parent.exists() else ()))
    else:
        stores.append(_Unscanned("MLflow backend", f"tracking server {uri} (not a file here)"))
    artifacts = ctx.artifact_root
    if artifacts.startswith("s3://"):
        stores.append(_s3(ctx, "MLflow artifacts", artifacts))
    else:
        stores.append(FolderStore("MLflow artifacts", Path(urlparse(artifacts).path)))
    # The whole Prefect home (database, results, logs, settings), and the database's folder when it lies elsewhere.
    if prefect_db is not None and not ctx.stack and not prefect_db.resolve().is_relative_to(prefect_home.resolve()):
        stores.append(FolderStore("Prefect database", prefect_db.parent,
                                  tuple(p for p in prefect_db.parent.iterdir() if not p.name.startswith(prefect_db.name))))
    if prefect_home.exists():
        stores.append(FolderStore("Prefect database" if prefect_db is not None and not ctx.stack else "Prefect home",
                                  prefect_home))
    if prefect_server is not None and not ctx.stack:
        stores.append(_Unscanned("Prefect database", f"server {prefect_server} (not a file here)"))
    return stores


def require_reachable(ctx: Context) -> None:
    """Refuse (WorkspaceError, exit 2) while a store this workspace used is unreachable: its stack configured but
    down, an MLflow server that does not answer, a DVC remote that cannot be listed. A revocation checked against
    the stores that happen to answer would certify while another still serves the owner."""
    import json
    import urllib.request

    from cdm.platform.data import dvc
    from cdm.platform.workspace.errors import WorkspaceError
    from cdm.platform.stack.services import Stack, stack_dir

    ws = ctx.ws
    if ctx.stack is None and Stack.read(ws) is not None and (stack_dir(ws) / "pg").exists():
        raise WorkspaceError("this workspace's stack (PostgreSQL, MLflow and Prefect servers) is down: run "
                             "`cdm stack up` first; a revocation must reach the stores it wrote")
    path = ws.used_stores_path
    used = json.loads(path.read_text()) if path.exists() else {}
    for uri in sorted(set(used.get("mlflow", [])) | {ctx.tracking_uri}):
        if uri.startswith("http"):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
            except OSError as e:
                raise WorkspaceError(f"MLflow tracking server {uri}, used by this workspace, does not answer "
                                     f"({e}); a revocation must reach it") from None
        elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            raise WorkspaceError(f"MLflow store {uri}, used by this workspace, is missing")
    for api in sorted(set(used.get("prefect", []))):
        if api.startswith("http"):
            try:
                urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5).read()
            except OSError as e:
                raise WorkspaceError(f"Prefect API {api}, used by this workspace, does not answer ({e}); a "
                                     "revocation must reach it") from None
    roots = sorted(set(used.get("artifacts", [])) | {ctx.artifact_root})
    remote = dvc.remote_config(ws.root)["url"] or ""
    for name, url in [("MLflow artifact root", r) for r in roots] + [("DVC remote", remote)]:
        _require_storage(ctx, name, url)


def _require_storage(ctx: Context, name: str, url: str) -> None:
    """An s3:// bucket that answers, or a local folder whose parent exists (the folder itself is made on first
    use: its absence alone is no outage, an unmounted volume is)."""
    from cdm.platform.workspace.errors import WorkspaceError

    if url.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _ = split_s3(url)
        try:
            ctx.s3().head_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as e:
            raise WorkspaceError(f"{name} {url} does not answer ({e}); a revocation must reach it") from None
    elif url and ":" not in url and not Path(url).parent.exists():
        raise WorkspaceError(f"{name} {url} is missing; a revocation must reach it")


def stack_stores(ctx: Context) -> list[Store]:
    """The stack's registry and Prefect database: asked through MLflow's API, dumped, and read as files."""
    from cdm.platform.stack.services import HOST, credentials, pg_bin, stack_dir

    c = credentials(ctx.ws)
    dump = [pg_bin("pg_dump"), "-h", HOST, "-p", str(ctx.stack.postgres_port), "-U", c["postgres_user"]]
    env = {"PGPASSWORD": c["postgres_password"]}
    return [MlflowServerStore("MLflow server", ctx.client),
            CommandStore("MLflow backend (pg_dump)", [*dump, "mlflow"], env),
            CommandStore("Prefect database (pg_dump)", [*dump, "prefect"], env),
            FolderStore("PostgreSQL files", stack_dir(ctx.ws) / "pg", database=True)]


@dataclass
class MlflowServerStore(Store):
    """Every run (active or deleted), logged model, registered model and model version the tracking server
    returns, as JSON: what its API still tells anyone."""

    name: str
    client: object  # an MlflowClient of the server

    def items(self):
        from mlflow.entities import ViewType

        from cdm.platform.models.registry import pages

        c = self.client
        experiments = c.search_experiments(view_type=ViewType.ALL)
        ids = [e.experiment_id for e in experiments]
        for e in experiments:
            yield f"experiment {e.experiment_id}", _json(e)
        for run in pages(lambda token: c.search_runs(ids, run_view_type=ViewType.ALL, page_token=token)):
            yield f"run {run.info.run_id}", _json({"info": run.info, "data": run.data, "inputs": run.inputs})
        for model in pages(lambda token: c.search_logged_models(ids, page_token=token)):
            yield f"logged model {model.model_id}", _json(model)
        for rm in pages(lambda token: c.search_registered_models(page_token=token)):
            yield f"registered model {rm.name}", _json(rm)
        for mv in pages(lambda token: c.search_model_versions(page_token=token)):
            yield f"model version {mv.name}/{mv.version}", _json(mv)


def _json(entity) -> bytes:
    import json

    def plain(o):
        if hasattr(o, "to_dictionary"):
            return o.to_dictionary()
        if hasattr(o, "__dict__"):
            return vars(o)
        return str(o)

    return json.dumps(entity, default=plain, sort_keys=True).encode()


class _File(Store):
    def __init__(self, name: str, path: Path, root: Path, allow_raw_id: bool = False):
        self.name, self.path, self.root, self.allow_raw_id = name, path, root, allow_raw_id

    def items(self):
        if self.path.is_file():
            yield str(self.path.relative_to(self.root)), self.path.read_bytes()


class _Unscanned(Store):
    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def items(self):
        yield self.why, None


def purge_prefect_logs(db, owner: str, key: str, others: tuple[str, ...] = ()) -> int:
    """Take `owner`'s raw id out of Prefect's SQLite database `db`: log lines naming them are deleted, run state
    messages and event payloads naming them have it replaced by `key` (matched as the trace scan matches a database: the id's usual
    cases, not inside another remaining owner's id); then, whenever the file still holds the id anywhere (free
    pages, the write-ahead log), it is rewritten (VACUUM) and checkpointed. Run logs are redacted before they reach
    Prefect; this removes what reached it another way (an older version, a library's own message). Raises OSError
    when another connection keeps the checkpoint from completing (the purge retries). Returns the rows changed."""
    import re
    import sqlite3

    needle = Needles(owner, others=others)
    cases = re.compile("|".join(re.escape(c) for c in sorted({owner, owner.upper(), owner.title()}, key=len)[::-1]))
    con = sqlite3.connect(str(db), timeout=60)
    changed = 0
    try:
        con.execute("PRAGMA secure_delete = ON")  # what is deleted is zeroed, not left in free pages
        # Log lines go; state messages and events (a state change's event and its resources repeat its
        # message) keep the key.
        for table, column, action in (("log", "message", "delete"), ("flow_run_state", "message", "redact"),
                                      ("task_run_state", "message", "redact"), ("events", "resource", "redact"),
                                      ("events", "payload", "redact"), ("events", "related", "redact"),
                                      ("event_resources", "resource", "redact")):
            try:
                rows = con.execute(f"SELECT id, {column} FROM {table} WHERE {column} LIKE ?",
                                   (f"%{owner}%",)).fetchall()
            except sqlite3.OperationalError:  # a Prefect version without that table
                continue
            hits = [(rid, m) for rid, m in rows if m and needle.find(str(m).encode(), binary=False, database=True)]
            if action == "delete":
                con.executemany(f"DELETE FROM {table} WHERE id = ?", [(rid,) for rid, _ in hits])
            else:
                con.executemany(f"UPDATE {table} SET {column} = ? WHERE id = ?",
                                [(cases.sub(key, str(m)), rid) for rid, m in hits])
            changed += len(hits)
        con.commit()
        if changed or _mentions(db, needle):
            con.execute("VACUUM")
            busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                raise OSError(f"Prefect's database {db} is busy: its checkpoint did not complete")
    finally:
        con.close()
    return changed


def _mentions(db, needle) -> bool:
    """Whether the database file or its write-ahead log holds the raw id (as the scan would find it)."""
    from pathlib import Path

    for part in (Path(db), Path(f"{db}-wal")):
        if part.is_file() and needle.find(part.read_bytes(), binary=False, database=True):
            return True
    return False
