"""A resumable training state in one safetensors file: weights, optimizer moments, RNG, and
JSON metadata (step, config, history, anything the trainer needs to continue exactly).

Written to a temporary file and renamed, so a run killed mid-write keeps its previous state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mmrag.config import Config, ConfigError


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors to `path` via a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata)
    os.replace(tmp, path)


def save_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    """Weights (`model.*`), optimizer moments (`optimizer.<param>.<slot>`), torch's RNG, and
    `meta` (JSON-encoded per key, plus the optimizer's param groups)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata["param_groups"] = json.dumps(opt["param_groups"])
    atomic_save(tensors, path, metadata)


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a state file, without loading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights (strictly), optimizer and RNG from `path`; return the metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        strict=True,
    )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return meta


def check_resumable(
    path: Path, saved: dict[str, Any], config: Config, resumable: Collection[str]
) -> None:
    """Refuse to resume the state file `path` unless `config` has the `saved` settings, except
    the `resumable` fields. The saved settings are read through the config's class, so a field
    added since the run started reads as its default."""
    before = type(config).from_dict(saved).to_dict()
    now = config.to_dict()
    changed = sorted(k for k in now if now[k] != before[k] and k not in resumable)
    if changed:
        raise ConfigError(
            f"{path} was written with a different configuration ({', '.join(changed)}); "
            "use the same settings, or another --out to start afresh"
        )
