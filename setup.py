"""Build masked_ops and its compiled extension masked_ops._C.

The C++ CPU kernels are always built. The CUDA kernels are added when torch
was built with CUDA and a CUDA toolkit is found; MASKED_OPS_CUDA=0 skips them
and MASKED_OPS_CUDA=1 makes a missing toolkit an error (CI uses that, so CUDA
code that does not compile never lands).
"""
import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit root (the folder holding lib64/libcudart.so).

    On our machines `nvcc` on PATH is a wrapper script, so torch's own guess
    (dirname of nvcc's folder) can point at /usr/local; follow the script's
    target instead. Must run before torch.utils.cpp_extension is imported,
    which reads CUDA_HOME once.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for tok in head.split():
                if tok.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


_want_cuda = os.environ.get("MASKED_OPS_CUDA", "auto").lower()
_cuda_home = _find_cuda_home() if _want_cuda != "0" else None
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(torch.version.cuda) and _cuda_home is not None and _want_cuda != "0" and cuda_sources
    if _want_cuda == "1" and not use_cuda:
        raise RuntimeError(
            "MASKED_OPS_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={_cuda_home!r}")
    # No -std flag: torch's cpp_extension passes the standard its headers need (C++17 up to
    # torch 2.9, C++20 after).
    cxx = ["-O3", "-fopenmp"]
    extra = {"cxx": cxx}
    macros = []
    libraries = []
    if use_cuda:
        # Compile for the GPUs we are lent (Hopper) plus PTX, unless the user says otherwise.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        macros.append(("MASKED_OPS_WITH_CUDA", None))
        ext = CUDAExtension("masked_ops._C", cpu_sources + cuda_sources, extra_compile_args=extra,
                            define_macros=macros, libraries=libraries, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("masked_ops._C", cpu_sources, extra_compile_args=extra,
                           define_macros=macros, extra_link_args=["-fopenmp"])
    return [ext]


setup(
    packages=["masked_ops", "masked_ops.backends", "masked_ops.explain", "masked_ops.experiments",
              "masked_ops.triton_kernels", "masked_ops.data", "masked_ops.dataset"],
    # Our Triton kernels live in the top-level folder triton_kernels/ (DESIGN.md section 3), but
    # "triton_kernels" is also a package the Triton project publishes: install ours as
    # masked_ops.triton_kernels so the import is never ambiguous.
    package_dir={"masked_ops.triton_kernels": "triton_kernels"},
    package_data={"masked_ops.data": ["*.txt", "*.json", "*.png", "*.jpg"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
