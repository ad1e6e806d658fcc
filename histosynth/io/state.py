"""Saving and restoring nested state (training, sampling) without pickles: tensors in safetensors, the rest in JSON."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _split(tree, prefix: str, tensors: dict):
    """Replace every tensor in a nested dict/list by a reference key, collecting the tensors."""
    if isinstance(tree, torch.Tensor):
        key = prefix or "_"
        tensors[key] = tree.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {"__dict__": [[_split(k, "", {}) if not isinstance(k, str) else k, _split(v, f"{prefix}/{k}", tensors)]
                             for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]}
    return tree


def _join(tree, tensors: dict):
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {k: _join(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, dict) and "__list__" in tree:
        return [_join(v, tensors) for v in tree["__list__"]]
    return tree


def save_state(tree, folder: Path, name: str) -> None:
    """Write a nested structure of tensors and plain values as ``name.safetensors`` + ``name.json``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(tree, "", tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str):
    """Inverse of ``save_state``."""
    tensors = load_file(str(folder / f"{name}.safetensors"))
    skeleton = json.loads((folder / f"{name}.json").read_text())
    return _join(skeleton, tensors)
