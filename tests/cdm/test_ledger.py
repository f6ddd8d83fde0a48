import json

from cdm.platform import ledger


def test_chain_verifies_and_reports_edits_removals_and_reordering(tmp_path):
    path = tmp_path / "ledger.jsonl"
    for i in range(3):
        ledger.append(path, {"event": "revocation", "request_id": f"r{i}"})
    assert ledger.verify(path).as_dict() == {"ok": True, "entries": 3, "problem": None}
    lines = path.read_text().splitlines()

    edited = json.loads(lines[1])
    edited["request_id"] = "forged"
    path.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    check = ledger.verify(path)
    assert not check.ok and "entry 1" in check.problem and "edited" in check.problem

    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert not ledger.verify(path).ok

    path.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    assert not ledger.verify(path).ok

    path.write_text("not json\n")
    assert not ledger.verify(path).ok
