"""Model weights as the registry stores them: a diffusers UNet folder whose safetensors hash is recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

UNET_ARTIFACT = "unet"
ADAPTER_ARTIFACT = "adapter"  # a LoRA compartment: the adapter alone; its base is a `cdm-init` version
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_verified_unet(folder: str | Path, expected_sha256: str | None):
    """Load a diffusers UNet folder, refusing weights whose hash differs from the record."""
    from cdm.model import load_unet

    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{folder}: no {WEIGHTS_FILE} (weights load through safetensors only)")
    if expected_sha256 is not None and sha256_file(weights) != expected_sha256:
        raise ValueError(f"{weights}: sha256 does not match the recorded {expected_sha256[:12]}…; refusing to load")
    return load_unet(folder).eval()


def load_init(c, tmp_root: Path | None = None) -> dict | None:
    """The shared initialization `cdm-init@current` as {"state", "sha256", "version", "unet"} (weights verified), or
    None."""
    from cdm.platform.models import registry
    from cdm.safetensors_io import state_sha256

    mv = registry.alias_version(c, registry.INIT, registry.CURRENT)
    if mv is None:
        return None
    with registry.model_files(c, registry.INIT, str(mv.version), tmp_root) as files:
        unet = load_verified_unet(files / UNET_ARTIFACT, mv.tags.get("cdm.weights_sha256"))
    state = unet.state_dict()
    sha = state_sha256(state)
    if sha != mv.tags.get("cdm.state_sha256"):
        raise ValueError(f"{registry.INIT} v{mv.version}: loaded weights hash {sha[:12]} != recorded state hash")
    return {"state": state, "sha256": sha, "version": str(mv.version), "unet": unet}


def load_compartment(c, files: Path, weights_sha256: str | None, tmp_root: Path | None = None):
    """The UNet of a registered shard from its model's `artifacts/` folder: a full UNet (`unet/`), or a LoRA
    adapter (`adapter/`) merged into the `cdm-init` version its `meta.json` names — the adapter's weights checked
    against `weights_sha256`, the base's against its own record and the state hash the adapter was trained on."""
    from cdm.adapters import merged
    from cdm.platform.models import registry
    from cdm.safetensors_io import state_sha256

    files = Path(files)
    if not (files / ADAPTER_ARTIFACT).is_dir():
        return load_verified_unet(files / UNET_ARTIFACT, weights_sha256)
    adapter = files / ADAPTER_ARTIFACT
    base = json.loads((files / "meta.json").read_text())["base"]
    if weights_sha256 is not None and adapter_sha256(adapter, base) != weights_sha256:
        raise ValueError(f"{adapter}: the adapter (weights, config or base) does not match the recorded "
                         f"{weights_sha256[:12]}…; refusing to load")
    mv = c.get_model_version(base["model"], base["version"])
    with registry.model_files(c, base["model"], base["version"], tmp_root) as base_files:
        unet = load_verified_unet(base_files / UNET_ARTIFACT, mv.tags.get("cdm.weights_sha256"))
    if state_sha256(unet.state_dict()) != base["state_sha256"]:
        raise ValueError(f"{base['model']} v{base['version']} is not the base this adapter was trained on")
    return merged(unet, adapter)


def adapter_sha256(folder: Path, base: dict) -> str:
    """The recorded hash of a LoRA compartment: its weights, its config (alpha scales the update) and the base it
    adapts (model, version, state hash) — a change to any of them is a different network."""
    from cdm.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    h = hashlib.sha256()
    for part in (sha256_file(folder / ADAPTER_WEIGHTS), sha256_file(folder / ADAPTER_CONFIG),
                 json.dumps(base, sort_keys=True)):
        h.update(part.encode())
    return h.hexdigest()
