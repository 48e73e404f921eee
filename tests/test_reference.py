"""The reference ("torch") backend against independent oracles, and the layer-masking
invariants (checked on the reference and on every compiled backend).

Oracles are written here from the paper's description (loops, float64), not from the code.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import masked_ops as mo
from masked_ops.backends import reference as R
from op_cases import (MODES, POISONS, ConvCase, available_backends, cycle_product, make_conv_params, make_input,
                      make_mask, poison)

BACKENDS = ["torch"] + available_backends(["cpp"])


# ----------------------------------------------------------------------------- oracles
def paper_fill(x: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """The paper's neighbour fill, transcribed pixel by pixel.

    Start from x with removed pixels zeroed. In each iteration, every pixel that is not
    known but has known pixels among its 8 neighbours takes their mean (values as they were
    at the start of the iteration) and becomes known.
    """
    n, c, h, w = x.shape
    known = [[[bool(mask[i, 0, a, b]) for b in range(w)] for a in range(h)] for i in range(n)]
    val = torch.zeros_like(x)
    for i, a, b in itertools.product(range(n), range(h), range(w)):
        if known[i][a][b]:
            val[i, :, a, b] = x[i, :, a, b]
    for _ in range(iters):
        new_val, new_known = val.clone(), [[row[:] for row in plane] for plane in known]
        for i, a, b in itertools.product(range(n), range(h), range(w)):
            if known[i][a][b]:
                continue
            nbrs = [(a + da, b + db) for da in (-1, 0, 1) for db in (-1, 0, 1)
                    if (da or db) and 0 <= a + da < h and 0 <= b + db < w and known[i][a + da][b + db]]
            if nbrs:
                new_val[i, :, a, b] = sum(val[i, :, p, q] for p, q in nbrs) / len(nbrs)
                new_known[i][a][b] = True
        val, known = new_val, new_known
    return val


def renorm_conv_loops(x, mask, weight, bias, stride, padding, dilation, groups, padding_visible=False):
    """Partial convolution by its definition, one output window at a time."""
    n, c_in, h, w = x.shape
    c_out, cpg, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.zeros(n, c_out, ho, wo, dtype=x.dtype)
    opg = c_out // groups
    for i, oh, ow in itertools.product(range(n), range(ho), range(wo)):
        acc = torch.zeros(c_out, dtype=x.dtype)
        visible = 0
        for a, b in itertools.product(range(kh), range(kw)):
            ih, iw = oh * stride[0] - padding[0] + a * dilation[0], ow * stride[1] - padding[1] + b * dilation[1]
            inside = 0 <= ih < h and 0 <= iw < w
            if inside and mask[i, 0, ih, iw]:
                visible += 1
                for o in range(c_out):
                    g = o // opg
                    acc[o] += (weight[o, :, a, b] * x[i, g * cpg:(g + 1) * cpg, ih, iw]).sum()
            elif not inside and padding_visible:
                visible += 1
        has_visible = any(mask[i, 0, oh * stride[0] - padding[0] + a * dilation[0],
                               ow * stride[1] - padding[1] + b * dilation[1]]
                          for a, b in itertools.product(range(kh), range(kw))
                          if 0 <= oh * stride[0] - padding[0] + a * dilation[0] < h
                          and 0 <= ow * stride[1] - padding[1] + b * dilation[1] < w)
        if has_visible:
            out[i, :, oh, ow] = acc * (kh * kw / visible) + (bias if bias is not None else 0)
    return out


# ----------------------------------------------------------------------------- fill vs the paper
@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "patches", "pixel"])
def test_reference_fill_is_the_papers_rule(iters, kind):
    x = make_input(2, 3, 9, 10, seed=iters)
    m = make_mask(kind, 2, 9, 10, seed=iters)
    torch.testing.assert_close(R.neighbor_fill(x, m.double(), iters), paper_fill(x, m, iters), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (7, 2, 1), (3, 1, 2)])
@pytest.mark.parametrize("kind", ["random", "patches"])
def test_fill_k_minus_1_equals_papers_k_at_kept_positions(k, stride, dilation, kind):
    """T = d*(k-1) iterations (ours) give the paper's T = k result at every position the conv keeps."""
    h, w = 11, 12
    x = make_input(2, 3, h, w, seed=k + stride)
    m = make_mask(kind, 2, h, w, seed=k * stride)
    case = ConvCase(2, 3, 4, h, w, (k, k), (stride, stride), (k // 2, k // 2), (dilation, dilation))
    weight, bias = make_conv_params(case)
    ours_iters = mo.fill_iters((k, k), (dilation, dilation))
    assert ours_iters == dilation * (k - 1)
    papers_iters = max(k, ours_iters + 1)
    with mo.set_backend("torch"):
        y, keep = mo.masked_conv2d(x, m, weight, bias, **case.kwargs(), mode="fill")
    y_paper = F.conv2d(paper_fill(x, m, papers_iters), weight, bias, **case.kwargs())
    kept = keep.expand_as(y)
    assert kept.any()
    torch.testing.assert_close(y[kept], y_paper[kept], rtol=1e-12, atol=1e-12)
    assert (y[~kept] == 0).all()


# ----------------------------------------------------------------------------- renorm vs the definition
@pytest.mark.parametrize("case,padding_visible", [
    (ConvCase(1, 4, 4, 7, 8, (3, 3), (1, 1), (1, 1)), False),
    (ConvCase(1, 4, 6, 8, 7, (3, 3), (2, 1), (1, 1), groups=2), True),
    (ConvCase(1, 3, 3, 9, 9, (3, 3), (1, 1), (2, 2), (2, 2), groups=3), False),
    (ConvCase(1, 2, 3, 7, 9, (5, 3), (1, 2), (2, 1)), True),
])
def test_reference_renorm_is_partial_convolution(case, padding_visible):
    x = make_input(case.n, case.c_in, case.h, case.w, seed=3)
    m = make_mask("random", case.n, case.h, case.w, seed=4)
    weight, bias = make_conv_params(case)
    with mo.set_backend("torch"):
        y, _ = mo.masked_conv2d(x, m, weight, bias, **case.kwargs(), mode="renorm", padding_visible=padding_visible)
    expected = renorm_conv_loops(x, m, weight, bias, case.stride, case.padding, case.dilation, case.groups,
                                 padding_visible)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_renorm_scale_is_exact_in_float64():
    from masked_ops.masks import renorm_masks

    m = make_mask("random", 2, 7, 8, seed=1).double()
    keep, scale = renorm_masks(m, (3, 3), (1, 1), (1, 1), (1, 1))
    window_sum = F.conv2d(m, torch.ones(1, 1, 3, 3, dtype=torch.float64), padding=1)
    expected = torch.where(window_sum > 0, 9.0 / window_sum.clamp_min(1), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(scale, expected, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- all-ones = plain op
_PLAIN_CASES = [ConvCase(2, 4, 6, 10, 9, (3, 3), (1, 1), (1, 1)),
                ConvCase(2, 4, 4, 11, 11, (5, 5), (2, 2), (2, 2), groups=4),
                ConvCase(1, 4, 6, 9, 9, (3, 3), (1, 1), (2, 2), (2, 2), groups=2, bias=False),
                ConvCase(2, 4, 6, 8, 8, (1, 1))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _PLAIN_CASES, ids=lambda c: c.id)
def test_all_ones_mask_is_the_plain_conv(backend, dtype, mode, case):
    x = make_input(case.n, case.c_in, case.h, case.w, dtype)
    weight, bias = make_conv_params(case, dtype)
    ones = torch.ones(case.n, 1, case.h, case.w, dtype=torch.bool)
    with mo.set_backend(backend):
        y, keep = mo.masked_conv2d(x, ones, weight, bias, **case.kwargs(), mode=mode, padding_visible=True)
    if mode == "renorm" and bias is not None:  # renorm adds the bias after its scale, in the epilogue
        plain = F.conv2d(x, weight, None, **case.kwargs()) + bias.view(1, -1, 1, 1)
    else:  # fill/zero: exactly the layer's own conv, bias included
        plain = F.conv2d(x, weight, bias, **case.kwargs())
    assert keep.all()
    assert torch.equal(y, plain)
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, **case.kwargs()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_mask_is_the_plain_pool_fill_mean(backend):
    x = make_input(2, 3, 11, 12, torch.float32)
    ones = torch.ones(2, 1, 11, 12, dtype=torch.bool)
    with mo.set_backend(backend):
        assert torch.equal(mo.neighbor_fill(x, ones, 3), x)
        assert torch.equal(mo.masked_max_pool2d(x, ones, 3, 2, 1, ceil_mode=True)[0],
                           F.max_pool2d(x, 3, 2, 1, ceil_mode=True))
        assert torch.equal(mo.masked_avg_pool2d(x, ones, 3, 2, 1)[0], F.avg_pool2d(x, 3, 2, 1))
        torch.testing.assert_close(mo.masked_mean(x, ones), x.mean(dim=(2, 3)))
        assert torch.equal(mo.masked_affine_act(x, ones, torch.full((3,), 2.0), torch.ones(3), "relu")[0],
                           F.relu(x * 2 + 1))


def test_renorm_without_padding_visible_differs_only_at_the_border():
    """The documented choice: by default the zero padding counts as removed in renorm."""
    case = _PLAIN_CASES[0]
    x = make_input(case.n, case.c_in, case.h, case.w)
    weight, bias = make_conv_params(case)
    ones = torch.ones(case.n, 1, case.h, case.w, dtype=torch.bool)
    with mo.set_backend("torch"):
        y, _ = mo.masked_conv2d(x, ones, weight, bias, **case.kwargs(), mode="renorm")
    plain = F.conv2d(x, weight, bias, **case.kwargs())
    torch.testing.assert_close(y[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1])
    assert not torch.allclose(y[..., 0, :], plain[..., 0, :])


# ----------------------------------------------------------------------------- invariance
def _all_ops(x, m, weight, bias, mode):
    """Every op's outputs for one input (a list of tensors)."""
    outs = [mo.neighbor_fill(x, m, 3)]
    for padding_visible in (False, True):
        outs += list(mo.masked_conv2d(x, m, weight, bias, stride=1, padding=1, mode=mode,
                                      padding_visible=padding_visible, activation="gelu"))
    outs += list(mo.masked_conv2d(x, m, weight, bias, stride=2, padding=2, dilation=2, mode=mode))
    scale, shift = torch.rand(x.shape[1], dtype=x.dtype) + 0.5, torch.randn(x.shape[1], dtype=x.dtype)
    outs += list(mo.masked_affine_act(x, m, scale, shift, "silu"))
    outs += list(mo.masked_max_pool2d(x, m, 3, 2, 1, ceil_mode=True))
    outs += list(mo.masked_avg_pool2d(x, m, 3, 2, 1, count_include_pad=False))
    outs.append(mo.masked_mean(x, m))
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value,layout", list(cycle_product(POISONS, ["contiguous", "channels_last"])), ids=str)
def test_removed_values_change_nothing(backend, mode, value, layout):
    case = ConvCase(2, 4, 4, 12, 13, (3, 3), bias=True)
    x = make_input(2, 4, 12, 13, torch.float32, layout)
    m = make_mask("patches", 2, 12, 13, seed=2)
    weight, bias = make_conv_params(case, torch.float32)
    with mo.set_backend(backend):
        torch.manual_seed(0)
        clean = _all_ops(poison(x, m, 0.0), m, weight, bias, mode)
        torch.manual_seed(0)
        dirty = _all_ops(poison(x, m, value), m, weight, bias, mode)
    for i, (a, b) in enumerate(zip(clean, dirty)):
        assert torch.isfinite(a.float()).all(), f"output {i} not finite"
        assert torch.equal(a, b), f"output {i} changed with {value} in the removed region"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_removed_values_change_no_gradient(backend, mode):
    """Gradients w.r.t. x, weight, bias, scale and shift ignore the removed region too."""
    case = ConvCase(2, 4, 4, 10, 10, (3, 3), bias=True)
    m = make_mask("patches", 2, 10, 10, seed=1)
    weight, bias = make_conv_params(case)
    scale, shift = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)

    def grads(value):
        leaves = [t.clone().requires_grad_() for t in (poison(make_input(2, 4, 10, 10), m, value), weight, bias,
                                                        scale, shift)]
        x, w, b, s, t = leaves
        with mo.set_backend(backend):
            y, m2 = mo.masked_conv2d(x, m, w, b, padding=1, mode=mode, activation="relu")
            z, _ = mo.masked_affine_act(y, m2, s, t, "silu")
            p, m3 = mo.masked_max_pool2d(z, m2, 3, 2, 1)
            q, m4 = mo.masked_avg_pool2d(p, m3, 2, 1, 0)
            loss = mo.masked_mean(q, m4).sum() + mo.neighbor_fill(x, m, 2).sum()
        return torch.autograd.grad(loss, leaves)

    for a, b in zip(grads(0.0), grads(float("nan"))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_all_removed_gives_zeros_not_nan(backend, mode):
    case = ConvCase(2, 4, 4, 9, 9, (3, 3))
    x = make_input(2, 4, 9, 9, torch.float32)
    zeros = torch.zeros(2, 1, 9, 9, dtype=torch.bool)
    weight, bias = make_conv_params(case, torch.float32)
    with mo.set_backend(backend):
        outs = _all_ops(poison(x, zeros, float("nan")), zeros, weight, bias, mode)
    for i, out in enumerate(outs):
        assert torch.equal(out.float(), torch.zeros_like(out, dtype=torch.float32)), f"output {i}"
