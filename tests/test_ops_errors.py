"""Bad input: one test each. Every error is a ValueError/TypeError that names the argument."""
from __future__ import annotations

import pytest
import torch

import masked_ops as mo

N, C, H, W = 2, 4, 9, 9


def _x(**kw):
    return torch.randn(N, C, H, W, **kw)


def _mask(**kw):
    return torch.ones(N, 1, H, W, dtype=torch.bool, **kw)


def _weight(c_out=6, c_in=C, k=3):
    return torch.randn(c_out, c_in, k, k)


# Every public op, called with (x, mask): the mask checks must hold for each of them.
OPS = {
    "neighbor_fill": lambda x, m: mo.neighbor_fill(x, m, 2),
    "masked_conv2d": lambda x, m: mo.masked_conv2d(x, m, _weight(c_in=x.shape[1] if x.dim() == 4 else C),
                                                   padding=1),
    "masked_affine_act": lambda x, m: mo.masked_affine_act(x, m, torch.ones(C), torch.zeros(C), "relu"),
    "masked_max_pool2d": lambda x, m: mo.masked_max_pool2d(x, m, 3, 2, 1),
    "masked_avg_pool2d": lambda x, m: mo.masked_avg_pool2d(x, m, 3, 2, 1),
    "masked_mean": lambda x, m: mo.masked_mean(x, m),
}


def raises(exc, *words):
    """pytest.raises that also requires every word in the message (the argument's name, what was expected)."""
    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(exc)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self._cm.__exit__(*a)
            msg = str(self.info.value)
            for w in words:
                assert w in msg, f"message {msg!r} does not mention {w!r}"
            return handled
    return _Ctx()


@pytest.mark.parametrize("op", list(OPS))
def test_mask_wrong_shape(op):
    with raises(ValueError, "mask", str((N, 1, H, W))):
        OPS[op](_x(), torch.ones(N, 2, H, W, dtype=torch.bool))


@pytest.mark.parametrize("op", list(OPS))
def test_mask_wrong_rank(op):
    with raises(ValueError, "mask", "4 dims"):
        OPS[op](_x(), torch.ones(N, H, W, dtype=torch.bool))


@pytest.mark.parametrize("op", list(OPS))
def test_mask_wrong_dtype(op):
    with raises(TypeError, "mask", "torch.int64"):
        OPS[op](_x(), torch.ones(N, 1, H, W, dtype=torch.int64))


@pytest.mark.parametrize("op", list(OPS))
def test_mask_wrong_device(op):
    # No GPU on CI: the meta device stands in for "another device".
    with raises(ValueError, "mask", "meta", "same device"):
        OPS[op](_x(), _mask(device="meta"))


@pytest.mark.parametrize("op", list(OPS))
def test_mask_wrong_batch(op):
    with raises(ValueError, "mask", "batch size"):
        OPS[op](_x(), torch.ones(N + 1, 1, H, W, dtype=torch.bool))


@pytest.mark.parametrize("op", list(OPS))
def test_soft_mask_values(op):
    with raises(ValueError, "mask", "0", "1"):
        OPS[op](_x(), torch.full((N, 1, H, W), 0.5))


def test_mask_not_a_tensor():
    with raises(TypeError, "mask", "Tensor"):
        mo.neighbor_fill(_x(), [[1.0]], 1)


@pytest.mark.parametrize("op", list(OPS))
def test_empty_batch(op):
    with raises(ValueError, "x", "empty batch"):
        OPS[op](torch.randn(0, C, H, W), torch.ones(0, 1, H, W, dtype=torch.bool))


@pytest.mark.parametrize("op", list(OPS))
def test_integer_image(op):
    with raises(TypeError, "x", "floating"):
        OPS[op](torch.randint(0, 255, (N, C, H, W), dtype=torch.uint8), _mask())


def test_image_wrong_rank():
    with raises(ValueError, "x", "N x C x H x W"):
        mo.masked_mean(torch.randn(C, H, W), _mask())


def test_conv_kernel_larger_than_padded_input():
    with raises(ValueError, "weight", "larger than the padded input"):
        mo.masked_conv2d(_x(), _mask(), _weight(k=13), padding=1)


def test_pool_kernel_larger_than_padded_input():
    x = torch.randn(N, C, 3, 3)
    with raises(ValueError, "kernel_size", "larger than the padded input"):
        mo.masked_max_pool2d(x, torch.ones(N, 1, 3, 3, dtype=torch.bool), 5, 1, 0)


@pytest.mark.parametrize("stride", [0, -1, (1, 0)])
def test_conv_stride_not_positive(stride):
    with raises(ValueError, "stride", ">= 1"):
        mo.masked_conv2d(_x(), _mask(), _weight(), stride=stride, padding=1)


@pytest.mark.parametrize("stride", [0, -2])
def test_pool_stride_not_positive(stride):
    with raises(ValueError, "stride", ">= 1"):
        mo.masked_max_pool2d(_x(), _mask(), 3, stride, 1)


def test_negative_padding():
    with raises(ValueError, "padding", ">= 0"):
        mo.masked_conv2d(_x(), _mask(), _weight(), padding=-1)


def test_pool_padding_over_half_kernel():
    with raises(ValueError, "padding", "half the kernel"):
        mo.masked_avg_pool2d(_x(), _mask(), 3, 1, 2)


def test_groups_not_dividing_channels():
    with raises(ValueError, "groups", "divide"):
        mo.masked_conv2d(_x(), _mask(), torch.randn(6, 2, 3, 3), groups=3)


def test_weight_channels_mismatch():
    with raises(ValueError, "weight", "groups"):
        mo.masked_conv2d(_x(), _mask(), torch.randn(6, 3, 3, 3), groups=1)


def test_weight_dtype_mismatch():
    with raises(TypeError, "weight", "dtype"):
        mo.masked_conv2d(_x(), _mask(), _weight().double())


def test_bias_wrong_shape():
    with raises(ValueError, "bias", "(6,)"):
        mo.masked_conv2d(_x(), _mask(), _weight(), torch.zeros(5))


def test_unknown_mode():
    with raises(ValueError, "mode", "fill"):
        mo.masked_conv2d(_x(), _mask(), _weight(), mode="inpaint")


@pytest.mark.parametrize("op", ["conv", "affine"])
def test_unknown_activation(op):
    with raises(ValueError, "activation", "relu"):
        if op == "conv":
            mo.masked_conv2d(_x(), _mask(), _weight(), activation="swish2")
        else:
            mo.masked_affine_act(_x(), _mask(), torch.ones(C), torch.zeros(C), "swish2")


def test_affine_scale_wrong_shape():
    with raises(ValueError, "scale", f"({C},)"):
        mo.masked_affine_act(_x(), _mask(), torch.ones(C + 1), torch.zeros(C))


@pytest.mark.parametrize("iters,exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_fill_iters(iters, exc):
    with raises(exc, "iters"):
        mo.neighbor_fill(_x(), _mask(), iters)


def test_unknown_backend():
    with raises(ValueError, "backend", "cpp"):
        mo.set_backend("opencl")


@pytest.mark.skipif(not mo.available("cpp"), reason="compiled extension not built")
def test_compiled_kernels_check_again():
    """The C++ kernels are a second line of defence for callers that skip the public checks."""
    x = _x()
    with pytest.raises(RuntimeError, match="mask must have shape"):
        torch.ops.masked_ops.neighbor_fill(x, torch.ones(N, 2, H, W), 1)
    with pytest.raises(RuntimeError, match="mask must have dtype"):
        torch.ops.masked_ops.masked_mean(x, torch.ones(N, 1, H, W, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="iters must be >= 0"):
        torch.ops.masked_ops.neighbor_fill(x, torch.ones(N, 1, H, W), -1)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.masked_ops.conv_epilogue(x, torch.ones(N, 1, H, W), None, None, "swish2")
    with pytest.raises(RuntimeError, match="stride must be positive"):
        torch.ops.masked_ops.masked_max_pool2d(x, torch.ones(N, 1, H, W), [3, 3], [0, 1], [1, 1], [1, 1], False)


# ----------------------------------------------------------------------------- integer blow-ups
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_huge_fill_iterations_cost_nothing_extra(backend):
    """Rings beyond max(H, W) - 1 reach nothing new: 10**9 of them give the saturated fill, at once
    (before the cap this was killed by the out-of-memory killer), on every backend and in place."""
    if not mo.available(backend):
        pytest.skip(f"backend {backend} not built")
    import time

    from masked_ops.backends import _load

    x = torch.randn(2, 3, 16, 16)
    m = torch.zeros(2, 1, 16, 16)
    m[:, :, 0, 0] = 1  # one visible pixel in a corner: 15 rings reach the opposite one
    with mo.set_backend(backend):
        t0 = time.perf_counter()
        huge = mo.neighbor_fill(x, m, 10 ** 9)
        elapsed = time.perf_counter() - t0
        saturated = mo.neighbor_fill(x, m, 15)
        kernel = _load(backend).neighbor_fill(x, m, 10 ** 9)  # the primitive itself caps too
        in_place = _load(backend).neighbor_fill_(torch.where(m > 0, x, 0.0), m, 10 ** 9)
    assert torch.equal(huge, saturated) and torch.equal(kernel, saturated) and torch.equal(in_place, saturated)
    assert not torch.equal(saturated, mo.neighbor_fill(x, m, 14))  # 15 rings are needed: the cap is tight
    assert elapsed < 30  # generous: the point is that it finishes at all


def test_padding_that_would_dwarf_the_input_is_refused():
    with raises(ValueError, "padding", "GiB", "shape"):
        mo.masked_conv2d(_x(), _mask(), _weight(), padding=10 ** 5)
