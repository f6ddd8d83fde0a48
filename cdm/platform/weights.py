"""Model weights as the registry stores them: a diffusers UNet folder whose safetensors hash is recorded."""

from __future__ import annotations

import hashlib
from pathlib import Path

UNET_ARTIFACT = "unet"
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
    """The shared initialization `cdm-init@current` as {"state", "sha256", "version"} (weights verified), or None."""
    from cdm.platform import registry
    from cdm.safetensors_io import state_sha256

    mv = registry.alias_version(c, registry.INIT, registry.CURRENT)
    if mv is None:
        return None
    with registry.model_files(c, registry.INIT, str(mv.version), tmp_root) as files:
        state = load_verified_unet(files / UNET_ARTIFACT, mv.tags.get("cdm.weights_sha256")).state_dict()
    sha = state_sha256(state)
    if sha != mv.tags.get("cdm.state_sha256"):
        raise ValueError(f"{registry.INIT} v{mv.version}: loaded weights hash {sha[:12]} != recorded state hash")
    return {"state": state, "sha256": sha, "version": str(mv.version)}
