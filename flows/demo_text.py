"""The text-to-image demo (`cdm demo --text`): the whole story on the compositional digits in a fresh text workspace.

    0. data         coloured MNIST digits with captions (digit, colour, side); 4 owners by colour domain, a public
                    split (its own glyphs, every colour) and held-out prompts
    1. base         `cdm pretrain` on the public split: a small StableDiffusionPipeline folder, registered as cdm-init
    2. ingestion    one owner's batch with an over-long caption refused whole; then every owner's batch
    3. compartments one LoRA adapter per owner on the frozen base; 4. the composite with its prompt prior
    5. prompts      a grid of each owner's prompts with attribution; alignment of the composite and of the base
    6. revocation   one owner, by her signed request: her adapter, captions and latents deleted, prior refitted
    7. again        the same prompts: her share of the attribution, alignment on her domain's prompts before/after
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow

from cdm.config import Params

PER_OWNER = 100
PUBLIC = 1500
HELDOUT = 300  # real held-out images: the alignment's ceiling
PROMPTS = 60  # held-out prompts per alignment figure
BASE_STEPS = 600  # UNet steps of the base (and its VAE's); ~0.13 s a step at batch 32 on 2 cores
LORA_STEPS = 100  # per compartment


def demo_text_params() -> Params:
    p = Params.text()
    p.train.steps = LORA_STEPS
    p.train.init_steps = BASE_STEPS
    p.train.max_workers = 1  # compartments one after another: each uses both cores
    p.compose.num_inference_steps = 25
    return p


def _overlong_copy(src: Path, dst: Path, max_chars: int) -> None:
    """A copy of an owner's batch whose last caption is too long: the batch must be refused whole."""
    import shutil

    shutil.copytree(src, dst)
    lines = (dst / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    row["text"] = (row["text"] + " ") * (max_chars // len(row["text"]) + 2)
    lines[-1] = json.dumps(row)
    (dst / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@flow(name="cdm-demo-text")
def demo_text(out: str = "demo-text-workspace", owners: int = 4, progress: bool = False) -> dict:
    import torch

    from cdm.data import save_grid
    from cdm.platform.models.composites import load_production
    from cdm.platform.workspace.context import Context
    from cdm.platform.create import init_workspace
    from cdm.platform.data.ingest import IngestionRejected
    from cdm.platform.workspace.owner_records import sign_revocation
    from cdm.platform.evaluation.text_evaluate import alignment_of, generate, owner_share
    from cdm.text.alignment import ClassifierConfig, alignment, train_attribute_classifier
    from cdm.text.captions import load_imagefolder
    from cdm.text.digits import Domain, caption, colour_domains, make_scenes, parse_caption, write_demo_owners
    from flows.composition import compose
    from flows.ingestion import ingest
    from flows.training import pretrain, run_training
    from flows.unlearning import unlearn_owner

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    root = Path(out).resolve()
    if root.exists() and any(p for p in root.iterdir() if p.name != ".cdm"):
        raise FileExistsError(f"{root} exists and is not empty; choose another --out or remove it")
    # 0. The owners' folders live beside the workspace, not in it.
    src = root.parent / f"{root.name}.sources"
    folders = write_demo_owners(src, owners, PER_OWNER, PUBLIC, HELDOUT, seed=0)
    owner_ids = [f"owner-{k:02d}" for k in range(owners)]
    params = demo_text_params()
    init_workspace(root, params=params)
    ctx = Context.load(root)

    # 1. The base on public captions only.
    t = time.perf_counter()
    base = pretrain(str(root), str(folders["public"]), progress=progress)
    times["pretrain"] = time.perf_counter() - t

    # 2. Ingestion: a batch with one over-long caption is refused whole, then every owner's batch.
    t = time.perf_counter()
    bad = src / "owner-01-bad"
    _overlong_copy(folders["owner-01"], bad, params.data.max_caption_chars)
    try:
        ingest(ctx, "owner-01", str(bad))
        rejection = "NOT rejected (unexpected)"
    except IngestionRejected as e:
        rejection = e.summary()
    tokens = {o: ingest(ctx, o, str(folders[o]))["token"] for o in owner_ids}
    times["ingest"] = time.perf_counter() - t

    # 3. One LoRA compartment per owner; 4. the composite and its prompt prior.
    t = time.perf_counter()
    trained = run_training(ctx, progress=progress)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    composite = compose(str(root))
    times["compose"] = time.perf_counter() - t

    # 5. The attribute classifier (public images only), its ceiling on real held-out images; prompts of each
    #    owner's domain (one digit, her colours) and held-out prompts of every colour.
    t = time.perf_counter()
    public = load_imagefolder(folders["public"], params.data.image_size)
    clf = train_attribute_classifier(public.x, [parse_caption(c) for c in public.captions], ClassifierConfig(steps=800))
    held = load_imagefolder(folders["heldout"], params.data.image_size)
    held_scenes = [parse_caption(c) for c in held.captions]
    ceiling = alignment(clf, held.x, held_scenes).as_dict()
    times["classifier"] = time.perf_counter() - t
    domains = colour_domains(owners)
    domain_scenes = {o: make_scenes(PROMPTS // 2, Domain(colours=d.colours, two=0.0), 100 + k)
                     for k, (o, d) in enumerate(zip(owner_ids, domains))}
    victim = "owner-01"
    key = {o: ctx.ws.owner_key(o) for o in owner_ids}

    def measure(model, label: str) -> dict:
        grid_prompts = [caption(s) for o in owner_ids for s in domain_scenes[o][:6]]
        grid = generate(model, grid_prompts, seed=7)
        save_grid(grid["images"], root / "outputs" / f"prompts-{label}.png", nrow=6)
        own = {o: alignment_of(model, clf, domain_scenes[o], seed=11) for o in owner_ids}
        return {"heldout": {k: v for k, v in alignment_of(model, clf, held_scenes[:PROMPTS], seed=3).items()
                            if k != "attribution"},
                "victim_domain": {k: v for k, v in own[victim].items() if k != "attribution"},
                "attribution_to_own_owner": {o: round(owner_share(own[o]["attribution"], key[o]), 4)
                                             for o in owner_ids},
                "victim_share_on_her_prompts": round(owner_share(own[victim]["attribution"], key[victim]), 4),
                "grid": str(root / "outputs" / f"prompts-{label}.png")}

    t = time.perf_counter()
    with load_production(ctx) as model:
        before = measure(model, "before")
    from cdm.platform.models import registry

    with ctx.ws.tempdir() as tmp:  # the base alone: the reference a revoked domain falls back toward
        base_model = registry.load_pyfunc(ctx.client, f"models:/{registry.INIT}/{base['version']}", tmp)
        reference = {"heldout": {k: v for k, v in alignment_of(base_model, clf, held_scenes[:PROMPTS], seed=3,
                                                                num_inference_steps=25).items()
                                 if k != "attribution"},
                     "victim_domain": {k: v for k, v in alignment_of(base_model, clf, domain_scenes[victim],
                                                                     seed=11, num_inference_steps=25).items()
                                       if k != "attribution"}}
    times["prompts_before"] = time.perf_counter() - t

    # 6. The owner's signed revocation.
    t = time.perf_counter()
    request = sign_revocation(tokens[victim], key[victim], "demo: licence withdrawn")
    cert = unlearn_owner(str(root), key[victim], signature=request["signature"], issued_at=request["issued_at"],
                         reason=request["reason"])
    times["revoke"] = time.perf_counter() - t

    # 7. The same prompts again.
    t = time.perf_counter()
    with load_production(ctx) as model:
        after = measure(model, "after")
    times["prompts_after"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    summary = {
        "workspace": str(root), "owners": owners, "per_owner": PER_OWNER, "public_images": PUBLIC,
        "base": {"version": base["version"], "steps": base["steps"], "seconds": base["seconds"]},
        "rejected_batch": rejection,
        "compartments": {s: {"version": r["version"], "seconds": r["seconds"]} for s, r in trained["shards"].items()},
        "composite_before": composite["version"], "revoked_key": key[victim], "request_id": cert["request_id"],
        "ceiling": ceiling, "base_alignment": reference, "before": before, "after": after,
        "seconds_to_live": cert["seconds_to_live"], "seconds_to_complete": cert["seconds_to_complete"],
        "verification_ok": (cert["verification"] or {}).get("ok"),
        "prompt_prior_retrained": cert.get("prompt_prior_retrained"),
        "shared_base": cert.get("shared_base"),
        "times": {k: round(v, 1) for k, v in times.items()},
    }
    (root / "outputs" / "demo-text-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["report"] = report(summary, {key[o]: o for o in owner_ids})
    return summary


def _a(d: dict) -> str:
    return f"{d['score']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"


def report(s: dict, names: dict[str, str]) -> str:
    victim = names[s["revoked_key"]]
    b, a = s["before"], s["after"]
    lines = [
        "", "cdm demo --text summary", "=======================",
        f"workspace: {s['workspace']}  ({s['owners']} owners x {s['per_owner']} captioned images, by colour)",
        f"base: cdm-init v{s['base']['version']}, pretrained on {s['public_images']} public images "
        f"({s['base']['steps']} UNet steps, {s['base']['seconds']:.0f} s); untouched by the revocation: "
        f"{not (s['shared_base'] or {}).get('touched', True)}",
        f"rejected batch: {s['rejected_batch']}",
        f"revoked: {victim} ({s['request_id']}); verification {'ok' if s['verification_ok'] else 'FAILED'}; "
        f"prompt prior refitted without her captions: {s['prompt_prior_retrained']}",
        "", f"{'prompt alignment [95% CI]':<40}{'before':>22}{'after':>22}", "-" * 84,
        f"{'held-out prompts, composite':<40}{_a(b['heldout']):>22}{_a(a['heldout']):>22}",
        f"{victim + chr(39) + 's prompts, composite':<40}{_a(b['victim_domain']):>22}{_a(a['victim_domain']):>22}",
        f"{'held-out prompts, base alone':<40}{_a(s['base_alignment']['heldout']):>22}",
        f"{victim + chr(39) + 's prompts, base alone':<40}{_a(s['base_alignment']['victim_domain']):>22}",
        f"{'real held-out images (ceiling)':<40}{_a(s['ceiling']):>22}",
        "-" * 84,
        "attribution of each owner's prompts to that owner (before): " + ", ".join(
            f"{o} {w:.2f}" for o, w in b["attribution_to_own_owner"].items()),
        f"{victim}'s share of her own prompts: {b['victim_share_on_her_prompts']:.2f} before, "
        f"{a['victim_share_on_her_prompts']:.2f} after",
        f"revocation live in {s['seconds_to_live']:.1f} s, complete in {s['seconds_to_complete']:.1f} s",
        f"times (s): {s['times']}",
        f"prompt grids (rows: 6 prompts of each owner's colours): {b['grid']}, {a['grid']}",
    ]
    return "\n".join(lines)
