"""Evaluation of the production composite (docs/design.md §6): FID/KID with our feature network, ratio to the
paragon, attribution summary, memorization, membership inference on revoked owners, regression thresholds.

Outputs name owners by key only (they are logged to MLflow and written to metrics.json). KID is torchmetrics' value
as is (the unbiased polynomial-kernel MMD² in the feature network's own units), never multiplied: its magnitude
depends on the feature scale, so it compares runs with the same `feature_sha256`, not Inception-based KIDs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dataclasses import dataclass, field
from typing import Any, Callable

from cdm.compose import CompositeDenoiser
from cdm.config import EvaluateParams, Params
from cdm.data import Dataset, digits_dataset, digits_uint8, heldout_split
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.schedulers import NoiseSchedule

FEATURE_NET = "feature-net.safetensors"


def heldout(params: Params) -> Dataset:
    """The public held-out split that belongs to no owner (the bundled digits' fixed 20%)."""
    d = params.data
    if (d.image_size, d.channels, sorted(d.labels)) != (8, 1, list(range(10))):
        raise WorkspaceError("the bundled held-out split fits 8x8 grey digits only; this workspace's data differs")
    _, labels = digits_uint8()
    return digits_dataset(heldout_split(labels)[1])


def feature_net(ctx: Context):
    """The feature network, trained once on the held-out split and cached (safetensors + recorded sha256)."""
    from cdm.metrics import load_feature_net, save_feature_net, train_feature_net

    ws = ctx.ws
    path, record = ws.cache_dir / FEATURE_NET, ws.cache_dir / "feature-net.json"
    if path.exists() and record.exists():
        return load_feature_net(path, json.loads(record.read_text())["sha256"])
    data = heldout(ctx.params)
    net = train_feature_net(data, num_classes=10, steps=ctx.params.evaluate.feature_steps, seed=0)
    ws.cache_dir.mkdir(parents=True, exist_ok=True)
    sha = save_feature_net(net, path)
    record.write_text(json.dumps({"sha256": sha, "trained_on": "digits held-out split", "samples": len(data)}))
    return net


def owners_data(ctx: Context, keys: set[str] | None = None) -> Dataset:
    """The current owners' data (only the owners with these keys, if given)."""
    d, ws = ctx.params.data, ctx.ws
    return Dataset.concat([ws.load_owner(o, d.image_size, d.channels, d.labels) for o in ws.owners()
                           if keys is None or ws.owner_key(o) in keys])


def paragon_unet(ctx: Context, owner_keys: set[str]):
    """The newest paragon version trained on exactly `owner_keys` (the composite's owners, read from the registry's
    tags) that may be served (`gate.why_unservable`: not marked by a revocation, naming no owner under one), as
    (UNet, version); (None, None) when there is none. Chosen by registry tags only: the data folders of an owner
    under revocation exist until the purge and say nothing about what may be used."""
    from cdm.platform.models import gate

    revoked = gate.revoked_owner_keys(ctx.ws)
    for mv in reversed(registry.versions(ctx.client, registry.PARAGON)):
        if set(json.loads(mv.tags.get("cdm.owner_keys", "[]"))) != set(owner_keys):
            continue
        if gate.why_unservable(ctx, mv, revoked) is not None:
            continue
        with ctx.ws.tempdir() as tmp:
            model = registry.load_pyfunc(ctx.client, f"models:/{registry.PARAGON}/{mv.version}", tmp)
            return model.unwrap_python_model().unet, str(mv.version)
    return None, None


def unseen(ctx: Context) -> Dataset:
    """The held-out split minus any public sample the shared initialization was trained on: data no generator saw."""
    import mlflow

    held = heldout(ctx.params)
    mv = registry.alias_version(ctx.client, registry.INIT, registry.CURRENT)
    if mv is None or mv.tags.get("cdm.brought") == "true":
        # A brought base (`cdm pretrain --from`) comes with a statement of its training data, not a sample list:
        # there is nothing to remove.
        return held
    with ctx.ws.tempdir() as tmp:
        manifest = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="public_manifest.json",
                                                            tracking_uri=ctx.tracking_uri, dst_path=tmp))
        seen = {row["sha256"] for row in json.loads(manifest.read_text())}
    return held.subset([i for i, h in enumerate(held.ids) if h not in seen])


@dataclass
class Models:
    """What an evaluation measures: the composite (rebuilt per seed: the prior's draws follow the seed), its shards
    with their priors (for the mixture's likelihood bound) and the paragon, all sampled with one sampler setting."""

    composite_for: Callable[[int], CompositeDenoiser]  # seed -> a fresh composite
    shards: list  # the shard UNets, in the composite's order
    priors: torch.Tensor  # [N, K + 1] lambda_i(y)
    paragon: Any | None  # the paragon's UNet, or None
    sampler: Callable[[], Any]  # -> a fresh sampling scheduler
    num_inference_steps: int
    eta: float
    image_shape: tuple[int, int, int]
    null_label: int
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)


def sample_sets(denoiser_for: Callable[[int], tuple], labels: torch.Tensor, m: Models, seeds: range) -> list:
    """One image set per seed, all with the same labels."""
    from cdm.pipeline import CDMPipeline

    sets = []
    for seed in seeds:
        denoiser, sampler = denoiser_for(seed)
        pipe = CDMPipeline(denoiser, sampler, m.image_shape)
        sets.append(pipe(labels, m.num_inference_steps, eta=m.eta, generator=torch.Generator().manual_seed(seed)))
    return sets


def measure(m: Models, real: Dataset, unseen_data: Dataset, net, e: EvaluateParams) -> dict:
    """The quality figures of docs/design.md §6, each with its 95% interval and noise floor (cdm/quality.py), and the
    likelihood bounds on data no generator saw (cdm/likelihood.py).

    Returns metrics keyed as in metrics.json; `_composites` (the seed's composites) and `_sets` are for the caller.
    """
    from cdm.metrics import memorization, memorization_check
    from cdm.model import UNetDenoiser
    from cdm.quality import (features, fid_interval, ratio_interval, real_floor, seed_floor, stratified_halves,
                             stratified_labels)

    # 1. Reference and control: class-stratified halves of the owners' data; labels in the reference's proportions.
    ref_idx, ctl_idx = stratified_halves(real.y, seed=e.seed)
    n = min(e.n_samples, len(ctl_idx))
    labels = stratified_labels(real.y[ref_idx].bincount(minlength=m.null_label), n)
    f_ref, f_ctl = features(net, real.x[ref_idx]), features(net, real.x[ctl_idx])
    seeds = range(e.seed, e.seed + e.sets)
    # 2. The composite: one sample set per seed.
    composites = {}

    def composite(seed):
        composites[seed] = m.composite_for(seed)
        return composites[seed], composites[seed].scheduler

    fakes = sample_sets(composite, labels, m, seeds)
    f_fake = [features(net, x) for x in fakes]
    fid = fid_interval(f_ref, f_fake)
    mem = memorization_check(fakes[0], real.x, seed=e.seed)
    out = {
        "n_samples": n, "sets": e.sets, "n_real": len(ref_idx), "labels": "class-conditional, stratified",
        "fid": fid.mean, "fid_ci": [fid.low, fid.high],
        "floor_real": real_floor(f_ref, f_ctl, real.y[ctl_idx].numpy(), n, seed=e.seed).as_dict(),
        "floor_seed": seed_floor(f_fake).as_dict(),
        "feature_sha256": net.sha256(),
        # Share of samples that copy an owner's image, with its interval and the detector's positive control.
        "memorization": mem["share"], "memorization_check": mem,
        "_composites": composites,
    }
    # 3. The paragon with the same seeds, labels and sampler: the ratio is paired set by set.
    if m.paragon is not None:
        para = sample_sets(lambda seed: (UNetDenoiser(m.paragon, m.null_label), m.sampler()), labels, m, seeds)
        f_para = [features(net, x) for x in para]
        p_fid, ratio = fid_interval(f_ref, f_para), ratio_interval(f_ref, f_fake, f_para)
        out.update(paragon_fid=p_fid.mean, paragon_fid_ci=[p_fid.low, p_fid.high], fid_ratio=ratio.mean,
                   fid_ratio_ci=[ratio.low, ratio.high], paragon_memorization=memorization(para[0], real.x)["share"])
    else:
        out.update(fid_ratio=None, fid_ratio_ci=None)
    # 4. Likelihood bounds on the unseen split.
    out["nll"] = likelihood(m, unseen_data, e)
    return out


def likelihood(m: Models, data: Dataset, e: EvaluateParams) -> dict:
    """Bits/dim bounds (mean and 95% interval over images) of the composite as a mixture, of each shard and of the
    paragon, and the composite's gap to the paragon (paired by image and noise draw)."""
    from cdm.likelihood import BoundConfig, bits_per_dim, elbo, mixture_elbo
    from cdm.model import UNetDenoiser
    from cdm.quality import paired_interval

    # Only the labels some shard holds: the composite gives the others no probability at all.
    held = m.priors[:, :m.null_label].sum(0) > 0
    data = data.subset(held[data.y].nonzero().flatten())
    dims, cfg = data.x[0].numel(), BoundConfig(steps=e.nll_steps, seed=e.seed)

    def bpd(elbos):
        return paired_interval(bits_per_dim(elbos, dims), torch.zeros(len(elbos))).as_dict()

    shard_elbos = torch.stack([elbo(UNetDenoiser(u, m.null_label), data.x, data.y, m.schedule, cfg) for u in m.shards])
    mix = mixture_elbo(shard_elbos, m.priors[:, data.y].double().log())  # lambda_i(y) of each image's label
    out = {"images": len(data), "labels": held.nonzero().flatten().tolist(), "steps": e.nll_steps,
           "composite_bpd": bpd(mix),
           "shards_bpd": [bpd(el) for el in shard_elbos]}
    if m.paragon is not None:
        para = elbo(UNetDenoiser(m.paragon, m.null_label), data.x, data.y, m.schedule, cfg)
        out["paragon_bpd"] = bpd(para)
        out["gap_bpd"] = paired_interval(bits_per_dim(mix, dims), bits_per_dim(para, dims)).as_dict()
    return out


def evaluate(ctx: Context, alias: str = "production", revoked: dict | None = None) -> dict:
    """Metrics of the production composite (or of the one `alias` names, e.g. a candidate) against the owners'
    current data (`measure`), with the attribution by owner key, the revoked owners' membership figures (`revoked`:
    {owner key: the revocation's recorded membership check}, `forgetting.record.revoked_membership`) and the
    gate's verdict."""
    from cdm.attribution import attribute
    from cdm.compose import class_priors
    from cdm.platform.models.composites import load_production, no_composite, production
    from cdm.platform.models.serving import build_composite
    from cdm.schedulers import sampling_scheduler

    prod = production(ctx, alias)
    if prod is None:
        raise no_composite(alias)
    version, spec = prod
    with load_production(ctx, alias) as model:
        served = model.unwrap_python_model()
        unets = served.unets  # every shard, loaded while its files are here
    cfg, schedule = spec["model_config"], NoiseSchedule(**spec.get("schedule", {}))
    # The reference is the data of the owners the composite serves: a label no shard holds cannot be sampled, and
    # an owner not yet composed (ingested after the last `cdm compose`) is no quality loss of the composite.
    served_keys = {k for s in spec["shards"] for k in s["owners"]}
    paragon, paragon_version = paragon_unet(ctx, served_keys)
    models = Models(
        composite_for=lambda seed: build_composite(spec, unets, served.router, seed=seed)[0],
        shards=unets, priors=class_priors(torch.tensor([s["class_counts"] for s in spec["shards"]],
                                                              dtype=torch.float32)),
        paragon=paragon, sampler=lambda: sampling_scheduler(schedule, spec["sampler"]),
        num_inference_steps=spec["num_inference_steps"], eta=spec["eta"],
        image_shape=(cfg["channels"], cfg["image_size"], cfg["image_size"]), null_label=cfg["num_classes"],
        schedule=schedule)
    e = ctx.params.evaluate
    metrics = measure(models, owners_data(ctx, served_keys), unseen(ctx), feature_net(ctx), e)
    served.require_unrevoked()  # a revocation accepted while it measured: no figures from the revoked weights
    composites = metrics.pop("_composites")
    share: dict[str, float] = {}
    rows = attribute(composites[e.seed].attribution()["mean"], [s["owners"] for s in spec["shards"]])
    for row in rows:
        for k, v in row.items():
            share[k] = share.get(k, 0.0) + v / len(rows)
    metrics.update(composite_version=version, composite_alias=alias, estimator=spec["estimator"],
                   shards=len(spec["shards"]),
                   attribution={k: round(v, 4) for k, v in sorted(share.items())},  # by owner key
                   paragon_version=paragon_version)
    metrics["nll"]["shards_bpd"] = dict(zip([s["id"] for s in spec["shards"]], metrics["nll"]["shards_bpd"]))
    if paragon is None:
        metrics["paragon_note"] = "no servable paragon trained on exactly the composite's owners (`cdm train --paragon`)"
    checks = revoked or {}
    metrics["membership_auc"] = {k: f.auc_after for k, f in checks.items()}
    metrics["membership_verdict"] = {k: f.verdict for k, f in checks.items()}
    metrics["membership_auc_control"] = {k: f.auc_control for k, f in checks.items() if f.auc_control is not None}
    metrics["verdicts"] = verdicts(metrics, ctx.params)
    metrics["regressions"] = regressions(metrics, ctx.params)
    return metrics


def verdicts(metrics: dict, params: Params) -> dict[str, str]:
    """What a user can act on, one word and its reason per figure (`cdm.quality.verdict`: met / inconclusive /
    failed from the 95% interval against the goal in params.yaml's `evaluate`; a check without a control that fired
    gets no verdict)."""
    from cdm.quality import verdict

    e, out = params.evaluate, {}
    if metrics.get("fid_ratio_ci"):
        lo, hi = metrics["fid_ratio_ci"]
        out["fid_ratio"] = f"{verdict(lo, hi, e.fid_ratio_max)} (goal <= {e.fid_ratio_max}, 95% CI [{lo:.3f}, {hi:.3f}])"
    gap = (metrics.get("nll") or {}).get("gap_bpd")
    if gap:
        out["nll_gap"] = (f"{verdict(gap['low'], gap['high'], e.nll_gap_max)} (goal <= {e.nll_gap_max} bits/dim, "
                          f"95% CI [{gap['low']:.3f}, {gap['high']:.3f}])")
    mem = metrics.get("memorization_check")
    if mem is not None:
        out["memorization"] = (
            f"{verdict(mem['low'], mem['high'], e.memorization_max)} (goal <= {e.memorization_max}, 95% CI "
            f"[{mem['low']:.3f}, {mem['high']:.3f}]; the detector found {mem['control_found']:.0%} of planted "
            "near-copies)" if mem["fired"] else
            f"no verdict: the detector found only {mem['control_found']:.0%} of planted near-copies of owners' images,"
            " so it cannot see copies in these images")
    return out


def regressions(metrics: dict, params: Params) -> list[str]:
    """The gate: a figure regresses only when its whole 95% interval is past the threshold, so that a reseed of the
    same models cannot trip it and a real regression (larger than the instrument's noise) does."""
    e, out = params.evaluate, []
    ratio_low = (metrics.get("fid_ratio_ci") or [None])[0]
    if ratio_low is not None and ratio_low > e.fid_ratio_max:
        out.append(f"fid_ratio {metrics['fid_ratio']:.3f} (95% CI from {ratio_low:.3f}) > {e.fid_ratio_max}")
    if e.fid_max is not None and metrics["fid_ci"][0] > e.fid_max:
        out.append(f"fid {metrics['fid']:.3f} (95% CI from {metrics['fid_ci'][0]:.3f}) > {e.fid_max}")
    gap = metrics.get("nll", {}).get("gap_bpd")
    if gap is not None and gap["low"] > e.nll_gap_max:
        out.append(f"NLL gap to the paragon {gap['mean']:.3f} bits/dim (95% CI from {gap['low']:.3f}) "
                   f"> {e.nll_gap_max}")
    for key, auc in metrics.get("membership_auc", {}).items():
        # A ceiling on the AUC after a revocation, read like the verdict: past it only beyond the negative control
        # (the base on the same images), when there is one.
        control = (metrics.get("membership_auc_control") or {}).get(key)
        beyond = control is None or metrics.get("membership_verdict", {}).get(key, "").startswith("failed")
        if auc > e.membership_auc_max and beyond:
            out.append(f"membership AUC {auc:.3f} on revoked {key} > {e.membership_auc_max}"
                       + (f" (beyond the control {control:.3f})" if control is not None else ""))
    mem = metrics.get("memorization_check")  # text: none
    if mem is not None and mem["fired"] and mem["low"] > e.memorization_max:
        out.append(f"memorization {mem['share']:.3f} (95% CI from {mem['low']:.3f}) > {e.memorization_max}")
    return out


def log_evaluation(ctx: Context, metrics: dict) -> str:
    """An MLflow run in experiment `cdm-evaluation` with the numeric metrics and metrics.json (keys, no raw ids)."""
    c = ctx.client
    exp = registry.experiment_id(c, ctx.artifact_root, "cdm-evaluation")
    run = c.create_run(exp, run_name=f"evaluate-composite-v{metrics['composite_version']}",
                       tags={"cdm.composite_version": str(metrics["composite_version"]),
                             # a text composite's features: the attribute classifier, trained in the evaluation
                             "cdm.feature_sha256": metrics.get("feature_sha256", "attribute classifier")})
    rid = run.info.run_id
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            c.log_metric(rid, k, float(v))
    for k in ("composite_bpd", "paragon_bpd", "gap_bpd"):
        if k in metrics.get("nll", {}):
            c.log_metric(rid, f"nll_{k}", float(metrics["nll"][k]["mean"]))
    for k in ("alignment", "alignment_paragon", "alignment_ceiling"):  # a text composite's
        if k in metrics:
            c.log_metric(rid, k, float(metrics[k]["score"]))
    c.log_dict(rid, metrics, "metrics.json")
    c.set_terminated(rid)
    return rid


def base_membership_auc(ctx: Context, members: Dataset, nonmembers: Dataset) -> float | None:
    """The membership attack's AUC through the shared base (`cdm-init@current`, trained on public data only): the
    negative control on the same images (it saw neither set). None without a registered class-conditional base."""
    from cdm.metrics import membership_auc, membership_loss
    from cdm.model import UNetDenoiser, model_config_of
    from cdm.platform.models.weights import load_init
    from cdm.schedulers import NoiseSchedule, train_scheduler

    init = load_init(ctx.client, ctx.ws.tmp_dir)
    if init is None:
        return None
    unet = init["unet"].eval()  # built from its own saved config: a params change since cannot break it
    den = UNetDenoiser(unet, model_config_of(unet).null_label)
    # The composites' schedule (the forgetting check's before and after versions share it with their shards).
    ac = train_scheduler(NoiseSchedule()).alphas_cumprod
    return membership_auc(membership_loss(den, members.x, members.y, ac),
                          membership_loss(den, nonmembers.x, nonmembers.y, ac))


def composite_membership_auc(ctx: Context, versions: dict[str, str], members: Dataset,
                             nonmembers: Dataset) -> dict[str, float]:
    """Membership-inference AUC per composite version; each distinct shard version is loaded and scored once.
    Score: the lowest `membership_loss` (low-t, 32 draws, the images' own labels) over the composite's shards."""

    from cdm.metrics import membership_auc, membership_loss
    from cdm.model import UNetDenoiser, model_config_of
    from cdm.schedulers import NoiseSchedule, train_scheduler
    from cdm.platform.models.weights import load_compartment

    from cdm.platform.models.composites import spec_of

    specs = {tag: spec_of(ctx, version) for tag, version in versions.items()}
    losses: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs.values():
        alphas_cumprod = train_scheduler(NoiseSchedule(**spec.get("schedule", {}))).alphas_cumprod
        for shard in spec["shards"]:
            ref = (shard["model"], shard["version"])
            if ref in losses:
                continue
            with registry.model_files(ctx.client, *ref, ctx.ws.tmp_dir) as files:
                unet = load_compartment(ctx.client, files, shard["weights_sha256"], ctx.ws.tmp_dir)
            null_label = model_config_of(unet).null_label
            den = UNetDenoiser(unet, null_label)
            losses[ref] = tuple(membership_loss(den, d.x, d.y, alphas_cumprod) for d in (members, nonmembers))
    out = {}
    for tag, spec in specs.items():
        refs = [(s["model"], s["version"]) for s in spec["shards"]]
        out[tag] = membership_auc(torch.stack([losses[r][0] for r in refs]).min(0).values,
                                  torch.stack([losses[r][1] for r in refs]).min(0).values)
    return out
