"""Small file and URL helpers every platform module shares: atomic private writes, and s3:// URLs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes, mode: int = 0o600) -> Path:
    """Write `data` to `path` so that a reader (or a crash) sees the old content or the new, never a part.

    The temporary file is created with `mode` (0600 by default: workspace state is private), in the same folder
    (one file system, so the rename is atomic), fsynced, then renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def create_private(path: str | Path, data: str | bytes) -> bool:
    """Create `path` with mode 0600 and `data` only if it does not exist (O_EXCL: no window in which another
    process or user reads it with wider permissions). Returns whether this call created it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return True


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"). Raises ValueError for anything else."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in the s3:// URL {url!r}")
    return bucket, prefix.strip("/")


def s3_key(prefix: str, key: str) -> str:
    """An object key under a prefix (no leading or doubled slashes)."""
    return "/".join(x for x in (prefix.strip("/"), key.lstrip("/")) if x)
