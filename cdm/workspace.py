"""A workspace: owners' data (DVC-tracked), params, consumer policy, MLflow store, audit ledger, local state.

    <root>/params.yaml  consumers.yaml  workspace.yaml  dvc.yaml  data.dvc  ledger.jsonl
    <root>/data/owners/<owner>/<label>/<sha256>.png   + data/owners/<owner>/manifest.json
    <root>/mlflow/       mlflow.db and artifacts/ (git-ignored)
    <root>/.cdm/         secret, owners.json, checkpoints/, cache/, staging/, revocations/, reports/ (git-ignored)

Raw owner ids appear only in `data/owners/` (which a revocation deletes); everything else — MLflow tags, the
ledger, owners.json — uses the pseudonymous key HMAC(secret, owner).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Sequence

OWNER_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class WorkspaceError(ValueError):
    """Bad input or a refused request concerning the workspace (exit 2)."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def check_owner_id(owner: str) -> str:
    if not isinstance(owner, str) or not OWNER_ID.match(owner):
        raise WorkspaceError(f"owner id {owner!r} is not allowed: use 1-64 of a-z, 0-9, '_' and '-', "
                             "starting with a letter or digit")
    return owner


def git(root: str | Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", "-c", "user.name=cdm", "-c", "user.email=cdm@localhost", *args], cwd=root,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # -- paths -----------------------------------------------------------------------------------------------
    @property
    def params_path(self) -> Path: return self.root / "params.yaml"
    @property
    def consumers_path(self) -> Path: return self.root / "consumers.yaml"
    @property
    def config_path(self) -> Path: return self.root / "workspace.yaml"
    @property
    def data_dir(self) -> Path: return self.root / "data"
    @property
    def owners_dir(self) -> Path: return self.root / "data" / "owners"
    @property
    def ledger_path(self) -> Path: return self.root / "ledger.jsonl"
    @property
    def state_dir(self) -> Path: return self.root / ".cdm"
    @property
    def checkpoints_dir(self) -> Path: return self.state_dir / "checkpoints"
    @property
    def cache_dir(self) -> Path: return self.state_dir / "cache"
    @property
    def staging_dir(self) -> Path: return self.state_dir / "staging"
    @property
    def revocations_dir(self) -> Path: return self.state_dir / "revocations"
    @property
    def reports_dir(self) -> Path: return self.state_dir / "reports"

    def owner_dir(self, owner: str) -> Path:
        path = (self.owners_dir / check_owner_id(owner)).resolve()
        if path.parent != self.owners_dir.resolve():
            raise WorkspaceError(f"owner {owner!r} escapes the workspace")
        return path

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock for changes to data/, DVC, git and the shard plan (ingestion and revocation of different
        owners may run concurrently; their commits are serialized)."""
        with self._flock("lock"):
            yield

    @contextlib.contextmanager
    def _flock(self, name: str):
        """An exclusive advisory lock on `.cdm/<name>` (across processes; not re-entrant)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / name, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- configuration ---------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.params_path.is_file() and (self.root / ".dvc").is_dir()

    def require(self) -> "Workspace":
        if not self.exists():
            raise WorkspaceError(f"{self.root} is not a cdm workspace (no params.yaml or .dvc/); run `cdm init DIR`")
        return self

    def config(self) -> dict:
        import yaml

        if not self.config_path.exists():
            return {}
        data = yaml.safe_load(self.config_path.read_text()) or {}
        if not isinstance(data, dict):
            raise WorkspaceError(f"{self.config_path}: expected a mapping")
        return data

    @property
    def tracking_uri(self) -> str:
        return self.config().get("mlflow", {}).get("tracking_uri") or f"sqlite:///{self.root}/mlflow/mlflow.db"

    @property
    def artifact_root(self) -> str:
        return self.config().get("mlflow", {}).get("artifact_root") or (self.root / "mlflow" / "artifacts").as_uri()

    @property
    def s3_endpoint_url(self) -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL") or self.config().get("s3", {}).get("endpoint_url")

    def s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.s3_endpoint_url,
                            config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def dvc_s3_client(self):
        """A boto3 client when the DVC remote is on S3, else None (a local remote needs none)."""
        from cdm import dvc

        return self.s3_client() if (dvc.remote_config(self.root)["url"] or "").startswith("s3://") else None

    def secret(self) -> bytes:
        path = self.state_dir / "secret"
        if not path.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return bytes.fromhex(path.read_text().strip())

    def owner_key(self, owner: str) -> str:
        """Pseudonymous owner key: stable within the workspace, meaningless outside it."""
        return "ok-" + hmac.new(self.secret(), check_owner_id(owner).encode(), hashlib.sha256).hexdigest()[:16]

    # -- owners ----------------------------------------------------------------------------------------------
    def owners(self) -> list[str]:
        """Active owners (those with data in the workspace)."""
        if not self.owners_dir.exists():
            return []
        return sorted(p.name for p in self.owners_dir.iterdir() if (p / "manifest.json").is_file())

    def manifest(self, owner: str) -> dict:
        path = self.owner_dir(owner) / "manifest.json"
        if not path.is_file():
            raise WorkspaceError(f"unknown owner {owner!r}")
        return json.loads(path.read_text())

    def owner_records(self) -> dict:
        path = self.state_dir / "owners.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def update_owner_record(self, key: str, drop: Sequence[str] = (), **fields) -> dict:
        """Read-modify-write of one owner's record, serialized across processes (ingestion and revocation of
        different owners may run at the same time). Its own lock: callers may hold `lock()`."""
        with self._flock("owners.lock"):
            records = self.owner_records()
            records[key] = {k: v for k, v in {**records.get(key, {}), **fields}.items() if k not in drop}
            tmp = self.state_dir / "owners.json.tmp"
            tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
            tmp.replace(self.state_dir / "owners.json")
            return records[key]

    def load_owner(self, owner: str, image_size: int, channels: int, labels: Sequence[int]):
        """The owner's samples as a `Dataset` (ids are the content sha256)."""
        from cdm.data import load_folder

        return load_folder(self.owner_dir(owner), image_size, channels, labels)

    def commit_owner_files(self, owner: str, files: Sequence[tuple[str, bytes]], owner_meta: dict) -> dict:
        """Atomically add `files` [(label, png bytes)] to the owner's folder and manifest.

        The new folder is assembled in staging and swapped in with renames; on any error the old folder stays.
        Returns the new manifest.
        """
        from cdm.data import sha256_bytes

        target = self.owner_dir(owner)
        batch = uuid.uuid4().hex[:12]
        stage = self.staging_dir / f"{owner}-{batch}"
        stage.mkdir(parents=True)
        try:
            if target.exists():
                shutil.copytree(target, stage, dirs_exist_ok=True)
                manifest = json.loads((stage / "manifest.json").read_text())
            else:
                manifest = {"owner": owner, "samples": []}
            manifest.update({k: v for k, v in owner_meta.items() if v is not None})
            known = {(s["label"], s["sha256"]) for s in manifest["samples"]}
            consent = now()
            for label, data in files:
                digest = sha256_bytes(data)
                if (int(label), digest) in known:
                    continue
                path = stage / str(label) / f"{digest}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                manifest["samples"].append({"sha256": digest, "label": int(label), "license": manifest.get("license"),
                                            "consent_time": consent, "batch": batch})
                known.add((int(label), digest))
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            self.owners_dir.mkdir(parents=True, exist_ok=True)
            old = self.staging_dir / f"{owner}-{batch}-old"
            if target.exists():
                target.rename(old)
            stage.rename(target)
            shutil.rmtree(old, ignore_errors=True)
            return manifest
        finally:
            shutil.rmtree(stage, ignore_errors=True)


GITIGNORE = """\
/mlflow/mlflow.db
/mlflow/artifacts/
/.cdm/
/.dvc-storage/
/metrics.json
/outputs/
"""

DVC_YAML = """\
# `dvc repro` runs the evaluation of the production composite on the current data.
stages:
  evaluate:
    cmd: cdm evaluate --workspace . --json --fail-on-regression --out metrics.json
    deps:
      - data
    params:
      - evaluate
    metrics:
      - metrics.json:
          cache: false
    always_changed: true
"""

CONSUMERS_YAML = """\
# Access rights: which owners' compartments each consumer may sample from.
#   consumers:
#     NAME: {owners: [owner-a, owner-b]}      # by owner
#     NAME: {licenses: [cc-by]}               # by the license owners gave at ingestion
consumers: {}
"""


def init_workspace(root: str | Path, remote: str | None = None, endpoint_url: str | None = None,
                   artifact_root: str | None = None, params=None) -> Workspace:
    """Create (or complete) a workspace: git, DVC with a remote (local folder unless `remote`), MLflow store,
    params.yaml, consumers.yaml, dvc.yaml, an empty tracked data/. Existing files are kept.
    """
    import yaml

    from cdm import dvc
    from cdm.config import Params

    ws = Workspace(root)
    ws.root.mkdir(parents=True, exist_ok=True)
    top = git(ws.root, "rev-parse", "--show-toplevel", check=False).strip()
    if not top or Path(top).resolve() != ws.root:
        git(ws.root, "init", "-q")
    gi = ws.root / ".gitignore"
    existing = gi.read_text() if gi.exists() else ""
    missing = [line for line in GITIGNORE.splitlines() if line not in existing.splitlines()]
    if missing:
        gi.write_text(existing + ("" if existing.endswith("\n") or not existing else "\n") + "\n".join(missing) + "\n")
    if not ws.params_path.exists():
        (params or Params()).dump(ws.params_path)
    if not ws.consumers_path.exists():
        ws.consumers_path.write_text(CONSUMERS_YAML)
    if not (ws.root / "dvc.yaml").exists():
        (ws.root / "dvc.yaml").write_text(DVC_YAML)
    config = ws.config()
    if artifact_root:
        config.setdefault("mlflow", {})["artifact_root"] = artifact_root
    if endpoint_url:
        config.setdefault("s3", {})["endpoint_url"] = endpoint_url
    ws.config_path.write_text("# Where this workspace keeps models and reaches S3.\n" + yaml.safe_dump(config or {
        "mlflow": {"tracking_uri": None, "artifact_root": None}, "s3": {"endpoint_url": None}}, sort_keys=False))
    (ws.root / "mlflow").mkdir(exist_ok=True)
    from cdm import registry

    # The tracking store and experiment exist from the start (creating the SQLite tables takes seconds, which
    # would otherwise land on the first training run).
    registry.experiment_id(registry.client(ws.tracking_uri), ws.artifact_root)
    for d in (ws.state_dir, ws.owners_dir):
        d.mkdir(parents=True, exist_ok=True)
    ws.secret()
    if not (ws.root / ".dvc").is_dir():
        url = remote or ".dvc-storage"  # DVC stores it relative to .dvc/
        dvc.init(ws.root, url, endpoint_url if (remote or "").startswith("s3://") else None)
    if not (ws.root / "data.dvc").exists():
        dvc.add_and_push(ws.root, push=False)
    git(ws.root, "add", ".gitignore", "params.yaml", "consumers.yaml", "dvc.yaml", "workspace.yaml", "data.dvc", ".dvc")
    git(ws.root, "commit", "-q", "-m", "cdm: initialise workspace", "--allow-empty")
    return ws
