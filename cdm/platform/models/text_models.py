"""A text workspace's models on the platform (docs/design.md §2b): the shared base as registered (`cdm-init`, a
StableDiffusionPipeline folder), latents cached per owner, compartments trained on it and registered adapter-only
(or as a full UNet) naming their base, and the prompt prior a composite is registered with.

    base        cdm-init@current -> {unet, vae, text_encoder, tokenizer, scheduler}, every file checked against its
                record before it is loaded
    latents     .cdm/latents/<owner key>/<base hash>.safetensors: {sample sha256: latent [C, h, w]}, encoded once
                per image and base; deleted with the owner by a revocation's purge
    compartment a LoRA adapter on the frozen base UNet (or every UNet weight), trained on its owners' latents and
                captions; registered as `cdm-shard-<id>` (or `cdm-paragon`) with the base's version and hash
    prior       p(i | c) over the base text encoder's caption features, trained on the composed shards' owners'
                captions whenever a composite is registered (so a revocation's composite never holds one fitted to
                the revoked owner's captions)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.fileio import atomic_write
from cdm.platform.workspace.paths import Workspace

BASE_FILES = "meta.json"  # the base version's record: {"components": {relative path: sha256}, "image_size"}
PRIOR_ARTIFACT = "prior.safetensors"


@dataclass
class TextBase:
    parts: dict  # {unet, vae, text_encoder, tokenizer, scheduler}, eval mode, frozen
    version: str  # of cdm-init
    sha256: str  # `cdm.text.base.base_sha256` of its folder: what a compartment names as its base

    def record(self) -> dict:
        return {"model": registry.INIT, "version": self.version, "sha256": self.sha256}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        from cdm.text.base import latent_size

        vae = self.parts["vae"]
        size = vae.config.sample_size
        side = latent_size(vae, size[0] if isinstance(size, (list, tuple)) else size)
        return (vae.config.latent_channels, side, side)


def pipeline_folder(files: Path) -> Path:
    """The StableDiffusionPipeline folder inside a `cdm-init` version's `artifacts/` (logged under its own name)."""
    folder = next((d for d in Path(files).iterdir() if (d / "model_index.json").is_file()), None)
    if folder is None:
        raise ValueError(f"{registry.INIT}: this version holds no text-to-image pipeline folder")
    return folder


def load_base_folder(folder: Path, meta: dict) -> dict:
    """The parts of a registered base folder, refused when any file differs from the version's record."""
    from cdm.text.base import component_hashes, load_base

    if component_hashes(folder) != meta["components"]:
        raise ValueError(f"{registry.INIT}: the base's files differ from their record; refusing to load")
    return load_base(folder, meta.get("image_size"))


def load_text_base(c, tmp_root: Path | None, version: str | None = None) -> TextBase:
    """`cdm-init` (the version named, else `current`) as a `TextBase`, checked against its record and its tag."""
    from cdm.text.base import base_sha256

    mv = (registry.alias_version(c, registry.INIT, registry.CURRENT) if version is None
          else c.get_model_version(registry.INIT, version))
    if mv is None:
        raise WorkspaceError("no text-to-image base is registered; run `cdm pretrain SOURCE` or "
                             "`cdm pretrain --from DIR --trained-on TEXT` first")
    with registry.model_files(c, registry.INIT, str(mv.version), tmp_root) as files:
        folder = pipeline_folder(files)
        parts = load_base_folder(folder, json.loads((files / BASE_FILES).read_text()))
        sha = base_sha256(folder)
    if sha != mv.tags.get("cdm.weights_sha256"):
        raise ValueError(f"{registry.INIT} v{mv.version}: the base's hash differs from its tag; refusing to load")
    return TextBase(parts, str(mv.version), sha)


# -- latents --------------------------------------------------------------------------------------------------------
def latents_path(ws: Workspace, owner: str, base: TextBase) -> Path:
    return ws.latents_dir / ws.owner_key(owner) / f"{base.sha256[:16]}.safetensors"


def owner_latents(ctx: Context, owner: str, data, base: TextBase) -> torch.Tensor:
    """The latents [N, C, h, w] of an owner's images (`data`: a CaptionedDataset) under `base`: read from the cache,
    the missing ones encoded (the VAE posterior's mean) and the cache rewritten atomically (0600) — only while the
    owner is admitted (`gate.admit_owners`: no revocation of hers accepted, under the workspace lock), so a cache
    the purge deleted is never written again by a training that was running meanwhile (it is refused instead)."""
    from safetensors.torch import load_file, save

    from cdm.platform.models import gate
    from cdm.text.train import encode_latents

    ws = ctx.ws
    path = latents_path(ws, owner, base)
    cached = load_file(str(path)) if path.is_file() else {}
    missing = [i for i, sid in enumerate(data.ids) if sid not in cached]
    if missing:
        z = encode_latents(base.parts["vae"], data.x[missing])
        cached.update({data.ids[i]: z[j].contiguous() for j, i in enumerate(missing)})
        with gate.admit_owners(ctx, [ws.owner_key(owner)]):
            atomic_write(path, save({sid: cached[sid] for sid in data.ids}))
    return torch.stack([cached[sid] for sid in data.ids])


# -- compartments ---------------------------------------------------------------------------------------------------
def text_train_config(ctx: Context, steps: int | None):
    from cdm.text.train import TextTrainConfig, text_adapter

    t = ctx.params.train
    return TextTrainConfig(steps=steps or t.steps, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                           adapter=text_adapter(t.lora_rank) if t.compartment == "lora" else None,
                           mixed_precision=t.mixed_precision)


MIN_VALIDATION_IMAGES = 20  # smaller shards train on every image for `train.steps` (no stopping rule)
VALIDATION_SHARE = 0.1


def validation_split(ids: list[str]) -> torch.Tensor:
    """[N] bool: the images held out for the stopping rule, chosen by content hash (about VALIDATION_SHARE of
    them, at least 4), so a retrain on the same images holds out the same ones; none under MIN_VALIDATION_IMAGES."""
    if len(ids) < MIN_VALIDATION_IMAGES:
        return torch.zeros(len(ids), dtype=torch.bool)
    k = max(4, round(VALIDATION_SHARE * len(ids)))
    ranked = sorted(range(len(ids)), key=lambda i: hashlib.sha256(("val:" + ids[i]).encode()).hexdigest())
    held = torch.zeros(len(ids), dtype=torch.bool)
    held[ranked[:k]] = True
    return held


def captioned_data(ws: Workspace, owners: list[str], image_size: int):
    """(CaptionedDataset of every owner's samples, owner index [N])."""
    from cdm.text.captions import CaptionedDataset

    parts = [ws.load_captioned(o, image_size) for o in owners]
    index = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(parts)])
    return CaptionedDataset.concat(parts), index


def text_data_hash(ws: Workspace, owners: list[str], data, index: torch.Tensor) -> str:
    """Which owner contributed which image with which caption."""
    keys = [ws.owner_key(o) for o in owners]
    rows = sorted(f"{keys[int(i)]}:{sid}:{hashlib.sha256(cap.encode()).hexdigest()}"
                  for i, sid, cap in zip(index, data.ids, data.captions))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def train_and_register_text(ctx: Context, name: str, owners: list[str], steps: int | None = None,
                            progress: bool = False) -> dict:
    """Train one text compartment (or the paragon) on `owners`' captioned images and register it: a LoRA adapter
    alone (`adapter/`) or a full UNet (`unet/`), with `meta.json` naming the base version and hash. Skipped when
    the latest version has the same data and config hashes. Same summary as `shards.train_and_register`."""
    from cdm.platform.models import cleanup, gate
    from cdm.text.train import encode_captions, train_unet

    if not owners:
        raise WorkspaceError(f"{name}: no owners to train on")
    ws, c = ctx.ws, ctx.client
    keys = [ws.owner_key(o) for o in owners]
    with gate.admit_owners(ctx, keys):  # refused now rather than after the training
        pass
    base = load_text_base(c, ws.tmp_dir)
    data, index = captioned_data(ws, owners, ctx.params.data.image_size)
    tcfg = text_train_config(ctx, steps)
    dhash = text_data_hash(ws, owners, data, index)
    chash = hashlib.sha256(json.dumps({"train": asdict(tcfg), "base": base.sha256}, sort_keys=True,
                                      default=str).encode()).hexdigest()
    if (skipped := registry.unchanged(c, name, dhash, chash)) is not None:
        return skipped
    shard_id = name.removeprefix(registry.SHARD_PREFIX)
    kind = "paragon" if name == registry.PARAGON else "shard"
    latents = torch.cat([owner_latents(ctx, o, data.subset((index == i).nonzero().flatten().tolist()), base)
                         for i, o in enumerate(owners)])  # [N, C, h, w], in the order of `data`
    p = base.parts
    cond = encode_captions(p["tokenizer"], p["text_encoder"], data.captions)  # [N, L, D]
    uncond = encode_captions(p["tokenizer"], p["text_encoder"], [""])  # [1, L, D]
    run_tags = {"cdm.kind": kind, "cdm.shard": shard_id, "cdm.owner_keys": json.dumps(sorted(keys))}
    counts = {k: int((index == i).sum()) for i, k in enumerate(keys)}
    held = validation_split(data.ids)
    train_rows = (~held).nonzero().flatten()
    val = (latents[held], cond[held]) if held.any() else None
    try:
        with registry.start_run(ctx.experiment_id, f"train-{shard_id}", run_tags) as run:
            result = train_unet(copy.deepcopy(p["unet"]), latents[train_rows], cond[train_rows], uncond,
                                p["scheduler"], tcfg, progress=progress, desc=shard_id, val=val)
            if val is not None and not math.isfinite(dict(result.val_losses)[result.best_step]):
                raise RuntimeError(f"{shard_id}: the held-out loss is not finite; nothing registered")
            with ws.tempdir() as tmp:
                folder, record = stored_text_weights(result, tcfg, base, Path(tmp))
                meta = Path(tmp) / "meta.json"
                meta.write_text(json.dumps(record))
                tags = {
                    "cdm.owner_keys": json.dumps(sorted(keys)),
                    "cdm.owner_counts": json.dumps(counts, sort_keys=True),
                    "cdm.data_hash": dhash, "cdm.config_hash": chash, "cdm.samples": str(len(data)),
                    "cdm.class_counts": "[]", "cdm.code_version": registry.code_version(),
                    "cdm.slice_keys": "[]", "cdm.resumed_from_slice": "0",
                    "cdm.weights_sha256": record["weights_sha256"], "cdm.compartment": record["kind"],
                    "cdm.conditioning": "text",
                    "cdm.init": f"{registry.INIT} v{base.version} (public data)",
                    "cdm.base": f"{registry.INIT}/{base.version}", "cdm.base_version": base.version,
                    "cdm.base_sha256": base.sha256,
                }
                if val is not None:  # the stopping rule's record: where it stopped and what it kept
                    tags.update({"cdm.best_step": str(result.best_step), "cdm.stopped": result.stopped,
                                 "cdm.val_images": str(int(held.sum())),
                                 "cdm.val_loss_base": f"{result.val_losses[0][1]:.6f}",
                                 "cdm.val_loss_kept": f"{dict(result.val_losses)[result.best_step]:.6f}"})
                else:
                    tags["cdm.stopped"] = f"steps (no validation split under {MIN_VALIDATION_IMAGES} images)"
                if result.adapter is not None:
                    tags.update({"cdm.adapter_parameters": str(record["parameters"]),
                                 "cdm.adapter_bytes": str(record["bytes"])})
                window = min(50, len(result.losses))
                logged = registry.log_model(
                    c, run, name, model_code="text.py", artifacts={folder.name: str(folder), "meta": str(meta)},
                    params={"owners": len(owners), "samples": len(data), "train": json.dumps(asdict(tcfg),
                                                                                             default=str),
                            "config_hash": chash, "base": f"{registry.INIT}/{base.version}"},
                    metrics={"train_loss": result.losses,
                             **({"val_loss": [v for _, v in result.val_losses]} if val is not None else {})},
                    files=[], version_tags=tags,
                    summary={"train_seconds": result.seconds}, signature_kind="text",
                    admit=lambda: gate.admit_run(ctx, keys, run.info.run_id))
    except gate.Refused as refused:
        # A revocation of one of these owners was accepted while this trained: the run and its model go.
        cleanup.discard_run(c, ctx.backend, ctx.experiment_id, refused.run_id)
        raise
    return {"name": name, "version": logged.version, "skipped": False, "seconds": round(result.seconds, 2),
            "steps_run": len(result.losses), "resumed_from_slice": 0,
            "final_loss": round(sum(result.losses[-window:]) / window, 4), "run_id": logged.run_id}


def stored_text_weights(result, tcfg, base: TextBase, tmp: Path) -> tuple[Path, dict]:
    """What a text compartment registers: the LoRA adapter alone (`adapter/`) or the fine-tuned UNet (`unet/`), and
    its record for `meta.json`: {kind, weights_sha256, base {model, version, sha256}[, parameters, bytes]}."""
    from cdm.adapters import save_adapter, size
    from cdm.platform.models.weights import ADAPTER_ARTIFACT, UNET_ARTIFACT, WEIGHTS_FILE, adapter_sha256, sha256_file

    if result.adapter is None:
        folder = tmp / UNET_ARTIFACT
        result.unet.save_pretrained(str(folder), safe_serialization=True)
        return folder, {"kind": "full", "weights_sha256": sha256_file(folder / WEIGHTS_FILE), "base": base.record()}
    folder = save_adapter(result.adapter, tcfg.adapter, tmp / ADAPTER_ARTIFACT)
    return folder, {"kind": "lora", "weights_sha256": adapter_sha256(folder, base.record()), "base": base.record(),
                    **size(result.adapter)}


def load_text_compartment(files: Path, weights_sha256: str | None, base: TextBase):
    """A registered text compartment's UNet (`files`: its model's `artifacts/`): the adapter merged into a copy of
    `base`'s UNet, or the full UNet; its weights checked against `weights_sha256` and its base against `base`."""
    from cdm.adapters import merged
    from cdm.platform.models.weights import ADAPTER_ARTIFACT, UNET_ARTIFACT, WEIGHTS_FILE, adapter_sha256, sha256_file

    files = Path(files)
    record = json.loads((files / "meta.json").read_text())
    if record["base"]["sha256"] != base.sha256:
        raise ValueError(f"this compartment adapts {registry.INIT} v{record['base']['version']}, not the base "
                         f"loaded (v{base.version}); refusing to load")
    if (files / ADAPTER_ARTIFACT).is_dir():
        folder = files / ADAPTER_ARTIFACT
        if weights_sha256 is not None and adapter_sha256(folder, record["base"]) != weights_sha256:
            raise ValueError(f"{folder}: the adapter does not match the recorded {weights_sha256[:12]}…; "
                             "refusing to load")
        return merged(copy.deepcopy(base.parts["unet"]), folder).requires_grad_(False)
    from diffusers import UNet2DConditionModel

    folder = files / UNET_ARTIFACT
    if weights_sha256 is not None and sha256_file(folder / WEIGHTS_FILE) != weights_sha256:
        raise ValueError(f"{folder}: weights differ from the recorded {weights_sha256[:12]}…; refusing to load")
    return UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                low_cpu_mem_usage=False).eval().requires_grad_(False)


# -- the prompt prior of a composite --------------------------------------------------------------------------------
def train_spec_prior(ctx: Context, spec: dict, path: Path) -> Path:
    """p(i | c) for the spec's shards, fitted on the captions of each shard's owners that are still active (a
    revoked owner's captions never enter it), saved as safetensors {linear.weight, linear.bias, shares}."""
    from safetensors.torch import save_file

    from cdm.platform.models import gate
    from cdm.text.compose import PromptPriorConfig, pooled, train_prompt_prior
    from cdm.text.train import encode_captions, tokenize

    ws = ctx.ws
    base = load_text_base(ctx.client, ws.tmp_dir, spec["base"]["version"])
    tok, te = base.parts["tokenizer"], base.parts["text_encoder"]
    by_key = {ws.owner_key(o): o for o in gate.active_owners(ws)}
    features, index = [], []
    for i, shard in enumerate(spec["shards"]):
        captions = [cap for key in sorted(shard["owners"]) if key in by_key
                    for cap in ws.captions(by_key[key]).values()]
        if not captions:
            raise WorkspaceError(f"shard {shard['id']}: no active owner's captions to fit the prompt prior on")
        states = encode_captions(tok, te, captions)
        features.append(pooled(states, tokenize(tok, captions), tok.eos_token_id))
        index.append(torch.full((len(captions),), i, dtype=torch.long))
    prior = train_prompt_prior(torch.cat(features), torch.cat(index), len(spec["shards"]),
                               PromptPriorConfig(seed=ctx.params.train.seed))
    save_file({k: v.contiguous() for k, v in prior.state_dict().items()}, str(path))
    return path


def load_prior(path: Path):
    from safetensors.torch import load_file

    from cdm.text.compose import PromptPrior

    state = load_file(str(path))
    prior = PromptPrior(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
    prior.load_state_dict(state)
    return prior.eval().requires_grad_(False)
