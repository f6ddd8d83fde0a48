"""The typed context of one command: workspace paths, validated params, and the clients it needs.

Loaded once by an entry point (a CLI command, or a flow started by a deployment) and passed down; nothing below
re-reads `params.yaml` or `workspace.yaml`. Clients are created on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cdm.config import Params
from cdm.platform.workspace.paths import Workspace

if TYPE_CHECKING:  # the stack sits above the workspace: the context opens it lazily (see the package docstring)
    from cdm.platform.stack.services import Stack


@dataclass
class Context:
    ws: Workspace
    params: Params
    config: dict = field(default_factory=dict)  # workspace.yaml: MLflow store and S3 endpoint
    stack: Stack | None = None  # the workspace's production stack when it is up (`cdm stack up`): it wins

    @classmethod
    def load(cls, root: str | Path) -> "Context":
        from cdm.platform.stack.services import active

        ws = Workspace(Path(root)).require()
        return cls(ws, Params.load(ws.params_path), ws.config(), active(ws))

    def __getstate__(self) -> dict:
        """Pickled (a task on a Dask worker process) without its clients: the worker makes its own."""
        return {k: v for k, v in self.__dict__.items() if k in ("ws", "params", "config", "stack")}

    @property
    def tracking_uri(self) -> str:
        return self.stack.mlflow_tracking_uri if self.stack else self.ws.tracking_uri(self.config)

    @property
    def artifact_root(self) -> str:
        """Where MLflow's artifacts lie (the stack's server proxies them to its S3 bucket)."""
        return self.stack.artifacts_destination if self.stack else self.ws.artifact_root(self.config)

    @property
    def backend(self):
        """The MLflow backend store for `mlflow gc`: the SQLite file, or the stack's PostgreSQL database (the
        password in the environment, not in the URI)."""
        from cdm.platform.models.cleanup import Backend

        if not self.stack:
            return Backend(self.tracking_uri)
        from cdm.platform.stack.services import client_env, credentials, database_url

        return Backend(database_url(self.ws, self.stack, "mlflow", password=False),
                       {**client_env(self.ws, self.stack), "PGPASSWORD": credentials(self.ws)["postgres_password"]})

    @cached_property
    def client(self):
        """The MLflow client of this workspace's store. MLflow's fluent APIs (log_model, register_model,
        pyfunc.load_model, start_run) read only the process-wide URI: it is set here, once per command."""
        from cdm.platform.models import registry

        self.record_used()
        return registry.client(self.tracking_uri)

    def record_used(self) -> None:
        """Remember the MLflow store, artifact root and Prefect API this workspace uses (`.cdm/stores.json`): a
        revocation must reach every store the workspace ever wrote, not only the one configured today
        (`stores.require_reachable`)."""
        import json
        import os

        from filelock import FileLock

        from cdm.platform.workspace.fileio import atomic_write

        path = self.ws.used_stores_path
        # The workspace's own Prefect API (flows/prefect_api.py, CDM_WORKSPACE_PREFECT_API) keeps its runs in the
        # workspace's Prefect home, on a port that changes each time it starts: what is used is the home.
        api = os.environ.get("PREFECT_API_URL")
        own = api is not None and api == os.environ.get("CDM_WORKSPACE_PREFECT_API")
        now = {"mlflow": self.tracking_uri, "artifacts": self.artifact_root,
               "prefect": str(self.ws.prefect_home) if not api or own else api}
        used = json.loads(path.read_text()) if path.exists() else {}
        if all(v in used.get(k, []) for k, v in now.items()):
            return
        with FileLock(self.ws.state_dir / "stores.lock"):
            used = json.loads(path.read_text()) if path.exists() else {}
            for k, v in now.items():
                used[k] = sorted(set(used.get(k, [])) | {v})
            atomic_write(path, json.dumps(used, indent=2, sort_keys=True))

    @cached_property
    def experiment_id(self) -> str:
        from cdm.platform.models import registry

        # A tracking server keeps artifacts where it proxies them (no location from the client).
        return registry.experiment_id(self.client, None if self.stack else self.artifact_root)

    def s3(self):
        """A boto3 S3 client for the workspace's endpoint (standard retry mode)."""
        import boto3
        from botocore.config import Config

        retries = Config(retries={"max_attempts": 5, "mode": "standard"})
        if self.stack:
            from cdm.platform.stack.services import s3_client

            return s3_client(self.ws, self.stack, retries)
        return boto3.client("s3", endpoint_url=self.ws.s3_endpoint_url(self.config), config=retries)

    def dvc_s3(self):
        """The S3 client when the DVC remote is on S3, else None (a local remote needs none)."""
        from cdm.platform.data import dvc

        return self.s3() if (dvc.remote_config(self.ws.root)["url"] or "").startswith("s3://") else None
