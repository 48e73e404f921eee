"""Memory-format helpers shared by the launchers (plain Python, no Triton)."""
import torch


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way, contiguous otherwise: kernels iterate in that order."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense(x: torch.Tensor):
    """(x made dense in its own format, the format, whether it is channels_last)."""
    fmt = dense_format(x)
    return x.contiguous(memory_format=fmt), fmt, fmt is torch.channels_last


def acc_is_fp64(x: torch.Tensor) -> bool:
    return x.dtype == torch.float64


def identity(kernel):
    return kernel
