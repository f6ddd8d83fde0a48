"""The CI files (`.github/workflows/*.yml`, `.gitlab-ci.yml.example`) hold the team's secrets: zizmor finds nothing
of high severity in the workflows; cdm is never installed from a package index by name (`cdm` on PyPI is an
unrelated project; ours is `cdm-compartments`, installed from git at a pinned commit); every action is pinned by a
full commit SHA; no `${{ }}` expression is expanded into a `run:` script (values go through `env:`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
ZIZMOR = Path(sys.executable).parent / "zizmor"

# `pip install cdm`, `pip install -U "cdm==0.1"`, `python -m pip install 'cdm[dev]'`: the bare name, from an index.
# Not `cdm-compartments`, `./cdm`, `git+https://…/cdm.git` (the name must stand alone).
INDEX_INSTALL = re.compile(
    r"\bpip3?\s+install\b[^\n]*?(?<![\w./@+-])[\"']?cdm(?:\[[^\]\s]*\])?(?:[=<>~!]=?[^\s\"']*)?[\"']?(?=[\s;|&)]|$)",
    re.MULTILINE)
# A default of `cdm` for a package to install: `${{ vars.X || 'cdm' }}`, `${X:-cdm}`, `X: cdm` / `X="cdm"` for a
# variable named like a package spec (CDM_VERSION, CDM_PACKAGE, CDM_SPEC, …).
NAME_DEFAULT = re.compile(
    r"\|\|\s*[\"']cdm[\"']"
    r"|:-\s*[\"']?cdm[\"']?\s*\}"
    r"|\b\w*(?:VERSION|PACKAGE|PKG|SPEC|REQUIREMENT)\w*\s*[:=]\s*[\"']?cdm[\"']?\s*(?:#|$)",
    re.MULTILINE)
PINNED_USES = re.compile(r"^[^@\s]+@[0-9a-f]{40}$")
USES_LINE = re.compile(r"^\s*(?:-\s*)?uses:\s*[\"']?([^\s\"'#]+)[\"']?\s*(#.*)?$")


def workflow_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / ".github" / "workflows").glob("*") if p.suffix in (".yml", ".yaml"))


def ci_files(root: Path = ROOT) -> list[Path]:
    """Every file that shows how CI installs cdm: all of .github/, the GitLab example, the README."""
    files = [p for p in (root / ".github").rglob("*") if p.is_file()]
    files += [p for p in (root / ".gitlab-ci.yml.example", root / "README.md") if p.is_file()]
    return sorted(files)


def index_installs(path: Path) -> list[str]:
    """Lines of `path` that install cdm from a package index by name, or default a package to install to `cdm`."""
    text = path.read_text(encoding="utf-8")
    return [m.group(0).strip() for m in (*INDEX_INSTALL.finditer(text), *NAME_DEFAULT.finditer(text))]


def unpinned_uses(path: Path) -> list[str]:
    """`uses:` references of a workflow that are not a full commit SHA with a `# vX.Y.Z` comment (local actions,
    `./…`, need none; a `docker://` image must be pinned by digest)."""
    bad = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = USES_LINE.match(line)
        if m is None:
            continue
        ref, comment = m.group(1), m.group(2) or ""
        if ref.startswith("./"):
            continue
        if ref.startswith("docker://"):
            ok = "@sha256:" in ref
        else:
            ok = PINNED_USES.match(ref) is not None and re.match(r"#\s*v\d+(\.\d+)*\b", comment) is not None
        if not ok:
            bad.append(f"{path.name}:{n}: {line.strip()}")
    # The same through the YAML, so that no `uses:` written another way (a flow mapping, quoted key) slips by.
    for ref in _values(yaml.safe_load(path.read_text(encoding="utf-8")), "uses"):
        if not (ref.startswith("./") or "@sha256:" in ref or PINNED_USES.match(ref)):
            bad.append(f"{path.name}: uses {ref}")
    return bad


def expressions_in_run(path: Path) -> list[str]:
    """`run:` scripts of a workflow (or composite action) that contain a `${{ }}` expression."""
    return [run for run in _values(yaml.safe_load(path.read_text(encoding="utf-8")), "run") if "${{" in run]


def zizmor_findings(target: Path) -> list[dict]:
    """zizmor's high-severity findings on a workflow folder (offline: no GitHub API calls)."""
    out = subprocess.run([str(ZIZMOR), "--offline", "--format", "json", "--min-severity", "high", str(target)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    try:
        findings = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"zizmor exited {out.returncode} without a JSON report: {out.stderr[-2000:]}") from None
    # zizmor exits 0 with no findings, 10+ by the highest severity found; anything else is an error of its own.
    assert out.returncode == 0 or findings, f"zizmor exited {out.returncode}: {out.stderr[-2000:]}"
    return findings


def _values(node, key: str) -> list[str]:
    """Every string value under `key` anywhere in a parsed YAML document."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                found.append(v)
            found += _values(v, key)
    elif isinstance(node, list):
        for v in node:
            found += _values(v, key)
    return found


def test_there_is_a_workflow_to_check():
    assert workflow_files(), "no workflow under .github/workflows"
    assert (ROOT / ".gitlab-ci.yml.example").is_file()


def test_zizmor_finds_nothing_of_high_severity():
    if not ZIZMOR.is_file():
        pytest.skip(f"zizmor is not installed next to {sys.executable} (it is in the dev extra)")
    findings = zizmor_findings(WORKFLOWS)
    assert findings == [], [(f["ident"], f["desc"], f["locations"][0]["concrete"]["feature"][:200])
                            for f in findings]


def test_cdm_is_never_installed_from_an_index_by_name():
    bad = {str(p.relative_to(ROOT)): hits for p in ci_files() if (hits := index_installs(p))}
    assert bad == {}, bad


def test_cdm_is_installed_from_git_at_a_checked_commit():
    """Each CI file installs `cdm-compartments @ git+<repo>@<commit>` and refuses a commit that is not 40 hex."""
    for path in (*workflow_files(), ROOT / ".gitlab-ci.yml.example"):
        text = path.read_text(encoding="utf-8")
        if "pip install" not in text:
            continue
        assert re.search(r"pip install \"cdm-compartments @ git\+\$\{CDM_REPO\}@\$\{CDM_COMMIT\}\"", text), path
        assert "[0-9a-f]{40}" in text or "-eq 40" in text, f"{path}: CDM_COMMIT is not checked to be a full SHA"


def test_every_action_is_pinned_to_a_commit_sha():
    bad = [hit for p in workflow_files() for hit in unpinned_uses(p)]
    assert bad == [], bad


def test_no_expression_is_expanded_into_a_run_script():
    bad = {p.name: runs for p in workflow_files() if (runs := expressions_in_run(p))}
    assert bad == {}, bad


@pytest.mark.parametrize("line", [
    'pip install cdm', 'pip install "cdm"', "pip install 'cdm'", "python -m pip install -U cdm==0.1.0",
    "pip install cdm[dev]", 'pip install "${CDM_VERSION:-cdm}"', "CDM_VERSION: ${{ vars.CDM_VERSION || 'cdm' }}",
    "CDM_PACKAGE: cdm",
])
def test_the_index_install_patterns_catch(tmp_path, line):
    (tmp_path / "ci.yml").write_text(f"x:\n  - {line}\n")
    assert index_installs(tmp_path / "ci.yml"), line


@pytest.mark.parametrize("line", [
    'pip install "cdm-compartments @ git+${CDM_REPO}@${CDM_COMMIT}"', "pip install -e .", "pip install ./cdm",
    "pip install git+https://example.org/team/cdm.git@0123456789abcdef0123456789abcdef01234567",
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", "cdm init ws", "EXPERIMENT: cdm",
])
def test_the_index_install_patterns_pass(tmp_path, line):
    (tmp_path / "ci.yml").write_text(f"x:\n  - {line}\n")
    assert not index_installs(tmp_path / "ci.yml"), line
