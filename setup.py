"""Build masked_ops and its compiled extensions, as compiled PyTorch extensions ship in wheels:

- masked_ops._C: the schemas and the CPU kernels (csrc/ops.cpp, csrc/cpu/); it links only what every
  torch build has (libc10, libtorch_cpu), so it loads with a CPU-only torch as with a CUDA one;
- masked_ops._C_cuda: the CUDA kernels (csrc/cuda/), linking libc10_cuda and the CUDA runtime; imported
  only when torch has CUDA.

Which CUDA kernels are built (MASKED_OPS_CUDA):
- "1": always (a missing CUDA torch or toolkit is an error): CI, `make test-gpu`, GPU wheels;
- "0": never;
- unset / "auto": when torch has CUDA, a toolkit is found and a GPU is visible, i.e. where they can run.
  On a machine without a GPU this skips about 6 minutes of nvcc (2 cores), and nothing is lost: the
  CUDA kernels could not run there.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

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


def _gpu_visible() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a driver problem: no GPU to build for
        return False


def _extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    can_cuda = bool(torch.version.cuda) and _cuda_home is not None and bool(cuda_sources)
    if _want_cuda == "1" and not can_cuda:
        raise RuntimeError(
            "MASKED_OPS_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={_cuda_home!r}")
    use_cuda = can_cuda and (_want_cuda == "1" or (_want_cuda not in ("0",) and _gpu_visible()))
    # No -std flag: torch's cpp_extension passes the standard its headers need (C++17 up to
    # torch 2.9, C++20 after).
    # -fno-trapping-math: without it GCC may not compute a float expression that only one side of a
    # select needs (it could raise a floating-point trap), so `keep > 0 ? act(z * m + a) : 0` stayed a
    # branch for the "none" and "leaky_relu" epilogues: 7x and 90x slower than "relu" (1.6M elements:
    # 0.73 ms and 9.5 ms against 0.11 ms; a branch per element mispredicted half the time for leaky_relu).
    # Values do not change: nothing here reads floating-point exception flags.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    # CppExtension links c10, torch, torch_cpu and torch_python only: nothing a CPU torch lacks
    # -Wl,-S: no debug sections in the libraries (Python's CFLAGS add -g: 32 MB instead of 3 MB)
    exts = [CppExtension("masked_ops._C", cpu_sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp", "-Wl,-S"])]
    if use_cuda:
        # Compile for the GPUs we are lent (Hopper) plus PTX, unless the user says otherwise.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        extra = {"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]}
        exts.append(CUDAExtension("masked_ops._C_cuda", cuda_sources, extra_compile_args=extra,
                                  extra_link_args=["-Wl,-S"]))
    return exts


def _write_build_info() -> None:
    """masked_ops/_build_info.py: which torch the extensions are built against (the loader's messages
    quote it when a library does not load, e.g. a wheel under another torch)."""
    text = (f'"""Written by setup.py at build time (not in git)."""\nTORCH_VERSION = {torch.__version__!r}\n'
            f"TORCH_CUDA = {torch.version.cuda!r}\n")
    path = os.path.join(HERE, "masked_ops", "_build_info.py")
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _dependencies():
    """torch at the minor version the extensions are built against: a wheel's libraries do not load
    with another (the C++ ABI of torch changes between minor versions), so pip must not pick one."""
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return [f"torch>={major}.{minor},<{major}.{minor + 1}", "numpy"]


_EXTENSIONS = _extensions()
_write_build_info()

setup(
    # Every subpackage lives inside masked_ops/ (the Triton kernels in masked_ops/_triton), so an
    # editable install needs no remapping and always imports from this checkout.
    packages=find_packages(include=["masked_ops", "masked_ops.*"]),
    package_data={"masked_ops.data": ["*.txt", "*.json", "*.png", "*.jpg"]},
    ext_modules=_EXTENSIONS,
    install_requires=_dependencies(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
