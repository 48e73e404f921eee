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


def test_a_library_that_does_not_load_says_why_and_what_to_do(monkeypatch):
    """The loader's advice fits the install: a source checkout rebuilds, a wheel user reinstalls."""
    from masked_ops.backends import compiled

    assert "make build" in compiled._how_to_fix("cpp")  # this checkout has setup.py beside the package
    assert "MASKED_OPS_CUDA=1" in compiled._how_to_fix("cuda")
    real_exists = compiled.os.path.exists
    monkeypatch.setattr(compiled.os.path, "exists", lambda p: False if p.endswith("setup.py") else real_exists(p))
    wheel = compiled._how_to_fix("cpp")
    assert "pip install --force-reinstall" in wheel and "setup.py" not in wheel and "make" not in wheel
    # which torch the library was built against, beside the torch running now
    import torch

    assert f"this is torch {torch.__version__}" in compiled._built_for()
