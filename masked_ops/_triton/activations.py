"""Activations inside Triton kernels, by code (the index of the name in masked_ops.activations)."""
import triton
import triton.language as tl


@triton.jit
def _tanh(z):
    # No tanh in tl.math across Triton 3.x (and none in the interpreter): series near 0, where
    # 1 - exp(-2|z|) would cancel, and the exponential form elsewhere. The series runs to z^17: its
    # remainder at |z| = 0.25 is ~1e-15, inside float64's accuracy rule (to z^9 it was 2e-9).
    a = tl.abs(z)
    z2 = z * z
    series = z * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (
        62.0 / 2835.0 + z2 * (-1382.0 / 155925.0 + z2 * (21844.0 / 6081075.0 + z2 * (
            -929569.0 / 638512875.0 + z2 * (6404582.0 / 10854718875.0)))))))))
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(z < 0, -big, big)
    return tl.where(a < 0.25, series, big)


@triton.jit
def activate(z, ACT: tl.constexpr):
    if ACT == 1:  # relu (NaN stays NaN, as in torch)
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:  # relu6
        z = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == 3:  # leaky_relu(0.01)
        z = tl.where(z > 0, z, z * 0.01)
    elif ACT == 4:  # silu
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 5:  # hardswish
        r = z + 3.0
        z = z * tl.where(r < 0, 0.0, tl.where(r > 6.0, 6.0, r)) / 6.0
    elif ACT == 6:  # hardsigmoid
        r = z + 3.0
        z = tl.where(r < 0, 0.0, tl.where(r > 6.0, 6.0, r)) / 6.0
    elif ACT == 7:  # sigmoid
        z = 1.0 / (1.0 + tl.exp(-z))
    elif ACT == 8:  # gelu (erf form)
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 9:  # tanh
        z = _tanh(z)
    return z
