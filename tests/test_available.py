"""``mo.available(name)`` says whether a backend can run *here*, not only whether it is built."""
import pytest
import torch

import masked_ops as mo
from masked_ops import backends


def test_cuda_and_triton_need_a_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not mo.available("cuda") and not mo.available("triton")
    assert "CUDA" in backends.unavailable_reason("cuda")
    assert mo.available("torch") and mo.available("auto")


def test_built_cuda_kernels_without_a_gpu_are_not_available(monkeypatch):
    if backends._load("cuda") is None:
        pytest.skip(f"the CUDA kernels are not built here: {backends.unavailable_reason('cuda')}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not mo.available("cuda")
    assert "no CUDA device" in backends.unavailable_reason("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a device: then it can run
    assert mo.available("cuda") and backends.unavailable_reason("cuda") is None


def test_on_this_machine():
    assert mo.available("cuda") == (backends._load("cuda") is not None and torch.cuda.is_available())
