"""`cdm` commands, models: training, composing, sampling, evaluating."""

from __future__ import annotations

from pathlib import Path

from cdm.platform.workspace.errors import CommandFailed, WorkspaceError
from flows.commands.common import _ctx, _status


def _owner_keys(ctx, owners: str | None) -> list[str] | None:
    from cdm.platform.workspace.paths import check_owner_id

    if not owners:
        return None
    names = [check_owner_id(o.strip()) for o in owners.split(",") if o.strip()]
    unknown = sorted(set(names) - set(ctx.ws.owners()))
    if unknown:
        raise WorkspaceError(f"unknown owner(s): {', '.join(unknown)}")
    return [ctx.ws.owner_key(o) for o in names]


def train_ready(workspace: str, owners: str | None):
    """`cdm train`'s refusals that need no flow: no owner to train, an owner named that is not in the workspace."""
    from cdm.platform.models.gate import NO_OWNERS, active_owners

    ctx = _ctx(workspace)
    if not active_owners(ctx.ws):
        raise WorkspaceError(NO_OWNERS)
    _owner_keys(ctx, owners)
    return None, ""


def compose_ready(workspace: str):
    """`cdm compose`'s refusal that needs no flow: no shard in the plan (nothing was trained)."""
    from cdm.platform.models.composites import NO_SHARD, NothingToCompose
    from cdm.platform.models.shards import load_plan

    if not load_plan(_ctx(workspace).ws):
        raise NothingToCompose(NO_SHARD)
    return None, ""


def evaluate_ready(workspace: str, candidate: bool):
    """`cdm evaluate`'s refusal that needs no flow: no composite under the alias to evaluate."""
    from cdm.platform.models import registry
    from cdm.platform.models.composites import no_composite

    ctx, alias = _ctx(workspace), registry.CANDIDATE if candidate else registry.PRODUCTION
    if registry.alias_version(ctx.client, registry.COMPOSITE, alias) is None:
        raise no_composite(alias)
    return None, ""


def train(workspace: str, owners: str | None, paragon: bool, progress: bool, out: str | None = None,
          curves: str | None = None):
    from cdm.platform.models import pipeline_files
    from flows.training import run_training

    ctx = _ctx(workspace)
    keys = _owner_keys(ctx, owners)
    result = run_training(ctx, keys, paragon, progress=progress)
    if out:
        pipeline_files.write_json(out, pipeline_files.train_record(result))
    if curves:
        pipeline_files.write_loss_curves(ctx, curves)
    lines = [f"{s}: " + ("unchanged" if r["skipped"] else f"v{r['version']} ({r['seconds']} s, final train_loss "
                                                           f"{r['final_loss']})")
             for s, r in result["shards"].items()]
    if result["paragon"]:
        lines.append(f"paragon: v{result['paragon']['version']}")
    return result, "\n".join(lines + [f"total {result['seconds']} s"])


def compose(workspace: str, estimator: str | None, progress: bool, out: str | None = None, candidate: bool = False):
    from cdm.platform.models import pipeline_files
    from flows.composition import compose as run_compose

    ctx = _ctx(workspace)
    with _status("composing: registering the composite and sampling its preview grid", progress):
        result = run_compose(str(ctx.ws.root), estimator, progress, candidate)
    result["alias"] = "candidate" if candidate else "production"
    if out:
        pipeline_files.write_json(out, {k: result[k] for k in ("version", "alias", "estimator", "shards", "left_out")})
    return result, (f"cdm-composite v{result['version']} is {result['alias']} ({result['estimator']}, "
                    f"{len(result['shards'])} shards)" + ("; `cdm promote --candidate` serves it" if candidate else ""))


def promote(workspace: str, metrics: str):
    """The candidate goes to production, only with an evaluation of that very version that passed."""
    import json

    from cdm.platform.models import gate, registry
    from cdm.platform.models.composites import production

    ctx = _ctx(workspace)
    cand = production(ctx, registry.CANDIDATE)
    if cand is None:
        raise WorkspaceError("no candidate composite; run `cdm compose --candidate` first")
    try:
        m = json.loads(Path(metrics).read_text())
    except (OSError, ValueError) as e:
        raise WorkspaceError(f"{metrics}: no evaluation to promote on ({e})") from None
    if str(m.get("composite_version")) != cand[0]:
        raise WorkspaceError(f"{metrics} evaluates v{m.get('composite_version')}, not the candidate v{cand[0]}")
    if m.get("regressions"):
        raise WorkspaceError(f"the candidate v{cand[0]} failed its evaluation: " + "; ".join(m["regressions"]))
    before = production(ctx)
    gate.promote(ctx, cand[0], expected=before[0] if before else None)  # refused if production moved meanwhile
    return ({"version": cand[0], "previous": before[0] if before else None},
            f"cdm-composite v{cand[0]} is production (was " + (f"v{before[0]})" if before else "none)"))


def _allowed(ctx, consumer: str | None) -> list[str] | None:
    """The owner keys `consumer` may use (consumers.yaml), or None without a consumer."""
    from cdm.config import Consumers

    if not consumer:
        return None
    consumers = Consumers.load(ctx.ws.consumers_path)
    licenses = {o: ctx.ws.manifest(o).get("license") for o in ctx.ws.owners()}
    try:
        owners = consumers.allowed_owners(consumer, licenses)
    except KeyError as e:
        raise WorkspaceError(str(e.args[0])) from None
    return [ctx.ws.owner_key(o) for o in owners]


def _attribution_summary(ctx, attribution: list[dict]) -> tuple[list[dict], str]:
    """Per-sample attribution by owner id (keys of revoked owners stay keys), and a line of the mean."""
    names = {ctx.ws.owner_key(o): o for o in ctx.ws.owners()}
    samples = [{"index": i, "attribution": {names.get(k, k): round(v, 6) for k, v in a.items()}}
               for i, a in enumerate(attribution)]
    totals: dict[str, float] = {}
    for s in samples:
        for o, w in s["attribution"].items():
            totals[o] = totals.get(o, 0.0) + w / len(samples)
    return samples, "attribution (mean over samples): " + ", ".join(
        f"{o} {w:.2f}" for o, w in sorted(totals.items(), key=lambda kv: -kv[1]))


def sample_text(ctx, n: int, consumer: str | None, seed: int, out: str | None, text: dict):
    """A text workspace's `cdm sample --prompt`: the same JSON shape as a class sample, plus the prompt."""
    import torch

    from cdm.data import save_grid
    from cdm.platform.models.composites import load_production, production

    if text.get("prompt") is None:
        raise WorkspaceError("a text workspace samples a prompt: give --prompt TEXT ('' for none)")
    if len(text["prompt"]) > ctx.params.data.max_caption_chars:
        raise WorkspaceError(f"--prompt has {len(text['prompt'])} characters; data.max_caption_chars is "
                             f"{ctx.params.data.max_caption_chars}")
    allowed = _allowed(ctx, consumer)
    prod = production(ctx)
    if prod is None:
        raise WorkspaceError("no production composite; run `cdm compose` first")
    if allowed is not None and not [s for s in prod[1]["shards"] if set(s["owners"]) <= set(allowed)]:
        raise WorkspaceError(f"consumer {consumer!r}: no shard is composed solely of owners it may use")
    request = {"prompt": text["prompt"], "n": n, "seed": seed,
               **{k: v for k, v in (("negative_prompt", text.get("negative_prompt")),
                                    ("guidance_scale", text.get("guidance_scale")),
                                    ("num_inference_steps", text.get("steps"))) if v is not None},
               **({"allowed_owners": allowed} if allowed is not None else {})}
    with load_production(ctx) as model:
        try:
            out_dict = model.predict(request)
        except ValueError as e:  # a request the model refuses (steps, guidance out of range)
            raise WorkspaceError(str(e).splitlines()[0]) from None
    path = Path(out) if out else ctx.ws.root / "outputs" / "samples.png"
    save_grid(torch.from_numpy(out_dict["images"]), path)
    samples, line = _attribution_summary(ctx, out_dict["attribution"])
    result = {"image": str(path), "n": n, "prompt": text["prompt"], "consumer": consumer,
              "guidance_scale": request.get("guidance_scale", prod[1]["guidance_scale"]),
              "shards": out_dict["shards"], "composite_version": prod[0], "samples": samples}
    return result, f"wrote {path}\n{line}"


def sample(workspace: str, n: int, label: int | None, consumer: str | None, seed: int, out: str | None,
           text: dict | None = None):
    from cdm.platform.models.composites import load_production, production

    if n < 1 or n > 10_000:
        raise WorkspaceError("--n must be between 1 and 10000")
    ctx = _ctx(workspace)
    text = {k: v for k, v in (text or {}).items() if v is not None}
    if ctx.params.data.conditioning == "text":
        if label is not None:
            raise WorkspaceError("a text workspace samples a prompt (--prompt), not a label")
        return sample_text(ctx, n, consumer, seed, out, text)
    if text:
        raise WorkspaceError(f"--{next(iter(text)).replace('_', '-')} is for text workspaces; this one samples labels")
    labels = ctx.params.data.labels
    if label is not None and label not in labels:
        raise WorkspaceError(f"--label {label} is not in the label set {labels}")
    allowed = _allowed(ctx, consumer)
    prod = production(ctx)
    if prod is None:
        raise WorkspaceError("no production composite; run `cdm compose` first")
    shards = [s for s in prod[1]["shards"] if allowed is None or set(s["owners"]) <= set(allowed)]
    if not shards:
        raise WorkspaceError(f"consumer {consumer!r}: no shard is composed solely of owners it may use")
    served = sorted({y for s in shards for y, count in enumerate(s["class_counts"]) if count > 0})
    if label is not None and label not in served:
        raise WorkspaceError(f"no remaining owner's data holds label {label}; the shards served cover labels {served}")
    request = {"n": n, "seed": seed, **({"label": label} if label is not None else {}),
               **({"allowed_owners": allowed} if allowed is not None else {})}
    import torch  # after every refusal: a refused request answers without loading it

    from cdm.data import save_grid

    with load_production(ctx) as model:
        out_dict = model.predict(request)
    path = Path(out) if out else ctx.ws.root / "outputs" / "samples.png"
    save_grid(torch.from_numpy(out_dict["images"]), path)
    samples, line = _attribution_summary(ctx, out_dict["attribution"])
    result = {"image": str(path), "n": n, "label": label, "consumer": consumer, "shards": out_dict["shards"],
              "samples": samples}
    return result, f"wrote {path}\n{line}"


def evaluate(workspace: str, out: str | None, fail_on_regression: bool, history: str | None = None,
             grid: str | None = None, candidate: bool = False):
    from cdm.platform.models import pipeline_files
    from flows.evaluation import evaluate as run_evaluation

    ctx = _ctx(workspace)
    text_ws = ctx.params.data.conditioning == "text"
    if text_ws and (history or grid):
        raise WorkspaceError("--history and --grid are for class workspaces (`cdm sample --prompt ... --out` draws a "
                             "text composite's grid)")
    alias = "candidate" if candidate else "production"
    metrics = run_evaluation(str(ctx.ws.root), out, alias)
    if history:
        pipeline_files.append_evaluation(history, metrics)
    if grid:
        pipeline_files.write_grid(ctx, grid, alias)
    if text_ws:
        from cdm.platform.evaluation.text_evaluate import text_evaluation_text

        text = text_evaluation_text(metrics)
    else:
        text = evaluation_text(metrics)
    if fail_on_regression and metrics["regressions"]:
        raise CommandFailed(f"{len(metrics['regressions'])} regression(s): " + "; ".join(metrics["regressions"]),
                            code=1, result=metrics, text=text)
    return metrics, text


def evaluation_text(m: dict) -> str:
    def ci(v, bounds, spec=".2f"):
        return "n/a" if v is None else f"{v:{spec}} [{bounds[0]:{spec}}, {bounds[1]:{spec}}]"

    def bpd(d):
        return "n/a" if d is None else ci(d["mean"], (d["low"], d["high"]), ".3f")

    nll = m.get("nll", {})
    lines = [f"composite v{m['composite_version']} ({m['estimator']}, {m['shards']} shards): {m['sets']} sample sets "
             f"of {m['n_samples']} ({m['labels']}) vs {m['n_real']} owners' images; [95% CI]",
             f"  FID {ci(m['fid'], m['fid_ci'])}   paragon FID {ci(m.get('paragon_fid'), m.get('paragon_fid_ci'))}"
             f"   fid_ratio {ci(m['fid_ratio'], m.get('fid_ratio_ci'), '.3f')}",
             f"  noise floor at the same N: real vs real {ci(m['floor_real']['mean'], (m['floor_real']['low'], m['floor_real']['high']))}"
             f", one model vs itself {ci(m['floor_seed']['mean'], (m['floor_seed']['low'], m['floor_seed']['high']))}",
             f"  NLL bound on {nll.get('images')} unseen images (bits/dim): composite {bpd(nll.get('composite_bpd'))}"
             f"   paragon {bpd(nll.get('paragon_bpd'))}   gap {bpd(nll.get('gap_bpd'))}",
             *[f"  {name.replace('_', ' ')}: {v}" for name, v in (m.get("verdicts") or {}).items()],
             "  membership of revoked owners: " + ("; ".join(f"{k} {v}" for k, v in
                                                             m.get("membership_verdict", {}).items()) or "none revoked"),
             "  attribution by owner key: " + ", ".join(f"{k} {v:.2f}" for k, v in m["attribution"].items())]
    if m.get("paragon_note"):
        lines.append(f"  note: {m['paragon_note']}")
    lines.append("regressions: " + ("; ".join(m["regressions"]) if m["regressions"] else "none"))
    return "\n".join(lines)
