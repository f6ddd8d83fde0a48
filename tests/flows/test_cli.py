"""The `cdm` command as a user runs it, in its own process."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

CDM = [sys.executable, "-m", "flows.cli"]


def test_what_a_command_creates_is_private_from_creation(tmp_path, digit_owners):
    """`cdm init` and `cdm ingest` leave no file or folder that another local user can read or enter: the owner's
    images and manifest, the DVC cache and local remote, the workspace state (umask 077 for every command). The
    only exceptions are DVC's own chmods (read-only objects, 0444; a site-cache folder it makes 0777), each behind
    a 0700 folder. On the old code everything was 0644/0755."""
    src = digit_owners(tmp_path / "src")["alice"]
    ws = tmp_path / "ws"
    assert subprocess.run([*CDM, "init", str(ws)], capture_output=True).returncode == 0
    proc = subprocess.run([*CDM, "ingest", "alice", str(src), "--workspace", str(ws), "--json"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["added"] > 0
    open_to_others = []
    for path in [ws, *ws.rglob("*")]:
        rel = path.relative_to(ws).as_posix()
        if rel == ".git" or rel.startswith(".git/"):
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        dvc_object = path.is_file() and mode == 0o444 and ("/files/md5/" in f"/{rel}")
        dvc_site = rel.startswith(".cdm/dvc-site")
        if mode & 0o077 and not (dvc_object or dvc_site):
            open_to_others.append(f"{oct(mode)} {rel}")
    assert not open_to_others, open_to_others
    for folder in (".", "data", "data/owners", ".dvc", ".dvc/cache", ".dvc-storage", ".cdm"):
        assert stat.S_IMODE((ws / folder).stat().st_mode) == 0o700, folder
    assert any(Path(p).is_file() for p in (ws / "data" / "owners" / "alice").rglob("*.png"))


@pytest.mark.parametrize("command", [["status"], ["train"], ["ingest", "alice", "/nonexistent"], ["revoke", "alice"]])
def test_a_command_on_a_folder_that_is_not_there_leaves_no_folder(tmp_path, command):
    """Bad input changes nothing: a mistyped --workspace is refused (exit 2) and not created (its log goes to the
    temp folder); only `init` and `demo` create one."""
    from flows.cli import main as cli

    missing = tmp_path / "not-here"
    assert cli([*command, "--workspace", str(missing)]) == 2
    assert not missing.exists()
