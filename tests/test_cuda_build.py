"""The CUDA sources are compiled, linked and registered in the extension this session imports.

CI builds with MASKED_OPS_CUDA=1 (masked_ops._C_cuda beside masked_ops._C, on a machine without a GPU);
then every op must have a CUDA kernel. Without that setting the build is CPU-only where no GPU is
visible, and the test is skipped. The CPU library must never need CUDA: it loads with a CPU torch.
"""
import subprocess
import os

import pytest
import torch

OPS = ("neighbor_fill", "neighbor_fill_", "conv_epilogue", "conv_epilogue_", "masked_affine_act",
       "masked_max_pool2d", "masked_avg_pool2d", "masked_mean", "soft_fill", "soft_fill_backward")
# (conv_epilogue_backward is CPU-only: CUDA tensors take the torch-ops formula, which inductor fuses)


def _extension():
    try:
        from masked_ops import _C  # noqa: F401  (loading it runs the kernel registrations)
    except ImportError as exc:
        pytest.skip(f"masked_ops._C is not built: {exc}")
    import masked_ops.backends.compiled  # noqa: F401  (imports masked_ops._C_cuda when torch has CUDA)


def test_every_op_has_a_cuda_kernel_when_built_with_cuda():
    if os.environ.get("MASKED_OPS_CUDA") != "1":
        pytest.skip("the extension is built with CUDA only under MASKED_OPS_CUDA=1 (as in CI)")
    assert torch.version.cuda, "MASKED_OPS_CUDA=1 needs a CUDA build of torch"
    _extension()
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"masked_ops::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}: the CUDA sources were not built in"


def test_cuda_backend_availability_matches_the_build():
    _extension()
    import masked_ops as mo

    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("masked_ops::neighbor_fill", "CUDA")
    from masked_ops.backends import _load

    assert (_load("cuda") is not None) == has_cuda_kernels, mo.backends.unavailable_reason("cuda")
    # available() says whether the backend can run here: built kernels and a CUDA device
    assert mo.available("cuda") == (has_cuda_kernels and torch.cuda.is_available())


def test_the_cpu_library_links_nothing_of_cuda():
    # what a CPU-only torch lacks must not be needed by masked_ops._C (a wheel must load there)
    import masked_ops

    _extension()
    path = masked_ops._C.__file__
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    libs = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert libs and not [lib for lib in libs if "cuda" in lib or "cudart" in lib or "nvrtc" in lib], libs
