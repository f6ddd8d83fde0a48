"""A workspace's paths, locks, secret and owner keys.

    <root>/params.yaml  consumers.yaml  workspace.yaml  dvc.yaml  data.dvc  ledger.jsonl
    <root>/data/owners/<owner>/<label>/<sha256>.png  + manifest.json     (DVC-tracked; the owner's raw id)
    <root>/mlflow/       mlflow.db and artifacts/                          (git-ignored)
    <root>/.cdm/         secret, owners.json, shards.json, checkpoints/, cache/, staging/, revocations/,
                         reports/, logs/, prefect/ (this workspace's Prefect home)   (git-ignored)

Raw owner ids appear only in `data/owners/<owner>/` and in the owner record (docs/design.md §5); everything else uses
the pseudonymous key HMAC(secret, owner).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from cdm.platform.workspace.errors import WorkspaceError

OWNER_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


MIN_NEW_OWNER_ID = 3  # a shorter id cannot be told apart from chance bytes by the trace scan (cdm/platform/forgetting/scan.py)


def check_new_owner_id(owner: str) -> str:
    """An id for a new owner: allowed (`check_owner_id`) and long enough to be searched for."""
    check_owner_id(owner)
    if len(owner) < MIN_NEW_OWNER_ID:
        raise WorkspaceError(f"owner id {owner!r} is too short: a new owner's id has at least {MIN_NEW_OWNER_ID} "
                             "characters (the verification of a revocation searches every store for it)")
    return owner


def check_owner_id(owner: str) -> str:
    if not isinstance(owner, str) or not OWNER_ID.match(owner):
        raise WorkspaceError(f"owner id {owner!r} is not allowed: use 1-64 of a-z, 0-9, '_' and '-', "
                             "starting with a letter or digit")
    return owner


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    # -- paths -----------------------------------------------------------------------------------------------
    params_path = property(lambda self: self.root / "params.yaml")
    consumers_path = property(lambda self: self.root / "consumers.yaml")
    config_path = property(lambda self: self.root / "workspace.yaml")
    data_dir = property(lambda self: self.root / "data")
    owners_dir = property(lambda self: self.root / "data" / "owners")
    ledger_path = property(lambda self: self.root / "ledger.jsonl")
    state_dir = property(lambda self: self.root / ".cdm")
    checkpoints_dir = property(lambda self: self.state_dir / "checkpoints")
    latents_dir = property(lambda self: self.state_dir / "latents")  # text owners' VAE latents, one folder per key
    cache_dir = property(lambda self: self.state_dir / "cache")
    staging_dir = property(lambda self: self.state_dir / "staging")
    revocations_dir = property(lambda self: self.state_dir / "revocations")
    reports_dir = property(lambda self: self.state_dir / "reports")
    logs_dir = property(lambda self: self.state_dir / "logs")
    prefect_home = property(lambda self: self.state_dir / "prefect")
    used_stores_path = property(lambda self: self.state_dir / "stores.json")  # every store ever used (Context)
    tmp_dir = property(lambda self: self.state_dir / "tmp")  # downloads of models while in use (removed after)

    def owner_dir(self, owner: str) -> Path:
        path = (self.owners_dir / check_owner_id(owner)).resolve()
        if path.parent != self.owners_dir.resolve():
            raise WorkspaceError(f"owner {owner!r} escapes the workspace")
        return path

    def exists(self) -> bool:
        return self.params_path.is_file() and (self.root / ".dvc").is_dir()

    def require(self) -> "Workspace":
        if not self.exists():
            raise WorkspaceError(f"{self.root} is not a cdm workspace (no params.yaml or .dvc/); run `cdm init DIR`")
        return self

    def tempdir(self):
        """A temporary folder inside the workspace (removed on exit), so that what a command unpacks there — model
        files, router weights — lies where the purge and the scan see it, not in the system's temp folder."""
        import tempfile

        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-", dir=self.tmp_dir)

    def lock(self) -> FileLock:
        """Exclusive lock for changes to data/, DVC, git, the ledger and the shard plan (ingestion and revocation
        of different owners may run concurrently; their commits are serialized). Not re-entrant across
        instances: take it once per operation."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(self.state_dir / "lock", thread_local=False)

    # -- configuration (workspace.yaml) -----------------------------------------------------------------------
    def config(self) -> dict:
        import yaml

        if not self.config_path.exists():
            return {}
        data = yaml.safe_load(self.config_path.read_text()) or {}
        if not isinstance(data, dict):
            raise WorkspaceError(f"{self.config_path}: expected a mapping")
        return data

    def tracking_uri(self, config: dict | None = None) -> str:
        uri = (config if config is not None else self.config()).get("mlflow", {}).get("tracking_uri")
        if not uri:
            return f"sqlite:///{self.root}/mlflow/mlflow.db"  # root is absolute: four slashes in all
        return uri

    def artifact_root(self, config: dict | None = None) -> str:
        root = (config if config is not None else self.config()).get("mlflow", {}).get("artifact_root")
        return root or (self.root / "mlflow" / "artifacts").as_uri()

    def s3_endpoint_url(self, config: dict | None = None) -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL") or (config if config is not None else self.config()).get(
            "s3", {}).get("endpoint_url")

    # -- secret and owner keys -------------------------------------------------------------------------------
    def secret(self) -> bytes:
        """The workspace's HMAC key (owner keys, ledger). Made once, 0600 from its creation. A workspace that has
        owner records or a ledger but no secret lost it: a new one would give every owner — revoked ones too — a
        new key, so revoked owners would be accepted again; that is refused."""
        from cdm.platform.workspace.fileio import create_private

        path = self.state_dir / "secret"
        if not path.exists():
            if (self.state_dir / "owners.json").exists() or self.ledger_path.exists():
                raise WorkspaceError(f"{path} is missing but this workspace has owner records or a ledger; restore "
                                     "the secret from a backup (a new one would re-admit revoked owners)")
            create_private(path, secrets.token_hex(32))
        return bytes.fromhex(path.read_text().strip())

    def owner_key(self, owner: str) -> str:
        """Pseudonymous owner key: stable within the workspace, meaningless outside it."""
        return "ok-" + hmac.new(self.secret(), check_owner_id(owner).encode(), hashlib.sha256).hexdigest()[:16]

    # -- owners' data ----------------------------------------------------------------------------------------
    def owners(self) -> list[str]:
        """Owners with data in the workspace (raw ids, from the folder names)."""
        if not self.owners_dir.exists():
            return []
        return sorted(p.name for p in self.owners_dir.iterdir() if (p / "manifest.json").is_file())

    def manifest(self, owner: str) -> dict:
        path = self.owner_dir(owner) / "manifest.json"
        if not path.is_file():
            raise WorkspaceError(f"unknown owner {owner!r}")
        return json.loads(path.read_text())

    def captions(self, owner: str) -> dict[str, str]:
        """{file name: caption} of a text owner's imagefolder (`images/metadata.jsonl`); {} for a class owner."""
        path = self.owner_dir(owner) / "images" / "metadata.jsonl"
        if not path.is_file():
            return {}
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {r["file_name"]: r["text"] for r in rows}

    def load_captioned(self, owner: str, image_size: int):
        """A text owner's samples as a `CaptionedDataset` (ids are the content sha256)."""
        from cdm.text.captions import load_imagefolder

        return load_imagefolder(self.owner_dir(owner) / "images", image_size)

    def load_owner(self, owner: str, image_size: int, channels: int, labels):
        """The owner's samples as a `Dataset` (ids are the content sha256)."""
        from cdm.data import load_folder

        return load_folder(self.owner_dir(owner), image_size, channels, labels)
