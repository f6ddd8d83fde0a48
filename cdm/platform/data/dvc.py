"""DVC versioning of `data/`: DVC's own code through its Python API (`dvc.repo.Repo`), and the targeted deletion
of one owner's objects from the cache and the remote (which `dvc gc` cannot do without deleting everyone's
history).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

from cdm.platform.workspace.fileio import s3_key, split_s3


class DvcError(RuntimeError):
    pass


class RemoteError(DvcError):
    """The DVC remote (S3 or a folder) could not be reached or refused a request, after retries."""


def run(workspace: str | Path, *args: str, check: bool = True, env: dict | None = None) -> str:
    """Run `dvc ARGS` in the workspace; returns stdout. Raises DvcError with DVC's message on failure. For the
    rare commands (init, config); ingestion and purges go through `repo`, in this process."""
    full_env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(site_cache_dir(workspace)),
                **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, capture_output=True, text=True,
                          env=full_env)
    if check and proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines()
                 if ln.strip() and not ln.startswith("Having any troubles?")]  # DVC's support footer
        raise DvcError(f"dvc {' '.join(args)} failed: {' '.join(lines)}")
    return proc.stdout


def site_cache_dir(workspace: str | Path) -> Path:
    """DVC's site cache (its index of paths and hashes, which names every owner's files) inside the workspace, not
    in the machine-wide /var/tmp/dvc that no purge of this workspace would see (docs/design.md §5)."""
    return Path(workspace).resolve() / ".cdm" / "dvc-site"


def init(workspace: str | Path, remote_url: str, endpoint_url: str | None = None) -> None:
    run(workspace, "init", "-q")
    # For `dvc` run by hand in the workspace too (cdm's own calls also set DVC_SITE_CACHE_DIR): machine-local config.
    run(workspace, "config", "--local", "core.site_cache_dir", str(site_cache_dir(workspace)))
    run(workspace, "config", "core.autostage", "true")
    run(workspace, "remote", "add", "-d", "storage", remote_url)
    if endpoint_url:
        run(workspace, "remote", "modify", "storage", "endpointurl", endpoint_url)


def remote_config(workspace: str | Path) -> dict:
    """{'url': ..., 'endpointurl': ...} of the default remote (`core.remote`, else the first), read in this process
    through DVC's `Config` (repository, local, global and system files merged; a relative local remote resolved
    against `.dvc/`) — not by starting `dvc` processes, which cost ~1 s each on the revocation path."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(Path(workspace) / ".dvc"))
    except ConfigError as e:
        raise DvcError(f"DVC configuration of {workspace}: {e}") from None
    remotes = config.get("remote", {})
    name = config.get("core", {}).get("remote") or next(iter(remotes), None)
    remote = remotes.get(name, {}) if name else {}
    url = remote.get("url")
    if url and "://" not in url:
        url = str(Path(url).resolve())
    return {"url": url, "endpointurl": remote.get("endpointurl")}


def add_and_push(workspace: str | Path, push: bool = True, retry_delays: Sequence[float] = (1.0, 4.0)) -> str:
    """`dvc add data` (+ `dvc push`); returns the new md5 of data/ recorded in data.dvc."""
    with api_errors("add data"), repo(workspace) as r:
        r.add(str(Path(workspace).resolve() / "data"))
    if push:
        push_with_retries(workspace, retry_delays)
    return data_hash(workspace)


@contextlib.contextmanager
def repo(workspace: str | Path):
    """The workspace's DVC repository, opened in this process through DVC's Python API (`dvc.repo.Repo`): the
    same code the `dvc` command runs, without a new interpreter per call (~1 s each, most of an ingestion's DVC
    time). Its site cache and its cache are the workspace's own (`site_cache_dir`, `cache_dir`), whatever a global
    or system DVC configuration says: the purge looks for the owners' files there and nowhere else."""
    from dvc.repo import Repo

    check_site_cache(workspace)
    quiet_dvc_logging()
    with Repo(str(Path(workspace).resolve()), config={"core": {"site_cache_dir": str(site_cache_dir(workspace))},
                                                      "cache": {"dir": str(cache_dir(workspace).resolve())}}) as r:
        yield r


def quiet_dvc_logging() -> None:
    """`import dvc` gives DVC's loggers console handlers of their own; in this process they would print DVC's
    warnings (which can name `data/owners/<owner id>/…` paths) past cdm's handlers, which redact owner ids. They
    go to cdm's handlers instead, warnings and above."""
    for name in ("dvc", "dvc_objects", "dvc_data"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate, logger.level = True, max(logger.level, logging.WARNING)


def check_site_cache(workspace: str | Path) -> None:
    """DVC prefers the DVC_SITE_CACHE_DIR variable to any configuration: in this process it would index the
    workspace's files in a folder no purge of this workspace sees. Refuse rather than leak."""
    ours = str(site_cache_dir(workspace))
    if os.environ.get("DVC_SITE_CACHE_DIR", ours) != ours:
        raise DvcError(f"DVC_SITE_CACHE_DIR is set to {os.environ['DVC_SITE_CACHE_DIR']}; unset it (cdm keeps "
                       f"DVC's site cache in {ours})")


@contextlib.contextmanager
def api_errors(what: str, storage: bool = False):
    """DVC's exceptions, and the file system's, as one `DvcError` line: what failed and why (the retries and the
    caller's rollback key on it). `storage`: the call talks to the remote, whose client stack (s3fs, aiobotocore,
    aiohttp) raises more than `OSError` (a parser error on a proxy's HTML answer, a truncated payload): every
    `Exception` counts then."""
    from dvc.exceptions import DvcException

    try:
        yield
    except DvcError:
        raise
    except (DvcException, OSError) if not storage else Exception as e:
        cause = f" ({e.__cause__})" if e.__cause__ and str(e.__cause__) not in str(e) else ""
        raise DvcError(f"dvc {what} failed: {type(e).__name__}: {e}{cause}") from e


def push_with_retries(workspace: str | Path, retry_delays: Sequence[float] = (1.0, 4.0)) -> None:
    """`dvc push` (in this process, `repo`), retried (tenacity) after each of `retry_delays` seconds. Safe to
    repeat: objects are content-addressed and DVC uploads only those the remote lacks.

    Raises:
        RemoteError: the last attempt failed too; the message carries DVC's last error.
    """
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_chain, wait_fixed

    check_site_cache(workspace)  # a configuration error: no retry
    delays = list(retry_delays)

    def warn(state) -> None:
        logging.getLogger(__name__).warning("dvc push failed (attempt %d of %d), retrying in %g s: %s",
                                            state.attempt_number, len(delays) + 1, state.next_action.sleep,
                                            str(state.outcome.exception())[-300:])

    retrying = Retrying(stop=stop_after_attempt(len(delays) + 1), reraise=True, before_sleep=warn,
                        wait=wait_chain(*[wait_fixed(d) for d in delays]) if delays else wait_fixed(0),
                        retry=retry_if_exception_type(DvcError))
    try:
        for attempt in retrying:
            with attempt, api_errors("push", storage=True), repo(workspace) as r:
                r.push()
    except DvcError as e:
        raise RemoteError(f"the DVC remote did not accept the push after {len(delays) + 1} attempts "
                          f"(retried after {', '.join(f'{d:g}' for d in delays)} s): {e}") from e


def data_hash(workspace: str | Path) -> str | None:
    import yaml

    path = Path(workspace) / "data.dvc"
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - DVC's content address, not a security hash


def _object_key(md5: str) -> str:
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def cache_dir(workspace: str | Path) -> Path:
    return Path(workspace) / ".dvc" / "cache"


def read_dir_object(workspace: str | Path, dir_id: str) -> list[dict]:
    """The listing [{md5, relpath}] of a cached `.dir` object."""
    return json.loads((cache_dir(workspace) / _object_key(dir_id)).read_text())


def dir_objects(workspace: str | Path, prefix: str | None = None, md5s: set[str] | None = None) -> list[str]:
    """Cached directory listings (`.dir` object ids) that list a path under `prefix` or any of `md5s`."""
    found = []
    root = cache_dir(workspace) / "files" / "md5"
    for f in root.glob("*/*.dir") if root.exists() else []:
        try:
            listing = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if any((prefix is not None and e.get("relpath", "").startswith(prefix)) or (md5s and e.get("md5") in md5s)
               for e in listing):
            found.append(f.parent.name + f.name)
    return sorted(found)


def delete_objects(workspace: str | Path, object_ids: Iterable[str], s3_client=None) -> dict:
    """Delete content-addressed objects (md5, or md5.dir) from the cache and the default remote.

    Returns:
        {"cache": [ids deleted], "remote": [ids deleted]}.
    """
    ids = sorted(set(object_ids))
    deleted = {"cache": [], "remote": []}
    # The remote first: the ids come from the caller's recorded intent, but a crash after the cache and before the
    # remote would otherwise leave remote copies whose ids no local state names any more.
    url = remote_config(workspace)["url"]
    if not url:
        pass
    elif url.startswith("s3://"):
        bucket, prefix = split_s3(url)
        for oid in ids:
            key = s3_key(prefix, _object_key(oid))
            if s3_delete_every_version(s3_client, bucket, key):
                deleted["remote"].append(oid)
    else:
        for oid in ids:
            p = Path(url) / _object_key(oid)
            if p.exists():
                p.unlink()
                deleted["remote"].append(oid)
    for oid in ids:
        p = cache_dir(workspace) / _object_key(oid)
        if p.exists():
            p.unlink()
            deleted["cache"].append(oid)
    return deleted


def s3_versioned(client, bucket: str) -> bool:
    """Whether the bucket keeps versions (versioning enabled or suspended: old versions may be there)."""
    return bool(client.get_bucket_versioning(Bucket=bucket).get("Status"))


def s3_versions(client, bucket: str, prefix: str) -> Iterable[tuple[str, str | None]]:
    """(key, version id) of every object under `prefix`: on a versioned bucket every version and delete marker
    (a plain listing shows the current ones only, and a plain delete only adds a marker), else (key, None)."""
    if not s3_versioned(client, bucket):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                yield o["Key"], None
        return
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Versions", []) + page.get("DeleteMarkers", []):
            yield o["Key"], o["VersionId"]


def s3_delete_every_version(client, bucket: str, key: str) -> bool:
    """Delete the object `key` for good: on a versioned bucket every version and delete marker of it, by version
    id. Returns whether anything was there."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if not s3_versioned(client, bucket):
            if not _s3_exists(client, bucket, key):
                return False
            client.delete_object(Bucket=bucket, Key=key)
            return True
        found = [(k, v) for k, v in s3_versions(client, bucket, key) if k == key]
        for k, v in found:
            client.delete_object(Bucket=bucket, Key=k, VersionId=v)
        return bool(found)
    except (ClientError, BotoCoreError) as e:
        raise RemoteError(f"s3://{bucket}/{key}: {e}") from e


def _s3_exists(client, bucket: str, key: str) -> bool:
    """Whether the object exists. Only a 404 means absent: any other error (403, 5xx, no connection) is raised,
    so that a purge never reports an object it could not see as deleted."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise RemoteError(f"s3://{bucket}/{key}: {e}") from e
    except BotoCoreError as e:
        raise RemoteError(f"s3://{bucket}/{key}: {e}") from e


def list_objects(workspace: str | Path, s3_client=None) -> dict[str, set[str]]:
    """Object ids present in the cache and in the remote (for verification by listing)."""
    def ids_under(keys: Iterable[str]) -> set[str]:
        out = set()
        for k in keys:
            parts = k.split("/")
            if len(parts) >= 2 and len(parts[-2]) == 2:
                out.add(parts[-2] + parts[-1])
        return out

    cache_root = cache_dir(workspace) / "files" / "md5"
    cache = ids_under(str(p.relative_to(cache_root)) for p in cache_root.glob("*/*")) if cache_root.exists() else set()
    remote = set()
    url = remote_config(workspace)["url"]
    if url and url.startswith("s3://"):
        bucket, prefix = split_s3(url)
        remote = ids_under(k for k, _ in s3_versions(s3_client, bucket, prefix))  # old versions too
    elif url and Path(url).exists():
        root = Path(url) / "files" / "md5"
        remote = ids_under(str(p.relative_to(root)) for p in root.glob("*/*")) if root.exists() else set()
    return {"cache": cache, "remote": remote}
