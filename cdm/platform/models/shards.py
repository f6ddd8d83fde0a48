"""Shards of a workspace: the plan (which owners each shard holds), and training + registering shard models and
the paragon with their provenance (docs/design.md §4).

The plan is kept in `.cdm/shards.json`. Existing shards keep their owners when new owners arrive (continual
learning: a new owner gets a new shard); owners under `min_shard_samples` are grouped into shared shards; a
revoked owner is removed from its shard, and a shard left with no owner is dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cdm.config import Params, model_config, train_config
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.fileio import atomic_write
from cdm.platform.workspace.paths import Workspace

if TYPE_CHECKING:  # torch and the diffusion core load where a function trains or samples: `cdm status` needs none
    import torch

    from cdm.data import Dataset
    from cdm.model import ModelConfig
    from cdm.schedulers import NoiseSchedule


@dataclass
class ShardData:
    data: Dataset
    owner_index: torch.Tensor  # [N] index into `owners`
    owners: list[str]

    def owner_counts(self, ws: Workspace) -> dict[str, int]:
        import torch

        counts = torch.bincount(self.owner_index, minlength=len(self.owners)).tolist()
        return {ws.owner_key(o): int(n) for o, n in zip(self.owners, counts)}


def shared_init(ctx: Context) -> dict | None:
    """The shared initialization `cdm-init@current` when `train.init` is `public`, else None."""
    if ctx.params.train.init != "public":
        return None
    from cdm.platform.models.weights import load_init

    init = load_init(ctx.client, ctx.ws.tmp_dir)
    if init is None:
        raise WorkspaceError("train.init is 'public' but no shared initialization is registered; "
                             "run `cdm pretrain SOURCE` first")
    return init


def load_plan(ws: Workspace) -> dict[str, list[str]]:
    path = ws.state_dir / "shards.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_plan(ws: Workspace, plan: dict[str, list[str]]) -> None:
    atomic_write(ws.state_dir / "shards.json", json.dumps(plan, indent=2, sort_keys=True))


def plan_shards(ws: Workspace, owner_sizes: dict[str, int], min_samples: int,
                previous: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Shard id -> owners. Keeps previous assignments of still-active owners; places new owners.

    Args:
        owner_sizes: active owners and their sample counts.
        min_samples: owners with fewer samples are grouped (greedily, in id order) until a group reaches it.
        previous: the plan so far.
    """
    plan: dict[str, list[str]] = {}
    placed = set()
    for sid, owners in (previous or {}).items():
        kept = [o for o in owners if o in owner_sizes]
        if kept:
            plan[sid] = kept
            placed.update(kept)
    group: list[str] = []
    formed: list[list[str]] = []
    for owner in sorted(o for o in owner_sizes if o not in placed):
        if owner_sizes[owner] >= min_samples:
            plan["s" + ws.owner_key(owner)[3:13]] = [owner]
        else:
            group.append(owner)
            if sum(owner_sizes[o] for o in group) >= min_samples:
                formed.append(group)
                group = []
    if group:
        # A remainder under the threshold joins the last group formed now, or stands alone.
        if formed:
            formed[-1] += group
        else:
            formed.append(group)
    for members in formed:
        plan[_group_id(ws, members)] = members
    return plan


def _group_id(ws: Workspace, owners: list[str]) -> str:
    keys = "|".join(sorted(ws.owner_key(o) for o in owners))
    return GROUP_PREFIX + hashlib.sha256(keys.encode()).hexdigest()[:10]


def load_shard_data(ws: Workspace, owners: list[str], params: Params) -> ShardData:
    import torch

    from cdm.data import Dataset

    d = params.data
    parts, index = [], []
    for i, owner in enumerate(owners):
        ds = ws.load_owner(owner, d.image_size, d.channels, d.labels)
        parts.append(ds)
        index.append(torch.full((len(ds),), i, dtype=torch.long))
    return ShardData(Dataset.concat(parts), torch.cat(index), list(owners))


GROUP_PREFIX = "g"  # ids of shards planned for several owners (they keep it when owners leave)


def owner_slices(ws: Workspace, shard_id: str, shard: ShardData, num_slices: int) -> torch.Tensor | None:
    """Slices of a group shard follow its owners in ingestion order (owner of rank r starts at slice
    r * num_slices // n_owners), so revoking a later owner resumes from the checkpoint before its data.
    A single-owner shard keeps the default (by content hash)."""
    import torch

    if not shard_id.startswith(GROUP_PREFIX):
        return None
    first_seen = {o: min(s["consent_time"] for s in ws.manifest(o)["samples"]) for o in shard.owners}
    ranked = sorted(shard.owners, key=lambda o: (first_seen[o], ws.owner_key(o)))
    start = torch.tensor([ranked.index(o) * num_slices // len(ranked) for o in shard.owners])
    return start[shard.owner_index]


def data_hash(ws: Workspace, shard: ShardData) -> str:
    """Hash of exactly which owner contributed which content to the shard."""
    keys = [ws.owner_key(o) for o in shard.owners]
    rows = sorted(f"{keys[int(i)]}:{sid}" for i, sid in zip(shard.owner_index, shard.data.ids))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def manifest_hash(ws: Workspace, owners: list[str]) -> str:
    h = hashlib.sha256()
    for owner in sorted(owners):
        h.update((ws.owner_dir(owner) / "manifest.json").read_bytes())
    return h.hexdigest()


def preview_grid(unet, cfg: ModelConfig, path: Path, steps: int = 20, seed: int = 0) -> Path:
    """A 2-row grid: one sample per label, then unconditional samples."""
    import torch

    from cdm.data import save_grid
    from cdm.model import UNetDenoiser
    from cdm.pipeline import CDMPipeline
    from cdm.schedulers import NoiseSchedule, sampling_scheduler

    labels = torch.cat([torch.arange(cfg.num_classes), torch.full((cfg.num_classes,), cfg.null_label)])
    pipe = CDMPipeline(UNetDenoiser(unet, cfg.null_label), sampling_scheduler(NoiseSchedule()),
                       (cfg.channels, cfg.image_size, cfg.image_size))
    return save_grid(pipe(labels, steps, generator=torch.Generator().manual_seed(seed)), path, nrow=cfg.num_classes)


def train_and_register(ctx: Context, name: str, owners: list[str], steps: int | None = None,
                       checkpoints: bool = True, progress: bool = False) -> dict:
    """Train one shard (or the paragon) on `owners`' data and register a version with provenance tags.

    Skips training when the latest version already has the same data and config hashes. The MLflow run is open
    for the whole training, so its duration is the training's. Returns a summary: name, version, skipped, seconds,
    steps run, resumed slice, final loss.
    """
    from cdm.platform.models import cleanup, gate, registry
    from cdm.schedulers import NoiseSchedule

    if ctx.params.data.conditioning == "text":  # a compartment on the text-to-image base
        from cdm.platform.models.text_models import train_and_register_text

        return train_and_register_text(ctx, name, owners, steps, progress)
    if not owners:
        raise WorkspaceError(f"{name}: no owners to train on")
    ws, c = ctx.ws, ctx.client
    keys = [ws.owner_key(o) for o in owners]
    with gate.admit_owners(ctx, keys):  # refused now rather than after the training
        pass
    shard = load_shard_data(ws, owners, ctx.params)
    init = shared_init(ctx)
    cfg = model_config(ctx.params)
    tcfg = train_config(ctx.params, steps, None if checkpoints else 1, init["sha256"] if init else None,
                        compartment=name != registry.PARAGON)
    schedule = NoiseSchedule()
    dhash, chash = data_hash(ws, shard), tcfg.config_hash(cfg, schedule)
    if (skipped := registry.unchanged(c, name, dhash, chash)) is not None:
        return skipped
    shard_id = name.removeprefix(registry.SHARD_PREFIX)
    kind = "paragon" if name == registry.PARAGON else "shard"
    try:
        logged, result = _train_and_log(ctx, name, shard_id, kind, shard, owners, keys, cfg, tcfg, schedule, init,
                                        chash, dhash, checkpoints, progress)
    except gate.Refused as refused:
        # An owner's revocation was accepted while this trained: the run with its model, and the checkpoints no
        # servable version uses, are discarded (the revocation's retrain resumes from an earlier slice).
        cleanup.discard_run(c, ctx.backend, ctx.experiment_id, refused.run_id)
        if checkpoints:  # what no registered version uses: this run's slices after the owner's data entered
            prune_checkpoints(ctx, shard_id, registry.versions(c, name))
        raise
    return {"name": name, "version": logged.version, "skipped": False, "seconds": round(result.seconds, 2),
            "steps_run": result.steps_run, "resumed_from_slice": result.resumed_from_slice,
            "final_loss": round(result.smoothed_losses()[-1], 4), "run_id": logged.run_id}


def _train_and_log(ctx: Context, name: str, shard_id: str, kind: str, shard: ShardData, owners: list[str],
                   keys: list[str], cfg: ModelConfig, tcfg, schedule: NoiseSchedule, init: dict | None, chash: str,
                   dhash: str, checkpoints: bool, progress: bool):
    """Train in an MLflow run and log the model; its version is created only if `gate.admit_owners` lets it."""
    from cdm.platform.data import dvc
    from cdm.platform.models import gate, registry
    from cdm.train import train_shard

    ws, c = ctx.ws, ctx.client
    run_tags = {"cdm.kind": kind, "cdm.shard": shard_id, "cdm.owner_keys": json.dumps(sorted(keys))}
    with registry.start_run(ctx.experiment_id, f"train-{shard_id}", run_tags) as run:
        result = train_shard(shard.data, cfg, tcfg, schedule,
                             checkpoint_dir=ws.checkpoints_dir / shard_id if checkpoints else None,
                             progress=progress, desc=shard_id,
                             slice_of=owner_slices(ws, shard_id, shard, tcfg.num_slices),
                             init_state=init["state"] if init else None)
        with ws.tempdir() as tmp:
            weights, compartment = stored_weights(result, tcfg, init, Path(tmp))
            weights_sha = compartment["weights_sha256"]
            meta = Path(tmp) / "meta.json"
            meta.write_text(json.dumps({**compartment, "model_config": json.loads(cfg.to_json())}))
            grid = preview_grid(result.unet, cfg, Path(tmp) / "samples.png")
            counts = shard.data.class_counts(cfg.num_classes).tolist()
            tags = {
                "cdm.owner_keys": json.dumps(sorted(shard.owner_counts(ws))),
                "cdm.owner_counts": json.dumps(shard.owner_counts(ws), sort_keys=True),
                "cdm.manifest_sha256": manifest_hash(ws, owners),
                "cdm.dvc_data_hash": dvc.data_hash(ws.root) or "",
                "cdm.data_hash": dhash,
                "cdm.samples": str(len(shard.data)),
                "cdm.class_counts": json.dumps(counts),
                "cdm.config_hash": chash,
                "cdm.code_version": registry.code_version(),
                "cdm.slice_keys": json.dumps(result.slice_keys),
                "cdm.weights_sha256": weights_sha,
                "cdm.resumed_from_slice": str(result.resumed_from_slice),
                "cdm.init": f"{registry.INIT} v{init['version']} (public data)" if init else "random",
                "cdm.compartment": compartment["kind"],
            }
            if result.adapter is not None:
                tags.update({"cdm.base": f"{registry.INIT}/{init['version']}",
                             "cdm.base_state_sha256": init["sha256"],
                             "cdm.adapter_parameters": str(compartment["parameters"]),
                             "cdm.adapter_bytes": str(compartment["bytes"])})
            logged = registry.log_model(
                c, run, name, model_code="shard.py", artifacts={weights.name: str(weights), "meta": str(meta)},
                params={"owners": len(owners), "samples": len(shard.data), "model": cfg.to_json(),
                        "train": json.dumps(asdict(tcfg)), "config_hash": chash},
                metrics={"train_loss": result.smoothed_losses()}, files=[grid], version_tags=tags,
                summary={"train_seconds": result.seconds}, admit=lambda: gate.admit_run(ctx, keys, run.info.run_id))
    return logged, result


def stored_weights(result, tcfg, init: dict | None, tmp: Path) -> tuple[Path, dict]:
    """What a trained shard registers: the full UNet folder, or a LoRA compartment's adapter alone with the base
    it needs. -> (folder, its record for `meta.json`: kind, weights_sha256 [, base, parameters, bytes])."""
    from cdm.adapters import save_adapter, size
    from cdm.model import save_unet
    from cdm.platform.models import registry
    from cdm.platform.models.weights import ADAPTER_ARTIFACT, UNET_ARTIFACT, WEIGHTS_FILE, adapter_sha256, sha256_file

    if result.adapter is None:
        folder = save_unet(result.unet, tmp / UNET_ARTIFACT)
        return folder, {"kind": "full", "weights_sha256": sha256_file(folder / WEIGHTS_FILE)}
    folder = save_adapter(result.adapter, tcfg.adapter, tmp / ADAPTER_ARTIFACT)
    base = {"model": registry.INIT, "version": init["version"], "state_sha256": init["sha256"]}
    return folder, {"kind": "lora", "weights_sha256": adapter_sha256(folder, base), "base": base,
                    **size(result.adapter)}


def prune_checkpoints(ctx: Context, shard_id: str, versions: list) -> list[str]:
    """Delete the shard's slice checkpoints that none of `versions` (registered versions of it) uses; returns the
    workspace-relative paths removed."""
    keep = {k for mv in versions for k in json.loads(mv.tags.get("cdm.slice_keys", "[]"))}
    removed = []
    for f in sorted((ctx.ws.checkpoints_dir / shard_id).glob("*.safetensors")):
        if f.stem not in keep:
            f.unlink(missing_ok=True)
            removed.append(str(f.relative_to(ctx.ws.root)))
    return removed
