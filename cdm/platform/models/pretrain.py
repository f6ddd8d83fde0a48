"""The shared initialization: one UNet pretrained on public data that belongs to no owner.

With `train.init: public` every shard and the paragon start from it instead of random weights (bench/RESULTS.md:
at equal total compute it is what brings the composite close to the paragon). It holds no owner's data, so forgetting
an owner never touches it and the deletion rules of docs/design.md §5 are unchanged; for that reason a public sample that
an owner also holds is refused. Provenance: registered as `cdm-init` with the source, the sha256 of the list of
public samples (logged as `public_manifest.json`), the training config and the weights' hashes. A team that already
has a base brings it instead (`register_brought_init`): a diffusers UNet folder, checked against the workspace's
data and model, registered with its hashes and the team's statement of what it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from cdm.platform.models import registry
from cdm.config import Params
from cdm.data import Dataset, load_image_bytes, sha256_bytes
from cdm.model import save_unet
from cdm.safetensors_io import state_sha256
from cdm.schedulers import NoiseSchedule
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.data.sources import SourceFile
from cdm.platform.workspace.paths import Workspace


def public_dataset(files: list[SourceFile], params: Params) -> Dataset:
    """Decode validated source files (`<label>/<name>.png`) into a Dataset; ids are content sha256."""
    d = params.data
    rows = sorted((int(f.path.split("/")[0]), sha256_bytes(f.data), f.data) for f in files if f.path != "owner.yaml")
    if not rows:
        raise WorkspaceError("the public source holds no samples")
    x = torch.stack([load_image_bytes(data, d.image_size, d.channels) for _, _, data in rows])
    return Dataset(x, torch.tensor([y for y, _, _ in rows], dtype=torch.long), [i for _, i, _ in rows])


def owner_overlap(ws: Workspace, data: Dataset) -> list[str]:
    """Content ids of public samples that an owner of the workspace also holds."""
    held = {s["sha256"] for o in ws.owners() for s in ws.manifest(o)["samples"]}
    return sorted(set(data.ids) & held)


def train_and_register_init(ctx: Context, data: Dataset, source: str, steps: int | None = None,
                            progress: bool = True) -> dict:
    """Train the shared initialization on public `data` and register it as a new `cdm-init` version.

    Raises:
        WorkspaceError: a public sample is also an owner's sample.
    """
    from cdm.platform.models.weights import WEIGHTS_FILE, sha256_file
    from cdm.config import model_config, train_config
    from cdm.platform.models.shards import preview_grid
    from cdm.train import train_shard

    params, c = ctx.params, ctx.client
    overlap = owner_overlap(ctx.ws, data)
    if overlap:
        raise WorkspaceError(f"{len(overlap)} public sample(s) are also held by an owner (first sha256 "
                             f"{overlap[0][:12]}…); the shared initialization must contain no owner's data")
    cfg, tcfg = model_config(params), train_config(params, steps or params.train.init_steps, 1)
    with registry.start_run(ctx.experiment_id, "pretrain", {"cdm.kind": "init"}) as run, \
            ctx.ws.tempdir() as tmp:
        result = train_shard(data, cfg, tcfg, NoiseSchedule(), progress=progress, desc="init")
        unet_dir = save_unet(result.unet, Path(tmp) / "unet")
        weights_sha = sha256_file(unet_dir / WEIGHTS_FILE)
        meta = Path(tmp) / "meta.json"
        meta.write_text(json.dumps({"weights_sha256": weights_sha, "model_config": json.loads(cfg.to_json())}))
        manifest = Path(tmp) / "public_manifest.json"
        manifest.write_text(json.dumps([{"sha256": i, "label": int(y)} for i, y in zip(data.ids, data.y.tolist())],
                                       indent=1))
        grid = preview_grid(result.unet, cfg, Path(tmp) / "samples.png")
        tags = {
            "cdm.public": "true",
            "cdm.source": source,
            "cdm.public_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "cdm.samples": str(len(data)),
            "cdm.class_counts": json.dumps(data.class_counts(cfg.num_classes).tolist()),
            "cdm.config_hash": tcfg.config_hash(cfg, NoiseSchedule()),
            "cdm.code_version": registry.code_version(),
            "cdm.weights_sha256": weights_sha,
            "cdm.state_sha256": state_sha256(result.unet.state_dict()),
        }
        logged = registry.log_model(
            c, run, registry.INIT, model_code="shard.py",
            artifacts={"unet": str(unet_dir), "meta": str(meta)},
            params={"samples": len(data), "model": cfg.to_json(), "train": json.dumps(asdict(tcfg)),
                    "source": source},
            metrics={"train_loss": result.smoothed_losses()}, files=[grid, manifest], version_tags=tags,
            summary={"train_seconds": result.seconds})
        c.set_registered_model_alias(registry.INIT, registry.CURRENT, logged.version)
    return {"name": registry.INIT, "version": logged.version, "samples": len(data), "steps": tcfg.steps,
            "seconds": round(result.seconds, 2), "state_sha256": tags["cdm.state_sha256"], "run_id": logged.run_id}


def check_brought_unet(folder: str | Path, params: Params):
    """A user's diffusers UNet folder (`save_pretrained` layout) as a UNet the workspace's shards can start from.

    Raises:
        WorkspaceError: one line naming what does not fit (not a diffusers UNet folder, sample size, channels,
            class embedding, or an architecture other than the workspace's model).
    """
    from cdm.config import model_config
    from cdm.model import build_unet, load_unet

    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    try:  # a regular, small file (not a FIFO or a link to a device), parsed without trusting its depth
        small = config_file.is_file() and config_file.stat().st_size < 1_000_000
        config = json.loads(config_file.read_text()) if small else None
    except (OSError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict) or config.get("_class_name") != "UNet2DModel" or not weights.is_file():
        raise WorkspaceError(f"{folder} is not a diffusers UNet folder (save_pretrained layout: config.json naming "
                             "UNet2DModel and diffusion_pytorch_model.safetensors)")
    d, cfg = params.data, model_config(params)
    checks = (("sample size", config.get("sample_size"), d.image_size),
              ("input channels", config.get("in_channels"), d.channels),
              ("output channels", config.get("out_channels"), d.channels),
              ("class embeddings (labels + the null label)", config.get("num_class_embeds"), cfg.num_classes + 1))
    wrong = [f"{what} {got} where the workspace's data need {want}" for what, got, want in checks if got != want]
    if wrong:
        raise WorkspaceError(f"{folder}: the UNet does not fit this workspace: {'; '.join(wrong)}")
    expected = {k: v for k, v in build_unet(cfg, seed=0).config.items() if not k.startswith("_")}
    differ = sorted(k for k in expected.keys() | {k for k in config if not k.startswith("_")}
                    if _plain(config.get(k)) != _plain(expected.get(k)))
    if differ:  # checked before anything is built: a hostile config could ask for any size
        raise WorkspaceError(f"{folder}: the UNet's architecture is not the workspace's model: "
                             f"{', '.join(f'{k} {config.get(k)!r} (ours {expected.get(k)!r})' for k in differ[:6])}"
                             f"{' …' if len(differ) > 6 else ''}; set model in params.yaml to match it")
    try:  # strict: weights missing, unexpected or of another shape than the (checked) config says are refused
        unet = load_unet(folder)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file, named in one line
        raise WorkspaceError(f"{folder}: the UNet does not load: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None
    return unet


def _plain(v):
    """A config value as JSON would hold it (tuples as lists), for comparing a brought config with ours."""
    return json.loads(json.dumps(v)) if v is not None else None


def register_brought_init(ctx: Context, folder: str | Path, trained_on: str) -> dict:
    """Register a user's own base (a diffusers UNet folder that fits the workspace, `check_brought_unet`) as a new
    `cdm-init` version: its weights' hashes, where it came from and the user's statement of its training data
    (`cdm.trained_on`), which cdm cannot check; the certificate of every revocation quotes it."""
    from cdm.config import model_config
    from cdm.platform.models.weights import WEIGHTS_FILE, sha256_file

    if not trained_on.strip():
        raise WorkspaceError("say what the base was trained on (--trained-on): the certificate quotes it")
    unet = check_brought_unet(folder, ctx.params)
    cfg = model_config(ctx.params)
    with registry.start_run(ctx.experiment_id, "pretrain-brought", {"cdm.kind": "init"}) as run, \
            ctx.ws.tempdir() as tmp:
        unet_dir = save_unet(unet, Path(tmp) / "unet")
        weights_sha = sha256_file(unet_dir / WEIGHTS_FILE)
        meta = Path(tmp) / "meta.json"
        meta.write_text(json.dumps({"weights_sha256": weights_sha, "model_config": json.loads(cfg.to_json())}))
        statement = Path(tmp) / "trained_on.txt"
        statement.write_text(trained_on.strip() + "\n")
        tags = {"cdm.public": "true", "cdm.brought": "true", "cdm.source": str(Path(folder).resolve()),
                "cdm.trained_on": " ".join(trained_on.split())[:5000],
                "cdm.trained_on_sha256": hashlib.sha256(statement.read_bytes()).hexdigest(),
                "cdm.source_weights_sha256": sha256_file(Path(folder) / "diffusion_pytorch_model.safetensors"),
                "cdm.weights_sha256": weights_sha, "cdm.state_sha256": state_sha256(unet.state_dict())}
        logged = registry.log_model(
            ctx.client, run, registry.INIT, model_code="shard.py", artifacts={"unet": str(unet_dir), "meta": str(meta)},
            params={"model": cfg.to_json(), "source": str(folder)}, metrics=None, files=[statement],
            version_tags=tags)
        ctx.client.set_registered_model_alias(registry.INIT, registry.CURRENT, logged.version)
    return {"name": registry.INIT, "version": logged.version, "brought": True, "trained_on": trained_on.strip(),
            "state_sha256": tags["cdm.state_sha256"], "run_id": logged.run_id}


# -- a text workspace's base: a StableDiffusionPipeline folder ------------------------------------------------------
def public_captioned(files: list[SourceFile], params: Params):
    """Validated public source files (PNGs beside metadata.jsonl) as a `CaptionedDataset` (ids: content sha256)."""
    from cdm.text.captions import METADATA, CaptionedDataset, parse_metadata

    meta = next((f for f in files if f.path == METADATA), None)
    captions = {r["file_name"]: r["text"] for r in parse_metadata(meta.data if meta else None,
                                                                  params.data.max_caption_chars)}
    rows = sorted((f.path, f.data) for f in files if f.path in captions)
    if not rows:
        raise WorkspaceError("the public source holds no captioned samples")
    x = torch.stack([load_image_bytes(data, params.data.image_size, 3) for _, data in rows])
    return CaptionedDataset(x, [captions[name] for name, _ in rows], [sha256_bytes(data) for _, data in rows])


def _text_base_error(e: Exception) -> WorkspaceError:
    return WorkspaceError(f"not a usable text-to-image base: {e}")


def register_text_base(ctx: Context, folder: str | Path, source: str, trained_on: str | None = None,
                       public_ids: list[str] | None = None, metrics: dict | None = None,
                       summary: dict | None = None) -> dict:
    """Register a StableDiffusionPipeline folder as a new `cdm-init` version (alias `current`): checked
    (`cdm.text.base.check_folder`, then every part loaded strictly from local safetensors and fitted to the
    workspace's images) before anything is logged; each component's sha256 and their one hash recorded. A brought
    base carries the team's statement of its training data (`trained_on`); a trained one the list of its public
    samples. Raises WorkspaceError (nothing registered) for a folder that is not such a pipeline or does not fit."""
    from cdm.text.base import BaseError, base_sha256, component_hashes, load_base

    folder = Path(folder)
    try:
        load_base(folder, ctx.params.data.image_size)
    except BaseError as e:
        raise _text_base_error(e) from None
    components = component_hashes(folder)
    brought = trained_on is not None
    with registry.start_run(ctx.experiment_id, "pretrain-brought" if brought else "pretrain",
                            {"cdm.kind": "init"}) as run, ctx.ws.tempdir() as tmp:
        meta = Path(tmp) / "meta.json"
        meta.write_text(json.dumps({"components": components, "image_size": ctx.params.data.image_size}))
        files = []
        tags = {"cdm.public": "true", "cdm.conditioning": "text", "cdm.source": source,
                "cdm.weights_sha256": base_sha256(folder), "cdm.code_version": registry.code_version(),
                "cdm.components": json.dumps({k: v[:16] for k, v in components.items()}, sort_keys=True)}
        if brought:
            statement = Path(tmp) / "trained_on.txt"
            statement.write_text(trained_on.strip() + "\n")
            files.append(statement)
            tags.update({"cdm.brought": "true", "cdm.trained_on": " ".join(trained_on.split())[:5000],
                         "cdm.trained_on_sha256": hashlib.sha256(statement.read_bytes()).hexdigest()})
        if public_ids is not None:
            manifest = Path(tmp) / "public_manifest.json"
            manifest.write_text(json.dumps([{"sha256": i} for i in public_ids], indent=1))
            files.append(manifest)
            tags.update({"cdm.public_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
                         "cdm.samples": str(len(public_ids))})
        logged = registry.log_model(
            ctx.client, run, registry.INIT, model_code="text.py", artifacts={"base": str(folder), "meta": str(meta)},
            params={"source": source, "conditioning": "text"}, metrics=metrics, files=files, version_tags=tags,
            summary=summary, signature_kind="text")
        ctx.client.set_registered_model_alias(registry.INIT, registry.CURRENT, logged.version)
    return {"name": registry.INIT, "version": logged.version, "brought": brought, "components": components,
            "base_sha256": tags["cdm.weights_sha256"], "run_id": logged.run_id,
            **({"trained_on": trained_on.strip()} if brought else {})}


def train_and_register_text_base(ctx: Context, data, source: str, steps: int | None = None,
                                 progress: bool = True) -> dict:
    """A small text-to-image base (`cdm.text.base.TextBaseConfig` at the workspace's image size, a character-level
    tokenizer of the public captions) pretrained on public captioned `data`, saved as a StableDiffusionPipeline
    folder and registered. Refuses public samples an owner also holds."""
    from cdm.text.base import TextBaseConfig, build_base, save_base, write_tokenizer
    from cdm.text.train import PretrainConfig, pretrain_base

    held = {s["sha256"] for o in ctx.ws.owners() for s in ctx.ws.manifest(o)["samples"]}
    overlap = sorted(set(data.ids) & held)
    if overlap:
        raise WorkspaceError(f"{len(overlap)} public sample(s) are also held by an owner (first sha256 "
                             f"{overlap[0][:12]}…); the shared base must contain no owner's data")
    cfg = TextBaseConfig(image_size=ctx.params.data.image_size)
    unet_steps = steps or ctx.params.train.init_steps
    # The autoencoder as many steps as the UNet, 200 to 800: on the coloured digits the attribute classifier reads
    # 0.55 of the questions right on its reconstructions after 200 steps, 0.77 after 400, 0.88 after 800.
    pcfg = PretrainConfig(unet_steps=unet_steps, vae_steps=min(800, max(200, unet_steps)),
                          seed=ctx.params.train.seed)
    with ctx.ws.tempdir() as tmp:
        parts = build_base(cfg, write_tokenizer(data.captions, Path(tmp) / "tokenizer", cfg.max_prompt_tokens),
                           seed=ctx.params.train.seed)
        info = pretrain_base(parts, data.x, data.captions, pcfg, progress=progress)
        folder = save_base(parts, Path(tmp) / "base")
        result = register_text_base(ctx, folder, source, public_ids=sorted(data.ids),
                                    metrics={"vae_loss": info["vae_losses"], "train_loss": info["unet_losses"]},
                                    summary={"train_seconds": info["seconds"]})
    return {**result, "samples": len(data), "steps": pcfg.unet_steps, "seconds": round(info["seconds"], 2)}
