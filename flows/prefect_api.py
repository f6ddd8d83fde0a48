"""A Prefect API that is already up: one local server per workspace, started by the first command that needs
Prefect and reused by the next ones (docs/design.md §3, "Command speed").

Without it every command pays for Prefect's ephemeral server (a uvicorn subprocess, ~8 s on 2 cores) before its
first flow run. Here the first command starts `python -m flows.prefect_api ROOT PORT IDLE` detached: Prefect's
app (`prefect.server.api.server:create_app`, the one the ephemeral server and `prefect server start` run) under
uvicorn on loopback, with the workspace's Prefect home (`.cdm/prefect`, so the same SQLite database the scan and
the purge read) and its auth string (every request but /health must carry it). `.cdm/prefect/api.json` (0600)
says where it is; a command uses it only when the recorded process is this user's, runs `flows.prefect_api` for
this workspace, holds the listening socket of the recorded port itself (a process squatting the port after a crash
gets no request and no auth string), and answers /health; otherwise it stops what is left and starts anew, under a
file lock so two commands never start two. The app runs in Prefect's ephemeral mode (`create_app(ephemeral=True)`:
the same background services as the per-process server it replaces), its output goes nowhere (nothing it might
print about a run lands in a file the revocation's scan would then find), and its environment carries no owner
token.

The server stops itself once idle: no request for `idle` seconds and no live command registered in
`.cdm/prefect/clients/` (a command registers its pid while it runs, so a long training step with no API traffic
keeps it up; a command killed with -9 leaves a file whose pid is dead, which does not). It also stops when
`api.json` names another process (it was replaced). `CDM_PREFECT_API=ephemeral` restores one ephemeral server per
command (the test suite's default: its workspaces are temporary); a set PREFECT_API_URL (a stack, `cdm serve`, a
server of your own) always wins.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

OWN_API = "CDM_WORKSPACE_PREFECT_API"  # set beside PREFECT_API_URL when it is the workspace's own server
IDLE_SECONDS = 600  # a server nobody used for 10 minutes stops (CDM_PREFECT_IDLE_SECONDS overrides)
START_TIMEOUT = 120.0  # seconds a new server may take to answer /health (a busy 2-core machine: ~5-10 s)


@dataclass(frozen=True)
class ApiState:
    pid: int
    port: int
    uid: int
    started: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def home(root: Path) -> Path:
    return root / ".cdm" / "prefect"


def wanted() -> bool:
    """Whether commands use the workspace's persistent API (not when the user set an API or asked for ephemeral)."""
    return not os.environ.get("PREFECT_API_URL") and os.environ.get("CDM_PREFECT_API", "persistent") != "ephemeral"


def ensure(root: Path, auth: str) -> dict[str, str]:
    """The environment a command sets to use the workspace's running API, starting (or replacing) it if needed;
    registers this process as a client until it exits."""
    from filelock import FileLock

    h = home(root)
    h.mkdir(parents=True, exist_ok=True)
    with FileLock(str(h / "api.lock"), timeout=2 * START_TIMEOUT):
        register_client(root)  # first: a server deciding, under this lock, whether it is idle sees this command
        state = read_state(root)
        # A busy machine can make one health check slow: three tries before a live server is called hung.
        if state is None or not any(healthy(state, root, timeout=t) for t in (2.0, 5.0, 10.0)):
            if state is not None:
                stop(state, root)
            state = start(root, auth)
    return {"PREFECT_API_URL": state.url, "PREFECT_API_AUTH_STRING": auth, OWN_API: state.url}


def read_state(root: Path) -> ApiState | None:
    """The recorded server, if the record is ours (owned by this user; another user's file is never trusted)."""
    path = home(root) / "api.json"
    try:
        if path.stat().st_uid != os.getuid():
            return None
        return ApiState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def healthy(state: ApiState, root: Path, timeout: float = 2.0) -> bool:
    """The recorded server itself: this user's process, running this workspace's server, listening on the
    recorded port, and answering /health."""
    if state.uid != os.getuid() or not is_server(state.pid, root) or not listens(state.pid, state.port):
        return False
    try:
        with urllib.request.urlopen(f"{state.url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def alive(pid: int) -> bool:
    """A live process of this user (a zombie, exited but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's
        return False
    proc = Path(f"/proc/{pid}")
    try:
        if proc.stat().st_uid != os.getuid():
            return False
        return (proc / "stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def is_server(pid: int, root: Path) -> bool:
    """Whether `pid` is this user's `python -m flows.prefect_api ROOT ...` for `root` (never some other process
    that reused a recorded pid after a crash or a reboot)."""
    if not alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"flows.prefect_api" in args and str(root).encode() in args


def listens(pid: int, port: int) -> bool:
    """Whether `pid` holds the socket listening on 127.0.0.1:`port` (Linux: /proc/net/tcp and the process's fds)."""
    inodes = set()
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            if f[1] == f"0100007F:{port:04X}" and f[3] == "0A":  # local address 127.0.0.1:port, state LISTEN
                inodes.add(f[9])
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def stop(state: ApiState, root: Path, wait: float = 10.0) -> None:
    """Stop a recorded server (a hung one): SIGTERM, then SIGKILL — only when the pid is that server."""
    if not is_server(state.pid, root):
        return
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.time() + wait
    while time.time() < deadline and alive(state.pid):
        time.sleep(0.1)
    if is_server(state.pid, root):
        os.kill(state.pid, signal.SIGKILL)


def start(root: Path, auth: str) -> ApiState:
    from cdm.platform.workspace.fileio import atomic_write

    h = home(root)
    port = free_port()
    idle = os.environ.get("CDM_PREFECT_IDLE_SECONDS", str(IDLE_SECONDS))
    # Only what the server needs: no owner token, no cloud credentials, no client-side Prefect API settings.
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
           or (k.startswith("PREFECT_") and not k.startswith("PREFECT_API_"))}
    env.update({"PREFECT_HOME": str(h), "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_UI_ENABLED": "0",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    # cwd: the 0700 Prefect home, not the user's folder (whose modules would come first on sys.path).
    proc = subprocess.Popen([sys.executable, "-m", "flows.prefect_api", str(root), str(port), idle], cwd=h,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # outlives the command; not in its process group
    state = ApiState(pid=proc.pid, port=port, uid=os.getuid(), started=time.time())
    atomic_write(h / "api.json", json.dumps(asdict(state)))
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the workspace's Prefect API exited at start (code {proc.returncode}); run "
                               f"`{sys.executable} -m flows.prefect_api {root} {port} 60` to see why")
        if healthy(state, root, timeout=1.0):
            return state
        time.sleep(0.1)
    stop(state, root)
    raise RuntimeError(f"the workspace's Prefect API did not answer within {START_TIMEOUT:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_client(root: Path) -> None:
    """This process uses the server until it exits (the file goes at exit; a dead pid's file does not count)."""
    clients = home(root) / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    mine = clients / str(os.getpid())
    mine.touch()
    atexit.register(lambda: mine.unlink(missing_ok=True))


def live_clients(root: Path) -> int:
    n = 0
    for f in (home(root) / "clients").glob("*"):
        if f.name.isdigit() and alive(int(f.name)):
            n += 1
        else:
            f.unlink(missing_ok=True)
    return n


# -- the server process ------------------------------------------------------------------------------------------
def main(root: Path, port: int, idle: float) -> None:
    """Run Prefect's API for `root` until it is idle, replaced, or told to stop."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True)  # the per-process server's services, not a full `prefect server start`
    last = [time.monotonic()]

    async def touched(scope, receive, send):  # every request (but the lifespan) counts as activity
        if scope["type"] != "lifespan":
            last[0] = time.monotonic()
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(touched, host="127.0.0.1", port=port, log_level="error",
                                           access_log=False, lifespan="on"))

    def watchdog() -> None:
        from filelock import FileLock, Timeout

        while not server.should_exit:
            time.sleep(min(5.0, idle / 4))
            state = read_state(root)
            if state is None or state.pid != os.getpid():  # replaced, or its record removed
                server.should_exit = True
            elif time.monotonic() - last[0] > idle:
                try:  # decided under the commands' lock: none is between its health check and its registration
                    with FileLock(str(home(root) / "api.lock"), timeout=0):
                        if live_clients(root) == 0:
                            (home(root) / "api.json").unlink(missing_ok=True)  # the next command starts anew
                            server.should_exit = True
                except Timeout:
                    pass

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        server.run()
    finally:
        state = read_state(root)
        if state is not None and state.pid == os.getpid():
            (home(root) / "api.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
