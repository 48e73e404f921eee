"""The activations a fused epilogue can apply, by name (one table for every backend)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> function of a tensor. Backends with compiled epilogues support exactly these names;
# the integer codes (index in this tuple) are what the C++/CUDA/Triton kernels receive.
ACTIVATIONS = {
    "none": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "silu": F.silu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}
ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


def check_activation(name: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return name


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    return ACTIVATIONS[check_activation(name)](z)
