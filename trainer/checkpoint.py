"""Checkpoints: atomic writes, and safe loads (`weights_only=True`) that refuse a different config or dataset."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another dataset or config than the run trying to resume from it."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename, so a crash mid-write never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, expect: dict | None = None, map_location: str | torch.device = "cpu") -> dict:
    """Load tensors and plain containers only; `expect` keys (e.g. fingerprint) must match what was saved."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise CheckpointMismatchError(
                f"{path}: saved {key}={state.get(key)!r} but this run has {value!r}; use another out_dir or delete it"
            )
    return state
