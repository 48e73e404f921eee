"""batch_size="auto" (masked_ops/explain/batching.py): timed choice, cache, limits, and unchanged results."""
import argparse
import time

import pytest
import torch
import torch.nn as nn

from masked_ops.explain import batching as B
from masked_ops.explain import explain_kernel_shap, explain_lime, explain_occlusion, explain_rise, get_strategy
from masked_ops.explain import grid_segments
from masked_ops.explain.perturb import resolve_batch_size

H = W = 24


class PacedStrategy:
    """A fake strategy whose forward of b images takes b * ms(b) milliseconds: per image fastest at 8."""

    name = "paced"

    def __init__(self, per_image_ms):
        self.model = nn.Identity()  # what the cache is keyed on
        self.per_image_ms = per_image_ms
        self.calls = []

    def __call__(self, x, masks):
        b = masks.shape[0]
        self.calls.append(b)
        time.sleep(b * self.per_image_ms(b) / 1e3)
        return torch.zeros(b, 2)


def masks_of(b):
    return torch.ones(b, 1, H, W, dtype=torch.bool)


@pytest.fixture(autouse=True)
def fresh_cache():
    B.clear_cache()
    yield
    B.clear_cache()


def test_bad_batch_sizes_are_refused_naming_the_argument():
    for bad in (0, -3, 1.5, True, "fast", "AUTO"):
        with pytest.raises(ValueError, match="batch_size"):
            resolve_batch_size(bad, torch.device("cpu"))
    assert resolve_batch_size(None, torch.device("cpu")) is None  # resolved by the run (batch_size_for)
    assert resolve_batch_size("auto", torch.device("cpu")) == "auto"
    assert resolve_batch_size(5, torch.device("cpu")) == 5


def test_auto_picks_the_fastest_per_image_stops_early_and_caches():
    # per image: 2 -> 6 ms, 4 -> 4 ms, 8 -> 2 ms (fastest), 16 -> 5 ms (much slower: the search stops)
    pace = {2: 6.0, 4: 4.0, 8: 2.0, 16: 5.0, 32: 1.0}
    s = PacedStrategy(lambda b: pace[b])
    image = torch.zeros(3, H, W)
    assert B.choose_batch_size(s, image, masks_of, work=1000) == 8
    # 32 would be faster still, but the search stopped at 16 (2.5x slower than 8): never timed
    assert 32 not in s.calls and s.calls.count(16) == 1 + B.REPEATS
    info = B.last_choice()
    assert info["size"] == 8 and not info["cached"] and set(info["ms_per_image"]) == {"2", "4", "8", "16"}
    n = len(s.calls)
    assert B.choose_batch_size(s, image, masks_of, work=1000) == 8
    assert len(s.calls) == n and B.last_choice()["cached"]  # cached: no forward at all
    # another image shape is another key: timed again
    B.choose_batch_size(s, torch.zeros(3, H, W + 8), masks_of, work=1000)
    assert len(s.calls) > n


def test_default_times_eager_models_but_not_compiled_ones_unless_asked():
    """None (the default) times a long run of an eager model; a compiled model keeps the constant (timing
    would compile it once per candidate size) unless "auto" asks; an int is taken as given."""
    pace = {2: 6.0, 4: 4.0, 8: 2.0, 16: 5.0, 32: 1.0}
    image = torch.zeros(3, H, W)
    eager = PacedStrategy(lambda b: pace[b])
    assert B.batch_size_for(None, eager, image, masks_of, work=1000) == 8 and eager.calls
    compiled = PacedStrategy(lambda b: pace[b])
    compiled.model = torch.compile(nn.Identity())  # never called here: only its type is read
    assert B.is_compiled(compiled) and not B.is_compiled(eager)
    assert B.batch_size_for(None, compiled, image, masks_of, work=1000) == B.CPU_DEFAULT and compiled.calls == []
    assert B.batch_size_for("auto", compiled, image, masks_of, work=1000) == 8 and compiled.calls
    assert B.batch_size_for(6, eager, image, masks_of, work=1000) == 6
    from masked_ops.explain import get_strategy

    layer = get_strategy("layer", torch.compile(tiny_cnn()))
    assert B.is_compiled(layer) and layer._masked is None  # found without converting the model
    with pytest.raises(ValueError, match="batch_size"):
        B.batch_size_for(0, eager, image, masks_of, work=1000)


def test_short_runs_keep_the_default_and_candidates_never_exceed_the_work():
    s = PacedStrategy(lambda b: 1.0 / b)  # per image: the bigger the faster
    image = torch.zeros(3, H, W)
    assert B.choose_batch_size(s, image, masks_of, work=B.MIN_WORK - 1) == B.CPU_DEFAULT and s.calls == []
    assert B.choose_batch_size(s, image, masks_of, work=300, candidates=(4, 64, 512)) == 64
    assert 512 not in s.calls


def tiny_cnn(classes=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()


@pytest.mark.parametrize("strategy", ["grey", "layer"])
def test_auto_gives_the_same_explanations_as_a_constant_batch(strategy):
    """Only the batching changes: the samples, masks and maps match a constant batch size to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, H, W, generator=g)
    s = get_strategy(strategy, tiny_cnn())
    seg = grid_segments(H, W, 4)
    for fn, kw in ((explain_lime, dict(segments=seg, num_samples=300)),
                   (explain_kernel_shap, dict(segments=seg, num_samples=300))):
        auto = fn(s, image, batch_size="auto", **kw)
        assert B.last_choice()["size"] in B.CPU_CANDIDATES
        fixed = fn(s, image, batch_size=7, **kw)
        torch.testing.assert_close(auto.weights, fixed.weights, rtol=1e-4, atol=1e-5)
        assert float(fixed.weights.abs().max()) > 0  # the comparison is not between two zero maps
    occ = explain_occlusion(s, image, window=3, stride=1, batch_size="auto")  # 22 x 22 = 484 windows: tuned
    torch.testing.assert_close(occ.weights, explain_occlusion(s, image, window=3, stride=1, batch_size=9).weights,
                               rtol=1e-4, atol=1e-6)


def test_rise_auto_matches_a_constant_batch():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, H, W, generator=g)
    s = get_strategy("layer", tiny_cnn(), soft=True)
    auto = explain_rise(s, image, n_masks=300, cells=4, batch_size="auto")
    fixed = explain_rise(s, image, n_masks=300, cells=4, batch_size=11)
    torch.testing.assert_close(auto.weights, fixed.weights, rtol=1e-4, atol=1e-6)
    assert float(fixed.weights.std()) > 0
    with pytest.raises(ValueError, match="batch_size"):
        explain_rise(s, image, n_masks=300, cells=4, batch_size="fastest")


def test_cli_batch_size_argument():
    from masked_ops.cli.common import batch_size_arg

    assert batch_size_arg("auto") == "auto" and batch_size_arg("12") == 12
    for bad in ("0", "x", "Auto"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto"):
            batch_size_arg(bad)


def test_the_dataset_runner_stores_auto_in_its_configuration(monkeypatch):
    """A resumed run must not be refused because timing chose another size: "auto" is what is stored."""
    import os
    import sys

    from masked_ops.dataset.explain import ImageExplainer, Settings

    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    monkeypatch.chdir(os.path.dirname(__file__))
    sys.modules.pop("dataset_helpers", None)
    ex = ImageExplainer(Settings(model="dataset_helpers:tiny_model", masking=["layer"], batch_size="auto"),
                        torch.device("cpu"))
    assert ex.config()["batch_size"] == "auto"
    ex7 = ImageExplainer(Settings(model="dataset_helpers:tiny_model", masking=["layer"], batch_size=7),
                         torch.device("cpu"))
    assert ex7.config()["batch_size"] == 7
