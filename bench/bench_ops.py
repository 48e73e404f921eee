"""Op benchmarks at ResNet-50 layer shapes (batch 8, fp32, CPU, ~50% of 16x16 patches removed).

Each group holds one op at one shape in three implementations: plain PyTorch without a mask
("plain": F.conv2d / F.max_pool2d), the pure-PyTorch masking backend ("torch") and the fused
C++ backend ("cpp"). bench/report.py turns the JSON into median ratios within each group.

    python -m pytest bench/bench_ops.py --benchmark-only --benchmark-json=bench/results/cpu-latest.json
    python bench/report.py bench/results/cpu-latest.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import masked_ops as mo
from op_cases import patch_mask

BATCH = 8
# name: (c_in, c_out, kernel, stride, input size)
CONV_SHAPES = {
    "stem_7x7s2_3-64@224": (3, 64, 7, 2, 224),
    "3x3_64-64@56": (64, 64, 3, 1, 56),
    "3x3s2_128-128@56": (128, 128, 3, 2, 56),
    "3x3_256-256@14": (256, 256, 3, 1, 14),
    "3x3_512-512@7": (512, 512, 3, 1, 7),
    "1x1_256-64@56": (256, 64, 1, 1, 56),
}
POOL_SHAPES = {"maxpool_3s2_64@112": (64, 3, 2, 112)}
IMPLS = ("plain", "torch", "cpp")
ROUNDS = 15

needs_cpp = pytest.mark.skipif(not mo.available("cpp"), reason="compiled extension not built")


def _inputs(c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, c, size, size, generator=g)
    mask = patch_mask(BATCH, size, size, patch=16, fraction=0.5, seed=seed)
    return x, mask


def _run(benchmark, fn, group, impl, **info):
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, dtype="float32", batch=BATCH, **info)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(CONV_SHAPES))
def test_masked_conv2d_fill(benchmark, shape, impl):
    c_in, c_out, k, s, size = CONV_SHAPES[shape]
    x, mask = _inputs(c_in, size)
    w = torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    b = torch.randn(c_out)
    if impl == "plain":
        fn = lambda: F.conv2d(x, w, b, s, k // 2)  # noqa: E731
    else:
        def fn():
            with mo.set_backend(impl):
                return mo.masked_conv2d(x, mask, w, b, s, k // 2, mode="fill")
    _run(benchmark, fn, f"masked_conv2d_fill:{shape}", impl, shape=[BATCH, c_in, size, size],
         weight=[c_out, c_in, k, k], stride=s)


@needs_cpp
@pytest.mark.parametrize("impl", ("torch", "cpp"))
@pytest.mark.parametrize("shape", list(CONV_SHAPES))
def test_neighbor_fill(benchmark, shape, impl):
    c_in, _c_out, k, _s, size = CONV_SHAPES[shape]
    x, mask = _inputs(c_in, size)
    iters = mo.fill_iters((k, k))

    def fn():
        with mo.set_backend(impl):
            return mo.neighbor_fill(x, mask, iters)
    _run(benchmark, fn, f"neighbor_fill:{shape}", impl, shape=[BATCH, c_in, size, size], iters=iters)


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(POOL_SHAPES))
def test_masked_max_pool2d(benchmark, shape, impl):
    c, k, s, size = POOL_SHAPES[shape]
    x, mask = _inputs(c, size)
    if impl == "plain":
        fn = lambda: F.max_pool2d(x, k, s, 1)  # noqa: E731
    else:
        def fn():
            with mo.set_backend(impl):
                return mo.masked_max_pool2d(x, mask, k, s, 1)
    _run(benchmark, fn, f"masked_max_pool2d:{shape}", impl, shape=[BATCH, c, size, size], kernel=k, stride=s)
