"""DiffMask checkpoints: the format tag and reading with checks (written with _util.io.atomic_torch_save;
which model and data they belong to: _util.fingerprint)."""
from __future__ import annotations

import os

import torch

CHECKPOINT_FORMAT = "masked_ops.diffmask/1"


def load_checkpoint(path: str) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} cannot be read as a DiffMask checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a DiffMask checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt
