"""The production stack of a workspace, started on this machine: PostgreSQL, an S3 API, an MLflow tracking server,
a Prefect server and a Prefect worker on a process work pool (docs/design.md §8).

    <root>/.cdm/stack/stack.json        what runs where: URLs, ports, pids (no secrets)      -> read by Context.load
    <root>/.cdm/stack/credentials.json  generated passwords and S3 keys (0600, never printed)
    <root>/.cdm/stack/pg/               the PostgreSQL cluster (databases `mlflow` and `prefect`)
    <root>/.cdm/stack/logs/             one log per process
    <root>/.cdm/stack/s3-snapshot/      moto's objects while the stack is down (moto keeps them in memory)

`up` runs these steps in order and stops what it started if one fails; `down` stops everything (the PostgreSQL
cluster and the logs stay, so a later `up` finds the same registry and flow runs). Every port is on loopback.

PostgreSQL is Debian's `postgresql` package (initdb + pg_ctl of the newest version installed): a real server,
the one a platform team runs, rather than an embedded copy from PyPI that lags it. It refuses to run as root;
as root the cluster belongs to the `postgres` user, which must be able to reach the workspace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.fileio import atomic_write, create_private
from cdm.platform.workspace.paths import Workspace

HOST = "127.0.0.1"


@dataclass(frozen=True)
class StackConfig:
    work_pool: str = "cdm"  # the Prefect work pool the worker polls
    bucket: str = "cdm-mlflow"  # MLflow's artifacts: s3://<bucket>/artifacts
    s3_endpoint: str | None = None  # an existing S3 API (keys in AWS_* variables); None: moto on loopback
    startup_timeout: float = 180.0  # seconds for each service to answer (Prefect's first migration is the slowest)


@dataclass
class Stack:
    """What `up` started (`.cdm/stack/stack.json`). Secrets are not here."""
    mlflow_tracking_uri: str
    prefect_api_url: str
    s3_endpoint_url: str
    artifacts_destination: str
    work_pool: str
    postgres_port: int
    pids: dict[str, int] = field(default_factory=dict)
    started: bool = True

    @classmethod
    def read(cls, ws: Workspace) -> "Stack | None":
        path = stack_dir(ws) / "stack.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def write(self, ws: Workspace) -> None:
        atomic_write(stack_dir(ws) / "stack.json", json.dumps(asdict(self), indent=2))

    def public(self) -> dict:
        """What `cdm stack up` prints: where each service is."""
        return {"mlflow_tracking_uri": self.mlflow_tracking_uri, "prefect_api_url": self.prefect_api_url,
                "s3_endpoint_url": self.s3_endpoint_url, "artifacts_destination": self.artifacts_destination,
                "work_pool": self.work_pool}


def stack_dir(ws: Workspace) -> Path:
    return ws.state_dir / "stack"


def credentials(ws: Workspace) -> dict:
    """The stack's generated secrets, made on first use (0600): PostgreSQL's password, the control plane's."""
    path = stack_dir(ws) / "credentials.json"
    # Created 0600 in one step (never readable by others, not even for a moment); a concurrent first use keeps one.
    # (The S3 server's access key is not here: moto makes it at each start, `s3_keys`.)
    fresh = {"postgres_user": "cdm", "postgres_password": secrets.token_hex(16),
             # The control plane's own credentials: Prefect's API auth string and MLflow's basic-auth admin.
             "prefect_auth": "cdm:" + secrets.token_hex(16), "mlflow_user": "cdm-admin",
             "mlflow_password": secrets.token_hex(16), "mlflow_secret_key": secrets.token_hex(32)}
    create_private(path, json.dumps(fresh))
    c = json.loads(path.read_text())
    if not set(fresh) <= set(c):  # made by an earlier cdm: the new keys are added, the old ones kept
        c = {**fresh, **c}
        atomic_write(path, json.dumps(c))
    return c


def client_env(ws: Workspace, stack: Stack) -> dict[str, str]:
    """What a client process needs to use the stack: where each service is and the credentials each asks for
    (Prefect's API and MLflow's tracking server refuse unauthenticated requests)."""
    c = credentials(ws)
    # Artifacts stream through the tracking server (which signs its own S3 requests), never by presigned URLs: the
    # stack's S3 (moto with its IAM checks) cannot check a query-string signature and answers 500, which MLflow's
    # multipart download retries for minutes.
    return {"PREFECT_API_URL": stack.prefect_api_url, "PREFECT_API_AUTH_STRING": c["prefect_auth"],
            "MLFLOW_TRACKING_URI": stack.mlflow_tracking_uri, "MLFLOW_TRACKING_USERNAME": c["mlflow_user"],
            "MLFLOW_TRACKING_PASSWORD": c["mlflow_password"], "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
            "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false", **s3_env(ws, stack)}


def database_url(ws: Workspace, stack: Stack, database: str, driver: str = "postgresql+psycopg2",
                 password: bool = True) -> str:
    """The database's URL; `password=False` leaves the secret out (the client takes it from PGPASSWORD)."""
    c = credentials(ws)
    secret = f":{c['postgres_password']}" if password else ""
    return f"{driver}://{c['postgres_user']}{secret}@{HOST}:{stack.postgres_port}/{database}"


def s3_env(ws: Workspace, stack: Stack) -> dict[str, str]:
    """The S3 endpoint and keys for a process that talks to the stack's S3."""
    env = {"AWS_ENDPOINT_URL": stack.s3_endpoint_url, "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint_url}
    if stack.pids.get("s3"):  # moto: the key its server made for this stack; an existing S3 keeps the caller's
        keys = s3_keys(ws)
        env |= {"AWS_ACCESS_KEY_ID": keys["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": keys["aws_secret_access_key"],
                "AWS_DEFAULT_REGION": "us-east-1"}
    return env


def s3_keys_path(ws: Workspace) -> Path:
    return stack_dir(ws) / "s3-keys.json"


def s3_keys(ws: Workspace) -> dict[str, str]:
    """The access key the stack's S3 server (`cdm.platform.stack.s3_server`) made at its start (0600); every other
    key, and every unsigned request, is refused there."""
    path = s3_keys_path(ws)
    if not path.is_file():
        raise WorkspaceError("stack: the S3 server's access key is missing; run `cdm stack up` again")
    return json.loads(path.read_text())


# -- processes -------------------------------------------------------------------------------------------------

def mlflow_server_env(ws: Workspace, folder: Path | None = None) -> dict[str, str]:
    """What an MLflow server with cdm's basic auth needs beside its arguments: the auth config and a secret key
    for its CSRF protection."""
    return {"MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(ws, folder)),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials(ws)["mlflow_secret_key"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _spawn(ws: Workspace, name: str, args: list[str], env: dict[str, str] | None = None) -> int:
    """Start a service in its own session (it outlives this command), output to its log; returns its pid."""
    log = stack_dir(ws) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True, cwd=ws.root)
    return proc.pid


def _wait_http(url: str, name: str, pid: int | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:  # it answers (an authenticating server refuses the probe: 401/403)
            if e.code < 500:
                return
        except OSError:
            pass
        if pid is not None and not alive(pid):
            raise WorkspaceError(f"stack: {name} exited at start-up (see its log in .cdm/stack/logs/)")
        time.sleep(0.5)
    raise WorkspaceError(f"stack: {name} did not answer on {url} within {timeout:.0f} s")


def alive(pid: int) -> bool:
    """Running (a zombie left unreaped by its new parent is not)."""
    import psutil

    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM to the service's process group, then SIGKILL after `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and alive(pid):
            time.sleep(0.2)
        if not alive(pid):
            return


# -- PostgreSQL ------------------------------------------------------------------------------------------------

def pg_bin(tool: str) -> str:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True):
        if (folder / tool).is_file():
            return str(folder / tool)
    found = shutil.which(tool)
    if not found:
        raise WorkspaceError(f"stack: PostgreSQL's {tool} not found: install the `postgresql` package "
                             "(Debian: apt-get install postgresql)")
    return found


def _as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses root: run its tools as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _pg_run(args: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(_as_postgres(args), capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise WorkspaceError(f"stack: {what} failed: {tail[-1] if tail else proc.returncode}")


def start_postgres(ws: Workspace, port: int) -> None:
    """initdb (first time) into .cdm/stack/pg, start on loopback, create the role and both databases."""
    data = stack_dir(ws) / "pg"
    c = credentials(ws)
    if os.geteuid() == 0:
        # Folders cdm made are 0700 (its umask): the `postgres` user may pass through the ones on the way to its
        # cluster and log (search only, o+x; nothing in them becomes listable or readable).
        for folder in (ws.root, ws.state_dir, stack_dir(ws), stack_dir(ws) / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(folder.stat().st_mode | 0o011)
        probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(stack_dir(ws))])
        if probe.returncode != 0:
            raise WorkspaceError(f"stack: PostgreSQL runs as the `postgres` user (not root), which cannot reach "
                                 f"{stack_dir(ws)}: make its parent folders traversable (chmod o+x)")
    fresh = not (data / "PG_VERSION").is_file()
    if fresh:
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        data.chmod(0o700)
        pwfile = atomic_write(stack_dir(ws) / "pg.pw", c["postgres_password"])
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            _pg_run([pg_bin("initdb"), "-D", str(data), "-U", c["postgres_user"], "--pwfile", str(pwfile),
                     "-A", "scram-sha-256", "-E", "UTF8", "--no-instructions"], "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    log = stack_dir(ws) / "logs" / "postgres.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres", "postgres")
    opts = f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories={data}"
    _pg_run([pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
            "PostgreSQL start")
    if fresh:
        for db in ("mlflow", "prefect"):
            _pg_run([pg_bin("createdb"), "-h", HOST, "-p", str(port), "-U", c["postgres_user"], db],
                    f"createdb {db}", env={"PGPASSWORD": c["postgres_password"]})


def stop_postgres(ws: Workspace) -> None:
    data = stack_dir(ws) / "pg"
    if (data / "postmaster.pid").is_file():
        _pg_run([pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "PostgreSQL stop")


# -- the stack -------------------------------------------------------------------------------------------------

def up(ws: Workspace, cfg: StackConfig = StackConfig()) -> Stack:
    """Start PostgreSQL, S3 (moto unless `cfg.s3_endpoint`), the MLflow tracking server (backend PostgreSQL,
    artifacts proxied to S3), the Prefect server (on PostgreSQL) and a worker on `cfg.work_pool`. Returns the
    running stack, also written to `.cdm/stack/stack.json`; a stack already up is returned as it is."""
    running = Stack.read(ws)
    if running is not None and running.started and all(alive(p) for p in running.pids.values()):
        return running
    if running is not None:
        down(ws)
    stack_dir(ws).mkdir(parents=True, exist_ok=True)
    credentials(ws)  # generated before anything starts
    stack = Stack(mlflow_tracking_uri="", prefect_api_url="", s3_endpoint_url=cfg.s3_endpoint or "",
                  artifacts_destination=f"s3://{cfg.bucket}/artifacts", work_pool=cfg.work_pool,
                  postgres_port=free_port())
    try:
        # 1. PostgreSQL: the registry's and Prefect's database.
        start_postgres(ws, stack.postgres_port)
        stack.pids["postgres"] = int((stack_dir(ws) / "pg" / "postmaster.pid").read_text().split()[0])
        stack.write(ws)
        # 2. S3: moto on loopback unless an endpoint was given; the artifacts bucket.
        if not cfg.s3_endpoint:
            port = free_port()
            stack.s3_endpoint_url = f"http://{HOST}:{port}"
            s3_keys_path(ws).unlink(missing_ok=True)
            # It listens only once its access key is written (`s3_keys`).
            stack.pids["s3"] = _spawn(ws, "s3", [sys.executable, "-m", "cdm.platform.stack.s3_server", "--host", HOST,
                                                 "--port", str(port), "--keys-out", str(s3_keys_path(ws))])
            stack.write(ws)
            _wait_http(stack.s3_endpoint_url, "S3 (moto)", stack.pids["s3"], cfg.startup_timeout)
        _ensure_bucket(ws, stack, cfg.bucket)
        if not cfg.s3_endpoint:
            _restore_snapshot(ws, stack)
        # 3. MLflow tracking server (runs, logged models and the registry in PostgreSQL, artifacts proxied to S3)
        #    and 4. the Prefect server on PostgreSQL: started together, then waited for.
        port = free_port()
        stack.mlflow_tracking_uri = f"http://{HOST}:{port}"
        stack.pids["mlflow"] = _spawn(ws, "mlflow", [
            sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
            "--artifacts-destination", stack.artifacts_destination, "--app-name", "basic-auth"], env={
            **s3_env(ws, stack), "MLFLOW_BACKEND_STORE_URI": database_url(ws, stack, "mlflow"),
            **mlflow_server_env(ws), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: /health in seconds, not a minute
        port = free_port()
        stack.prefect_api_url = f"http://{HOST}:{port}/api"
        stack.pids["prefect"] = _spawn(ws, "prefect-server", [
            sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            env=prefect_env(ws, stack) | {
                "PREFECT_API_DATABASE_CONNECTION_URL": database_url(ws, stack, "prefect", "postgresql+asyncpg"),
                "PREFECT_UI_ENABLED": "false"})
        stack.write(ws)
        _wait_http(f"{stack.mlflow_tracking_uri}/health", "MLflow server", stack.pids["mlflow"], cfg.startup_timeout)
        _wait_http(f"{stack.prefect_api_url}/health", "Prefect server", stack.pids["prefect"], cfg.startup_timeout)
        # 5. The work pool and its worker (flow runs as subprocesses of the worker, in the workspace).
        _prefect_cli(ws, stack, ["work-pool", "create", cfg.work_pool, "--type", "process", "--overwrite"])
        stack.pids["worker"] = _spawn(ws, "worker", [
            sys.executable, "-m", "prefect", "worker", "start", "--pool", cfg.work_pool, "--type", "process"],
            env=prefect_env(ws, stack) | {"PREFECT_WORKER_QUERY_SECONDS": "2", "CDM_WORKSPACES": str(ws.root)})
        stack.write(ws)
    except BaseException:
        down(ws)
        raise
    return stack


def prefect_env(ws: Workspace, stack: Stack) -> dict[str, str]:
    """Environment of the stack's Prefect server, its worker and its CLI: the client environment, the Prefect home,
    and the auth string the server demands of every API request (its /health excepted)."""
    home = stack_dir(ws) / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    return {**client_env(ws, stack), "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1", "PREFECT_SERVER_API_AUTH_STRING": credentials(ws)["prefect_auth"]}


def mlflow_auth_config(ws: Workspace, folder: Path | None = None) -> Path:
    """MLflow's basic-auth configuration (0600) in `folder` (the stack's by default; `cdm ui` has its own): its
    user store beside it, the generated admin (the one user cdm's clients are), no permission for anyone else."""
    c = credentials(ws)
    folder = folder or stack_dir(ws)
    return atomic_write(folder / "mlflow-auth.ini", "\n".join([
        "[mlflow]", "default_permission = NO_PERMISSIONS",
        f"database_uri = sqlite:///{folder / 'mlflow-auth.db'}",
        f"admin_username = {c['mlflow_user']}", f"admin_password = {c['mlflow_password']}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", ""]))


def _prefect_cli(ws: Workspace, stack: Stack, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True,
                          env={**os.environ, **prefect_env(ws, stack)})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise WorkspaceError(f"stack: prefect {' '.join(args[:2])} failed: {tail[-1] if tail else proc.returncode}")


def _ensure_bucket(ws: Workspace, stack: Stack, bucket: str) -> None:
    from botocore.exceptions import ClientError

    s3 = s3_client(ws, stack)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)


def s3_client(ws: Workspace, stack: Stack, config=None):
    """A boto3 S3 client of the stack's S3 (its generated keys for moto)."""
    import boto3

    env = s3_env(ws, stack)
    return boto3.client("s3", endpoint_url=stack.s3_endpoint_url, aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"), region_name="us-east-1",
                        config=config)


def _take_snapshot(ws: Workspace, stack: Stack) -> None:
    """moto's objects to `.cdm/stack/s3-snapshot/<bucket>/<key>` before it stops (it keeps them in memory)."""
    s3, root = s3_client(ws, stack), stack_dir(ws) / "s3-snapshot"
    for bucket in (b["Name"] for b in s3.list_buckets()["Buckets"]):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                path = root / bucket / obj["Key"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
        (root / bucket).mkdir(parents=True, exist_ok=True)


def _restore_snapshot(ws: Workspace, stack: Stack) -> None:
    """Put the snapshot back into a fresh moto, then delete it: the objects live in one place at a time."""
    root = stack_dir(ws) / "s3-snapshot"
    if not root.is_dir():
        return
    s3 = s3_client(ws, stack)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        _ensure_bucket(ws, stack, folder.name)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            s3.put_object(Bucket=folder.name, Key=path.relative_to(folder).as_posix(), Body=path.read_bytes())
    shutil.rmtree(root)


def down(ws: Workspace) -> dict:
    """Stop every process of the stack (worker first, PostgreSQL last). Returns what was stopped."""
    stack = Stack.read(ws)
    stopped = []
    if stack is not None and stack.pids.get("s3") and alive(stack.pids["s3"]):
        _take_snapshot(ws, stack)
    s3_keys_path(ws).unlink(missing_ok=True)  # a new server makes a new key
    if stack is not None:
        for name in ("worker", "prefect", "mlflow", "s3"):
            pid = stack.pids.get(name)
            if pid and alive(pid):
                _stop(pid)
                stopped.append(name)
    if (stack_dir(ws) / "pg" / "postmaster.pid").is_file():
        stop_postgres(ws)
        stopped.append("postgres")
    if stack is not None:
        stack.started, stack.pids = False, {}
        stack.write(ws)
    return {"stopped": stopped}


def active(ws: Workspace) -> Stack | None:
    """The stack commands use: `.cdm/stack/stack.json` of a stack that is up, else None."""
    stack = Stack.read(ws)
    return stack if stack is not None and stack.started else None
