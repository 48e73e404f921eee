"""The three masked-convolution modes and the size of the neighbour fill."""
from __future__ import annotations

from typing import Tuple

# Paper names: "fill" is the paper's layer masking (removed pixels filled from visible
# neighbours before every conv); "renorm" is partial convolution (Liu et al. 2018);
# "zero" is the plain conv of the zeroed input with the mask carried along.
MODES = ("fill", "renorm", "zero")


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def fill_iters(kernel: Tuple[int, int], dilation: Tuple[int, int] = (1, 1)) -> int:
    """Neighbour-fill iterations a conv needs: the farthest input pixel it reads, in pixels.

    The paper runs k iterations before a k x k conv. The fill only ever changes pixels
    that are not yet known, one ring per iteration, so after T iterations every pixel
    within Chebyshev distance T of a visible pixel is final. A kept output position has a
    visible pixel in its window and reads pixels at most d*(k-1) away from it, so
    T = d*(k-1) gives the same value as any larger T at every kept position: k-1 for an
    undilated conv (bit-identical to the paper's k), 0 for a 1x1 conv.
    """
    (kh, kw), (dh, dw) = kernel, dilation
    return max(dh * (kh - 1), dw * (kw - 1))


def saturated_rings(iters: int, h: int, w: int) -> int:
    """``iters`` capped at max(H, W) - 1: each ring grows the known region by one pixel in every
    direction, so after that many rings the fill has reached every pixel it ever can and more
    rings change nothing. Every backend caps here, so 10**9 rings cost what max(H, W) - 1 do."""
    return max(0, min(int(iters), max(int(h), int(w)) - 1))
