"""docker-compose.yaml, the production stack, checked statically (the CI machines have no Docker engine): it must
authenticate as `cdm stack up` does. One test per service that a client without credentials is refused (MLflow's
basic-auth app, the Prefect server's auth string, the Dask scheduler's mutual TLS), the worker's workspace
allow-list, no secret on a command line or inline in the file, every port on ${CDM_BIND:-127.0.0.1}.

Each check takes the parsed compose document, so it can be run by hand on another version of the file."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yaml"
EXAMPLE = ROOT / "stack.env.example"
BIND = "${CDM_BIND:-127.0.0.1}"
# The only variables the file may interpolate: where it listens, where the secrets are, MLflow's Host allow-list.
NOT_SECRET = {"CDM_BIND", "CDM_SECRETS", "CDM_MLFLOW_ALLOWED_HOSTS"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|TOKEN|(^|_)KEY$")
URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
INTERPOLATION = re.compile(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)")  # $$ is compose's escape: the container's shell
SECRET_PATH = "/run/secrets/"


def load(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def service(doc: dict, name: str) -> dict:
    assert name in doc["services"], f"no service {name!r}"
    return doc["services"][name]


def command(svc: dict) -> str:
    cmd = svc.get("command") or ""
    return " ".join(cmd) if isinstance(cmd, list) else " ".join(cmd.split())


def argv(svc: dict) -> list[str]:
    return shlex.split(command(svc))


def option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def env_files(svc: dict) -> list[str]:
    files = svc.get("env_file") or []
    files = [files] if isinstance(files, (str, dict)) else files
    return [f["path"] if isinstance(f, dict) else f for f in files]


def default_path(value: str) -> Path:
    """A path of the file with compose's defaults filled in (${VAR:-default} -> default), from the project folder."""
    return (ROOT / re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)).resolve()


def example_names(path: Path = EXAMPLE) -> dict[str, str]:
    assert path.is_file(), f"{path.name} missing: the names of the secrets the services read"
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def from_stack_env(doc: dict, name: str, *variables: str) -> None:
    """`name` reads each variable from the stack's env file, not from this file."""
    svc = service(doc, name)
    assert any(Path(f).name == "stack.env" for f in env_files(svc)), f"{name}: no env_file stack.env"
    names = example_names()
    for var in variables:
        assert var not in environment(svc), f"{name}: {var} inline in docker-compose.yaml"
        assert var in names, f"stack.env.example does not name {var}"


def strings(node, where: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


# -- the checks ------------------------------------------------------------------------------------------------

def check_mlflow_basic_auth(doc: dict) -> None:
    svc = service(doc, "mlflow")
    args = argv(svc)
    assert args[:2] == ["mlflow", "server"], args
    assert option(args, "--app-name") == "basic-auth", "MLflow without --app-name basic-auth"
    assert option(args, "--backend-store-uri") is None, "the backend store URI on MLflow's command line"
    env = environment(svc)
    uri = env.get("MLFLOW_BACKEND_STORE_URI", "")
    assert uri.startswith("postgresql"), "MLflow's backend store not passed by MLFLOW_BACKEND_STORE_URI"
    assert not URL_WITH_PASSWORD.search(uri) and "${" not in uri, "a password in MLflow's backend store URI"
    # The auth config: mounted read-only from mlflow/, nobody but the admin has any permission, no secret in it.
    config_path = env.get("MLFLOW_AUTH_CONFIG_PATH")
    assert config_path, "MLflow without MLFLOW_AUTH_CONFIG_PATH"
    mounts = [v for v in svc.get("volumes") or [] if isinstance(v, str) and v.split(":")[1:2] == [config_path]]
    assert mounts and mounts[0].endswith(":ro"), f"{config_path} not mounted read-only"
    ini = ROOT / mounts[0].split(":")[0]
    assert ini.parent == ROOT / "mlflow", ini
    cfg = configparser.ConfigParser()
    cfg.read(ini)
    assert cfg["mlflow"]["default_permission"] == "NO_PERMISSIONS"  # as cdm/platform/stack/services.py's mlflow_auth_config
    assert "admin_password" not in cfg["mlflow"], "the admin's password in the auth config"
    assert not URL_WITH_PASSWORD.search(cfg["mlflow"]["database_uri"]), "a password in the user store's URI"
    from_stack_env(doc, "mlflow", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD")


def check_prefect_auth(doc: dict) -> None:
    svc = service(doc, "prefect")
    assert "prefect server start" in command(svc)
    from_stack_env(doc, "prefect", "PREFECT_SERVER_API_AUTH_STRING", "PGPASSWORD")
    # Prefect turns auth off when the string is unset: the container refuses to start the server without one.
    assert 'test -n "$$PREFECT_SERVER_API_AUTH_STRING"' in command(svc), "the server may start without auth"
    db = environment(svc).get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    assert not URL_WITH_PASSWORD.search(db) and "${" not in db, "a password in Prefect's database URL"


def check_clients_authenticate(doc: dict) -> None:
    """Every service that talks to MLflow or Prefect has their credentials, from stack.env."""
    clients = [n for n, s in doc["services"].items()
               if {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"} & set(environment(s))]
    assert {"worker", "gpu-worker"} <= set(clients), clients
    for name in clients:
        from_stack_env(doc, name, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")


def _tls_files(doc: dict, name: str, args: list[str], *flags: str) -> None:
    svc = service(doc, name)
    for flag in flags:
        path = option(args, flag)
        assert path and path.startswith(SECRET_PATH), f"{name}: {flag} {path} not a mounted secret"
        secret = path[len(SECRET_PATH):]
        assert secret in (svc.get("secrets") or []), f"{name}: secret {secret} not given to the service"
        assert "file" in doc.get("secrets", {}).get(secret, {}), f"secret {secret} has no file"


def check_dask_tls(doc: dict) -> None:
    sched = service(doc, "dask-scheduler")
    args = argv(sched)
    assert args[:2] == ["dask", "scheduler"], args
    assert option(args, "--protocol") == "tls" or (option(args, "--host") or "").startswith("tls://"), \
        "the scheduler does not listen on tls://"
    _tls_files(doc, "dask-scheduler", args, "--tls-ca-file", "--tls-cert", "--tls-key")
    assert (option(args, "--dashboard-address") or "").startswith("127.0.0.1:"), "the scheduler's HTTP server is open"
    worker = service(doc, "gpu-worker")
    wargs = argv(worker)
    assert wargs[:2] == ["dask", "worker"] and wargs[2].startswith("tls://dask-scheduler:"), wargs
    _tls_files(doc, "gpu-worker", wargs, "--tls-ca-file", "--tls-cert", "--tls-key")
    assert (option(wargs, "--dashboard-address") or "").startswith("127.0.0.1:"), "the worker's HTTP server is open"
    # The GPU worker as before: one GPU reserved, one `GPU` resource offered.
    assert option(wargs, "--resources") == "GPU=1"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("dask-scheduler", "gpu-worker", "worker"):
        env = environment(service(doc, name))
        assert env.get("DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION") == "true", f"{name}: encryption not required"
    for name in ("worker", "gpu-worker"):  # Dask clients: the CA and the client certificate, as secrets
        svc, env = service(doc, name), environment(service(doc, name))
        for var in ("TLS__CA_FILE", "TLS__CLIENT__CERT", "TLS__CLIENT__KEY"):
            path = env.get(f"DASK_DISTRIBUTED__COMM__{var}", "")
            assert path.startswith(SECRET_PATH) and path[len(SECRET_PATH):] in (svc.get("secrets") or []), \
                f"{name}: DASK_DISTRIBUTED__COMM__{var} not a mounted secret"
    for name, svc in doc["services"].items():
        assert "tcp://" not in command(svc), f"{name}: a tcp:// Dask address"


def check_worker_allow_list(doc: dict) -> None:
    from flows import SERVED_WORKSPACES  # the variable the flows read (also what `cdm stack up` sets)

    assert SERVED_WORKSPACES == "CDM_WORKSPACES"
    svc = service(doc, "worker")
    assert "prefect worker start" in command(svc)
    from_stack_env(doc, "worker", SERVED_WORKSPACES)
    # An empty allow-list allows every workspace (flows.load_served): the container refuses to start the worker.
    assert f'test -n "$${SERVED_WORKSPACES}"' in command(svc), "the worker may start without its allow-list"


def check_no_secret_on_command_lines(doc: dict) -> None:
    for name, svc in doc["services"].items():
        cmd = command(svc)
        assert "${" not in cmd, f"{name}: compose interpolates into its command: {cmd}"
        assert "postgresql" not in cmd and not URL_WITH_PASSWORD.search(cmd), f"{name}: a database URI in {cmd}"
        assert not re.search(r"--\S*(password|secret|token|auth)", cmd, re.I), f"{name}: a secret option: {cmd}"


def check_no_inline_secrets(doc: dict) -> None:
    for where, value in strings(doc):
        for var in INTERPOLATION.findall(value):
            assert var in NOT_SECRET, f"{where}: interpolates ${{{var}}}: secrets come from the env files"
        assert not URL_WITH_PASSWORD.search(value), f"{where}: a URL with a password"
    for name, svc in doc["services"].items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key):
                assert value.startswith(SECRET_PATH), f"{name}: {key} inline in docker-compose.yaml"


def check_secrets_outside_build_context(doc: dict) -> None:
    """The build copies the project folder into the image: the env files and certificates live elsewhere."""
    files = [f for s in doc["services"].values() for f in env_files(s)]
    files += [s["file"] for s in (doc.get("secrets") or {}).values() if "file" in s]
    assert files, "no env file and no secret file"
    for f in files:
        assert not default_path(f).is_relative_to(ROOT), f"{f} lies in the build context (copied into the image)"


def check_ports_loopback(doc: dict) -> None:
    for name, svc in doc["services"].items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                assert port.get("host_ip") == BIND, f"{name}: {port}"
            else:
                assert str(port).startswith(BIND + ":"), f"{name}: {port} not bound to {BIND}"


# -- the tests -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def doc() -> dict:
    return load()


def test_compose_file_is_valid_yaml_with_the_stack(doc):
    assert {"postgres", "s3", "mlflow", "prefect", "worker", "dask-scheduler", "gpu-worker"} <= set(doc["services"])
    assert {"postgres", "s3", "workspaces"} <= set(doc["volumes"])


def test_mlflow_refuses_anonymous_requests(doc):
    check_mlflow_basic_auth(doc)


def test_prefect_refuses_requests_without_the_auth_string(doc):
    check_prefect_auth(doc)


def test_clients_carry_the_credentials(doc):
    check_clients_authenticate(doc)


def test_dask_scheduler_refuses_peers_without_a_certificate_of_the_stack(doc):
    check_dask_tls(doc)


def test_worker_serves_only_its_workspaces(doc):
    check_worker_allow_list(doc)


def test_no_secret_on_a_command_line(doc):
    check_no_secret_on_command_lines(doc)


def test_no_secret_inline(doc):
    check_no_inline_secrets(doc)


def test_secrets_stay_out_of_the_image(doc):
    check_secrets_outside_build_context(doc)


def test_ports_bind_to_cdm_bind_or_loopback(doc):
    check_ports_loopback(doc)


def test_example_env_file_names_secrets_without_values():
    names = example_names()
    secrets = {k: v for k, v in names.items() if not k.endswith("_USERNAME")}
    assert all(v == "" for v in secrets.values()), "stack.env.example holds values"
    header = "".join(line for line in COMPOSE.read_text().splitlines() if line.startswith("#"))
    for name in names:  # the header's recipe writes every name
        assert f"{name}=" in header, f"the header does not generate {name}"
