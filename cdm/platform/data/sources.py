"""Reading an owner's source — a local folder or `s3://bucket/prefix` — as a flat list of files, safely.

Nothing is followed outside the source: symlinks that resolve outside it, absolute names and `..` components are
reported as such, not read. Files over the size bound are not read either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.fileio import split_s3


class SourceError(WorkspaceError):
    """The source as a whole cannot be read, and retrying will not help (missing folder or bucket, no access).
    Messages never repeat the source's path or URL (it may name the owner, and a flow's failure message is stored
    by Prefect); the command that knows the source prefixes it."""


class SourceUnavailable(OSError):
    """The source did not answer (connection dropped, timeout, 5xx, throttling) after the client's own retries:
    worth retrying later. The ingestion task retries on it."""


# S3 error codes that say "try again", not "you may not" or "it does not exist".
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                   "ThrottlingException", "RequestTimeTooSkewed", "500", "502", "503", "504"}


@dataclass
class SourceFile:
    path: str  # relative to the source, POSIX separators, as found
    data: bytes | None  # None when not read (see `problem`)
    size: int
    problem: str | None = None  # why it was not read: escaping symlink, unsafe path, too large, unreadable


def _unsafe_path(rel: str) -> str | None:
    p = PurePosixPath(rel)
    if rel.startswith("/") or p.is_absolute():
        return "absolute path"
    if any(part in ("..", "") for part in rel.split("/")):
        return "path traversal ('..' or empty component)"
    return None


def list_folder(root: str | Path, max_bytes: int) -> list[SourceFile]:
    root = Path(root)
    if not root.is_dir():
        raise SourceError("source folder not found")
    real_root = root.resolve()
    files: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        # Symlinked folders are not walked into; report them like files.
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                filenames.append(name)
        dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
        for name in sorted(filenames):
            full = here / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(real_root):
                    files.append(SourceFile(rel, None, 0, "symlink pointing outside the source"))
                    continue
                if not target.is_file():
                    files.append(SourceFile(rel, None, 0, "symlink to a folder or a missing file"))
                    continue
            try:
                size = full.stat().st_size
                if size > max_bytes:
                    files.append(SourceFile(rel, None, size, f"file larger than {max_bytes} bytes"))
                    continue
                files.append(SourceFile(rel, full.read_bytes(), size))
            except OSError as e:
                files.append(SourceFile(rel, None, 0, f"unreadable: {e.strerror or type(e).__name__}"))
    return files


def parse_s3_url(url: str) -> tuple[str, str]:
    try:
        return split_s3(url)
    except ValueError:  # its message repeats the URL, which may name the owner: not for logs
        raise SourceError("not an s3://bucket/prefix URL") from None


def list_s3(url: str, client, max_bytes: int) -> list[SourceFile]:
    """List and read `s3://bucket/prefix` through a boto3 client."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(url)
    files: list[SourceFile] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        objects = [o for page in pages for o in page.get("Contents", [])]
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            raise SourceError("the bucket does not exist") from None
        if code in TRANSIENT_CODES:
            raise SourceUnavailable(f"S3 answered {code}") from None
        raise SourceError(f"cannot list the source ({code or type(e).__name__})") from None
    except BotoCoreError as e:  # connection refused or dropped, timeouts: the network, not the request
        raise SourceUnavailable(f"cannot reach S3 ({type(e).__name__})") from None
    for o in sorted(objects, key=lambda o: o["Key"]):
        key = o["Key"]
        if key.endswith("/"):
            continue
        rel = key[len(prefix) + 1:] if prefix else key
        if problem := _unsafe_path(rel):
            files.append(SourceFile(rel, None, o["Size"], problem))
        elif o["Size"] > max_bytes:
            files.append(SourceFile(rel, None, o["Size"], f"file larger than {max_bytes} bytes"))
        else:
            try:
                data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                files.append(SourceFile(rel, data, len(data)))
            except BotoCoreError as e:
                raise SourceUnavailable(f"reading {rel} failed ({type(e).__name__})") from None
            except ClientError as e:
                if e.response.get("Error", {}).get("Code", "") in TRANSIENT_CODES:
                    raise SourceUnavailable(f"reading {rel} failed ({type(e).__name__})") from None
                files.append(SourceFile(rel, None, o["Size"], f"unreadable object ({type(e).__name__})"))
    return files
