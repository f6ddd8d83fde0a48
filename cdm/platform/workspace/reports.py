"""Results as operators read them: Markdown for the Prefect UI's artifacts and the CI job summary, and the one-line
description a composite version carries in the MLflow registry. Owner keys only, never raw ids."""

from __future__ import annotations


def _ci(v, bounds, spec=".3f") -> str:
    return "n/a" if v is None or bounds is None else f"{v:{spec}} [{bounds[0]:{spec}}, {bounds[1]:{spec}}]"


def _bpd(d: dict | None) -> str:
    return "n/a" if not d else _ci(d["mean"], (d["low"], d["high"]))


def evaluation_markdown(m: dict) -> str:
    """The answer first (regressions), then every figure with its 95% interval and its noise floor."""
    nll = m.get("nll") or {}
    regressions = m.get("regressions") or []
    floor = m["floor_real"]
    lines = [f"## cdm evaluation: composite v{m['composite_version']} ({m['estimator']}, {m['shards']} shards)", "",
             ("**FAILED**: " + "; ".join(regressions)) if regressions else "**passed**: no threshold crossed", "",
             f"{m['sets']} sample sets of {m['n_samples']} against {m['n_real']} owners' images; 95% intervals.", "",
             "| figure | value [95% CI] | noise floor / reference |", "|---|---|---|",
             f"| fid | {_ci(m['fid'], m['fid_ci'], '.2f')} | real vs real "
             f"{_ci(floor['mean'], (floor['low'], floor['high']), '.2f')} |",
             f"| fid / paragon | {_ci(m.get('fid_ratio'), m.get('fid_ratio_ci'))} | 1 = as good as one model on "
             "everything |",
             f"| NLL bound, bits/dim | {_bpd(nll.get('composite_bpd'))} | paragon {_bpd(nll.get('paragon_bpd'))} |",
             f"| NLL gap to the paragon | {_bpd(nll.get('gap_bpd'))} | 0 = no cost |",
             *[f"| {k.replace('_', ' ')} verdict | {v} | |" for k, v in (m.get("verdicts") or {}).items()]]
    return "\n".join(lines) + "\n"


def certificate_markdown(cert: dict) -> str:
    """A revocation's certificate: what was dropped and retrained, how fast, and what the scan covered."""
    v = cert.get("verification") or {}
    scan = v.get("scan") or {}
    findings: dict[str, int] = {}
    for f in scan.get("findings", []):
        findings[f.get("store", "?")] = findings.get(f.get("store", "?"), 0) + 1
    lines = [f"## Revocation {cert['request_id']} of {cert['owner_key']}: "
             + ("**verified**" if v.get("ok") else "**NOT verified**"), "",
             f"- requested by {cert['requested_by']}, received {cert['received']}, completed {cert['completed']}",
             f"- out of serving in {cert['seconds_to_live']} s, complete in {cert['seconds_to_complete']} s",
             f"- shards dropped {cert['shards_dropped']}, retrained {cert['shards_retrained']}; production "
             f"v{cert['composite_before']} → v{cert['composite_live']} (live) → v{cert['composite_after']}",
             f"- ledger entry {cert.get('ledger', {}).get('seq')} ({str(cert.get('ledger', {}).get('hash'))[:16]}…)"]
    base = cert.get("shared_base")
    if base:
        origin = (f"public manifest {str(base['public_manifest_sha256'])[:16]}…" if base.get("public_manifest_sha256")
                  else f"brought, trained on: {base.get('trained_on')}")
        lines.append(f"- shared base {base['model']} v{base['version']} untouched ({origin})")
    lines += ["", "| store | items scanned | findings |", "|---|---|---|"]
    lines += [f"| {store} | {n} | {findings.get(store, 0)} |" for store, n in scan.get("scanned", {}).items()]
    return "\n".join(lines) + "\n"


def composite_description(spec: dict, previous: dict | None) -> str:
    """What a new composite version changed against the production it replaces."""
    now = {s["id"]: s["version"] for s in spec["shards"]}
    before = {s["id"]: s["version"] for s in (previous or {}).get("shards", [])}
    added = sorted(set(now) - set(before))
    dropped = sorted(set(before) - set(now))
    updated = sorted(s for s in set(now) & set(before) if now[s] != before[s])
    applied = sorted(set(spec.get("revocations", [])) - set((previous or {}).get("revocations", [])))
    parts = [f"{len(now)} shards, {spec['estimator']}"]
    for label, ids in (("added", added), ("dropped", dropped), ("new versions of", updated),
                       ("revocations applied:", applied)):
        if ids:
            parts.append(f"{label} {', '.join(ids)}")
    if previous is None:
        parts.append("first production")
    return "; ".join(parts)
