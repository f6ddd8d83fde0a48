"""The audit ledger: a keyed chain (HMAC with the workspace secret), anchored outside the file, appended under the
workspace lock."""

import hashlib
import json
import threading

from cdm.platform.workspace import ledger
from cdm.platform.workspace.paths import Workspace

SECRET = b"k" * 32


def test_chain_verifies_and_reports_edits_removals_and_reordering(tmp_path):
    path = tmp_path / "ledger.jsonl"
    for i in range(3):
        ledger.append(path, SECRET, {"event": "revocation", "request_id": f"r{i}"})
    check = ledger.verify(path, SECRET)
    assert check.ok and check.entries == 3 and check.head.startswith("2:")
    lines = path.read_text().splitlines()

    edited = json.loads(lines[1])
    edited["request_id"] = "forged"
    path.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    check = ledger.verify(path, SECRET)
    assert not check.ok and "entry 1" in check.problem and "edited" in check.problem

    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert not ledger.verify(path, SECRET).ok

    path.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    assert not ledger.verify(path, SECRET).ok

    path.write_text("not json\n")
    assert not ledger.verify(path, SECRET).ok


def test_a_consistent_rewrite_without_the_secret_is_detected(tmp_path):
    """Someone with write access recomputes every hash (unkeyed sha256, as the chain used to be): detected."""
    path = tmp_path / "ledger.jsonl"
    for i in range(3):
        ledger.append(path, SECRET, {"event": "revocation", "request_id": f"r{i}", "verification_ok": True})
    forged, prev = [], ledger.GENESIS
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        body = {k: v for k, v in entry.items() if k not in ("prev", "hash")}
        body["verification_ok"] = False
        digest = hashlib.sha256((prev + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()
        forged.append(json.dumps({**body, "prev": prev, "hash": digest}, sort_keys=True))
        prev = digest
    path.write_text("\n".join(forged) + "\n")
    check = ledger.verify(path, SECRET)
    assert not check.ok and "keyed hash" in check.problem


def test_the_anchor_detects_a_truncated_or_replaced_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    for i in range(3):
        ledger.append(path, SECRET, {"event": "revocation", "request_id": f"r{i}"})
    anchor = ledger.head(ledger.read(path))
    assert ledger.verify(path, SECRET, anchor).ok
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")  # the last entry removed: still a valid chain
    assert ledger.verify(path, SECRET).ok
    check = ledger.verify(path, SECRET, anchor)
    assert not check.ok and "anchored head" in check.problem
    path.unlink()  # replaced by nothing
    assert not ledger.verify(path, SECRET, anchor).ok


def test_concurrent_records_never_fork_the_chain(tmp_path):
    """Two revocations certifying at once (threads here; the lock is a file lock, so processes too)."""
    import subprocess

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws.root, check=True)
    barrier = threading.Barrier(4)

    def writer(n: int):
        barrier.wait()
        for i in range(8):
            ledger.record(ws, {"event": "revocation", "request_id": f"w{n}-{i}"})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check = ledger.verify(ws.ledger_path, ws.secret())
    assert check.ok and check.entries == 32, check
    log = subprocess.run(["git", "log", "--oneline"], cwd=ws.root, capture_output=True, text=True).stdout
    assert len(log.splitlines()) == 32
