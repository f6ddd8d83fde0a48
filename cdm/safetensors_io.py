"""Nested state dicts (model, optimizer, EMA) in one safetensors file: tensors as tensors, the rest as JSON metadata.

Checkpoints never go through pickle, so loading one cannot execute code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_META_KEY = "cdm.tree"


def _flatten(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace each tensor in `tree` by a reference string and collect it in `tensors`."""
    if isinstance(tree, torch.Tensor):
        key = prefix or "_"
        tensors[key] = tree.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {"__dict__": [[k if isinstance(k, str) else {"__int__": k}, _flatten(v, f"{prefix}.{k}", tensors)]
                             for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)],
                "tuple": isinstance(tree, tuple)}
    return tree


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {(k["__int__"] if isinstance(k, dict) else k): _unflatten(v, tensors) for k, v in tree["__dict__"]}
        if "__list__" in tree:
            items = [_unflatten(v, tensors) for v in tree["__list__"]]
            return tuple(items) if tree["tuple"] else items
    return tree


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of a flat state dict: names, shapes and bytes, in a fixed order (independent of the file format)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_tree(tree: dict, path: str | Path) -> Path:
    """Save a nested structure of tensors, numbers, strings, lists and dicts; written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, "", tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(skeleton)})
    tmp.replace(path)
    return path


def load_tree(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads(f.metadata()[_META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unflatten(skeleton, tensors)
