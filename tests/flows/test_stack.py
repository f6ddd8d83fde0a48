"""The whole story against the production stack (`cdm stack up`): PostgreSQL, an S3 API server, the MLflow tracking
server on PostgreSQL with artifacts in S3, a Prefect server on PostgreSQL, a worker on a process work pool.

Every step is a real `cdm` command in its own process, as a user runs them: ingest (one owner from the stack's S3)
→ train on a Dask cluster of worker processes → compose → the owner revokes by event → the worker (not
`serve`) runs the unlearning flow → purge → verification that asks the MLflow server, dumps both PostgreSQL
databases, reads the cluster's files and the bucket → re-evaluation → 16 samples from the production pyfunc the
tracking server serves → `cdm stack down`. That story runs in `make test-slow`; `make test` runs a smoke test
of the same stack (up, one ingestion from its S3, authentication, down).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cdm.platform.create import init_workspace

CDM = [sys.executable, "-m", "flows.cli"]
REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    """This session's environment without the test S3 server's endpoint: the stack brings its own."""
    return {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                                                              "PREFECT_API_URL", "PREFECT_HOME")}


TIMINGS: dict[str, float] = {}  # seconds per command, printed by the story (where the test's time goes)


def cdm(*args: str, timeout: float = 600) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([*CDM, *args, "--json"], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env())
    assert proc.returncode == 0, f"cdm {' '.join(args)}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    TIMINGS[" ".join(a for a in args[:2] if not a.startswith(("/", "s3:")))] = round(time.perf_counter() - started, 1)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def smoke(small_params, digit_owners):
    """`make test`'s run: stack up, one owner ingested from the stack's S3, the unauthenticated requests, down."""
    yield from run_stack(small_params, digit_owners, full=False)


@pytest.fixture(scope="module")
def story(small_params, digit_owners):
    """`make test-slow`'s run: the whole story of the module docstring."""
    yield from run_stack(small_params, digit_owners, full=True)


@pytest.fixture(params=["smoke", pytest.param("story", marks=pytest.mark.slow)])
def stack_run(request):
    """What both runs show (the stack's services, its authentication, its shutdown), checked on each."""
    return request.getfixturevalue(request.param)


def run_stack(small_params, digit_owners, full: bool):
    from cdm.platform.stack.services import Stack, s3_client
    from tests.flows.test_pipeline import upload

    # PostgreSQL runs as the `postgres` user when we are root: the workspace must be reachable by it.
    tmp = Path(tempfile.mkdtemp(prefix="cdm-stack-"))
    tmp.chmod(0o755)
    p = small_params()
    p.train.task_runner, p.train.max_workers, p.train.min_shard_samples = "dask", 2, 0
    ws = init_workspace(tmp / "ws", params=p)
    sources = digit_owners(tmp / "sources", None)
    out: dict = {"ws": ws, "tmp": tmp}
    up = cdm("stack", "up", "--workspace", str(ws.root))
    out["up"] = up
    try:
        stack = Stack.read(ws)
        out["stack"] = stack
        s3 = s3_client(ws, stack)
        s3.create_bucket(Bucket="owners")
        upload(s3, sources["alice"], "owners", "alice")
        out["ingest"] = {"alice": cdm("ingest", "alice", "s3://owners/alice", "--workspace", str(ws.root))}
        out["unauthenticated"] = unauthenticated_requests(stack)
        from cdm.platform.stack.services import s3_keys

        out["s3_keys"] = s3_keys(ws)  # made by the S3 server at its start, removed at `down`
        if full:
            whole_story(out, ws, stack, s3, sources)
    finally:
        out["down"] = cdm("stack", "down", "--workspace", str(ws.root))
        print(f"stack {'story' if full else 'smoke test'}, seconds:", TIMINGS)
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


def whole_story(out: dict, ws, stack, s3, sources) -> None:
    """After one ingestion: a second owner, training on Dask, compose, bob's revocation by event on the work pool,
    the registry and the bucket as they are after it, and a probe of every store for alice's key."""
    from cdm.platform.stack.services import client_env

    out["ingest"]["bob"] = cdm("ingest", "bob", str(sources["bob"]), "--workspace", str(ws.root))
    out["train"] = cdm("train", "--workspace", str(ws.root))
    out["compose"] = cdm("compose", "--workspace", str(ws.root))
    # bob revokes by event: the stack's automation creates a flow run of `on-revocation` on the work pool.
    bob = out["ingest"]["bob"]
    emit = ("from prefect.events import emit_event; import sys; "
            "from cdm.platform.workspace.owner_records import sign_revocation; "
            "emit_event('cdm.owner.revoked', resource={'prefect.resource.id': 'cdm.owner.' + sys.argv[1]}, "
            "payload=sign_revocation(sys.stdin.readline().strip(), sys.argv[1], 'consent withdrawn'))")
    subprocess.run([sys.executable, "-c", emit, bob["owner_key"]], input=bob["token"] + "\n", text=True,
                   check=True, env={**env(), **client_env(ws, stack)}, timeout=120)
    started = time.perf_counter()
    out["revocation"] = wait_for_revocation(ws.root, timeout=600)
    TIMINGS["revocation by event"] = round(time.perf_counter() - started, 1)
    with patched_env(client_env(ws, stack)):  # this test process reads the registry and the API as cdm does
        # The record says `completed` inside the run's last task; the run itself ends a moment later (it
        # leaves its certificate artifact first): wait for it to reach a final state.
        deadline = time.time() + 300
        while True:
            out["flow_runs"] = flow_runs(stack.prefect_api_url)
            if time.time() > deadline or not [r for r in out["flow_runs"] if r["deployment"] == "on-revocation"
                                              and r["state"] in ("Scheduled", "Pending", "Running")]:
                break
            time.sleep(1)
        out["versions"] = registry_versions(stack.mlflow_tracking_uri)
        out["objects"] = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="cdm-mlflow")
                          for o in page.get("Contents", [])]
        probe = sample_and_probe(ws.root, alice_key=out["ingest"]["alice"]["owner_key"])
    out["probe"], out["sample"] = probe["stores"], probe


@contextlib.contextmanager
def patched_env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unauthenticated_requests(stack) -> dict[str, int]:
    """HTTP status of a request without credentials to each API of the control plane (and of the health checks,
    which stay open for probes)."""
    import urllib.error
    import urllib.request

    def status(url: str, data: bytes | None = None) -> int:
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    import boto3
    from botocore.exceptions import ClientError

    def s3_status(**keys) -> int:
        try:
            boto3.client("s3", endpoint_url=stack.s3_endpoint_url, region_name="us-east-1",
                         **keys).list_objects_v2(Bucket="cdm-mlflow")
            return 200
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"]

    return {"s3 list, a stranger's key": s3_status(aws_access_key_id="testing", aws_secret_access_key="testing"),
            "s3 get, unsigned": status(f"{stack.s3_endpoint_url}/cdm-mlflow/artifacts"),
            "s3 moto reset": status(f"{stack.s3_endpoint_url}/moto-api/reset", b""),
            "s3 moto reset-auth": status(f"{stack.s3_endpoint_url}/moto-api/reset-auth", b"inf"),
            "mlflow search": status(f"{stack.mlflow_tracking_uri}/api/2.0/mlflow/registered-models/search"),
            "mlflow health": status(f"{stack.mlflow_tracking_uri}/health"),
            "prefect flows": status(f"{stack.prefect_api_url}/flows/filter", b"{}"),
            "prefect deployment run": status(f"{stack.prefect_api_url}/deployments/filter", b"{}"),
            "prefect health": status(f"{stack.prefect_api_url}/health")}


def wait_for_revocation(root: Path, timeout: float) -> dict:
    from cdm.platform.forgetting.record import all_revocations
    from cdm.platform.workspace.paths import Workspace

    deadline = time.time() + timeout
    while time.time() < deadline:
        records = all_revocations(Workspace(root))
        if records and records[0].completed:
            return json.loads(records[0].model_dump_json())
        time.sleep(2)
    worker_log = (root / ".cdm" / "stack" / "logs" / "worker.log").read_text()[-3000:]
    raise AssertionError(f"the revocation did not complete within {timeout} s; worker log:\n{worker_log}")


def flow_runs(api_url: str) -> list[dict]:
    """Flow runs of the stack's Prefect server: name of the deployment, work pool, state."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: os.environ["PREFECT_API_AUTH_STRING"]}):
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
            names = {d.id: d.name for d in client.read_deployments()}
            return [{"deployment": names.get(r.deployment_id), "work_pool": r.work_pool_name,
                     "state": r.state.name if r.state else None} for r in runs]


def registry_versions(tracking_uri: str) -> list[str]:
    from mlflow import MlflowClient

    return [f"{v.name}/{v.version}" for v in MlflowClient(tracking_uri).search_model_versions()]


def sample_and_probe(root: Path, alice_key: str) -> dict:
    """In a process of its own, as cdm runs: 16 samples from `models:/cdm-composite@production` served by the
    stack's tracking server; and the positive control of the stack's stores: a remaining owner's key, which the
    registry holds in tags, is found in each of them (so that finding nothing of bob means something)."""
    code = ("import json, sys, collections, mlflow; from flows.cli import env_defaults; env_defaults(); "
            "from cdm.platform.workspace.context import Context; from cdm.platform.forgetting.stores import workspace_stores; "
            "from cdm.platform.forgetting.scan import scan, Needles; ctx = Context.load(sys.argv[1]); _ = ctx.client; "
            "out = mlflow.pyfunc.load_model('models:/cdm-composite@production').predict({'n': 16, 'seed': 0}); "
            "r = scan(workspace_stores(ctx), Needles(None, {sys.argv[2]: 'key'}, {})); "
            "print(json.dumps({'stores': collections.Counter(f.store for f in r.findings), "
            "'images': list(out['images'].shape), 'attribution': len(out['attribution'])}))")
    return json.loads(subprocess.run([sys.executable, "-c", code, str(root), alice_key], capture_output=True,
                                     text=True, check=True, env={**env(), **os.environ}, cwd=REPO).stdout)


def test_stack_up_prints_where_each_service_is_and_no_secret(stack_run):
    up = stack_run["up"]
    assert up["mlflow_tracking_uri"].startswith("http://127.0.0.1:")
    assert up["prefect_api_url"].startswith("http://127.0.0.1:") and up["work_pool"] == "cdm"
    assert up["s3_endpoint_url"].startswith("http://127.0.0.1:") and "on-revocation" in up["deployments"]
    secrets = json.loads((stack_run["ws"].root / ".cdm" / "stack" / "credentials.json").read_text())
    secrets |= stack_run["s3_keys"]
    assert not any(secrets[k] in json.dumps(up) for k in ("postgres_password", "aws_access_key_id",
                                                          "aws_secret_access_key", "prefect_auth", "mlflow_password"))
    assert oct((stack_run["ws"].root / ".cdm" / "stack" / "credentials.json").stat().st_mode)[-3:] == "600"


def test_an_owner_is_ingested_from_the_stacks_s3(stack_run):
    alice = stack_run["ingest"]["alice"]
    assert alice["added"] > 0 and alice["token"] and alice["owner_key"] != "alice"


def test_an_unauthenticated_request_to_the_prefect_or_mlflow_api_is_refused(stack_run):
    codes = stack_run["unauthenticated"]
    # The S3 API: a stranger's key, an unsigned request and moto's control endpoints (reset the store, turn the
    # checks off) are refused; the ingestion above, signed with the stack's key, is the positive control.
    assert codes["s3 list, a stranger's key"] == 403 and codes["s3 get, unsigned"] == 403, codes
    assert codes["s3 moto reset"] == 403 and codes["s3 moto reset-auth"] == 403, codes
    assert codes["mlflow search"] == 401 and codes["prefect flows"] == 401 and codes["prefect deployment run"] == 401
    assert codes["mlflow health"] == 200 and codes["prefect health"] == 200  # the positive control: they answer
    ini = stack_run["ws"].root / ".cdm" / "stack" / "mlflow-auth.ini"
    assert oct(ini.stat().st_mode)[-3:] == "600"


@pytest.mark.slow
def test_shards_train_on_dask_workers_against_the_tracking_server(story):
    shards = story["train"]["shards"]
    assert len(shards) == 2 and all(not s["skipped"] for s in shards.values())
    assert len({s["worker"] for s in shards.values()}) == 2  # two worker processes…
    (a0, a1), (b0, b1) = sorted((s["started_at"], s["finished_at"]) for s in shards.values())
    assert b0 < a1  # …training at the same time
    assert story["sample"]["images"][0] == 16 and story["sample"]["attribution"] == 16


@pytest.mark.slow
def test_the_revocation_event_runs_on_the_work_pool_worker(story):
    rev = story["revocation"]
    assert rev["requested_via"] == "event" and rev["completed"]
    runs = [r for r in story["flow_runs"] if r["deployment"] == "on-revocation"]
    assert runs and all(r["work_pool"] == "cdm" and r["state"] == "Completed" for r in runs), story["flow_runs"]


@pytest.mark.slow
def test_the_purge_check_asks_the_server_and_the_bucket_and_finds_nothing(story):
    rev = story["revocation"]
    verify = rev["verify"]
    assert verify["ok"], verify
    scanned = verify["scan"]["scanned"]
    for store in ("MLflow server", "MLflow backend (pg_dump)", "Prefect database (pg_dump)", "PostgreSQL files",
                  "MLflow artifacts"):
        assert scanned.get(store, 0) > 0, (store, scanned)
    assert "MLflow backend" not in scanned and "Prefect database" not in scanned  # the SQLite-file stores
    assert verify["scan"]["unscanned"] == []
    purged = rev["purge"]
    assert purged["versions"] and not set(purged["versions"]) & set(story["versions"])
    assert not any(run in key for run in purged["runs"] for key in story["objects"])
    # The stores have power: alice's key, which her shard's tags carry, is found in each of them.
    for store in ("MLflow server", "MLflow backend (pg_dump)", "PostgreSQL files", "MLflow artifacts"):
        assert story["probe"].get(store, 0) > 0, (store, story["probe"])
    assert rev["reevaluate"]["fid"] > 0 and rev["reevaluate"]["composite_version"]


def test_stack_down_stops_every_process(stack_run):
    stack = stack_run["stack"]
    assert set(stack_run["down"]["stopped"]) >= {"worker", "prefect", "mlflow", "s3", "postgres"}
    from cdm.platform.stack.services import alive

    assert not [name for name, pid in stack.pids.items() if alive(pid)]
    assert not (stack_run["ws"].root / ".cdm" / "stack" / "pg" / "postmaster.pid").exists()
