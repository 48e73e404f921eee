"""Short content hashes: which model and which data a checkpoint or result belongs to.

The hash covers each tensor's shape and its values as float32 (so a model moved to another device or
dtype and back keeps its fingerprint); 16 hex digits of SHA-1. Resumable runs, the dataset runner and
DiffMask checkpoints store these and refuse to mix results of different models or data.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A short content hash of a sequence of tensors."""
    h = hashlib.sha1()
    for t in tensors:
        a = t.detach().cpu().contiguous().float().numpy()
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's floating-point parameters and buffers; its class name when it has none."""
    params = [v for v in model.state_dict().values() if torch.is_tensor(v) and v.is_floating_point()]
    return fingerprint(params) if params else type(model).__name__
