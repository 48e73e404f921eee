"""DiffMask checkpoints: atomic writes, reading with checks, and which model and data they belong to."""
from __future__ import annotations

import hashlib
import os
import tempfile

import torch
import torch.nn as nn

CHECKPOINT_FORMAT = "masked_ops.diffmask/1"


def fingerprint(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        a = t.detach().cpu().contiguous().float()
        h.update(str(tuple(a.shape)).encode())
        h.update(a.numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's floating-point parameters and buffers (which model a checkpoint is for)."""
    return fingerprint([v for v in model.state_dict().values() if torch.is_tensor(v) and v.is_floating_point()])


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
