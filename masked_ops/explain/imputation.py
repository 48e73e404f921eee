"""Pixel-space imputation strategies: ROAD's noisy linear imputation and lime's segment mean.

``noisy-linear`` (Rong, Leemann et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022; code tleemann/road_evaluation, also Quantus'
``noisy_linear_imputation``): every removed pixel is the weighted mean of its 8 neighbours that lie
inside the image (weight 1/6 for the 4 edge neighbours, 1/12 for the diagonals, normalised by the
sum of the weights of the in-image neighbours), visible neighbours entering with their values and
removed ones as unknowns. All removed pixels are solved jointly: per image and channel the sparse
system ``(D - W_RR) u = W_RV x_V`` (D the in-image weight sums, W the neighbour weights restricted
to removed (R) and visible (V) pixels). Then Gaussian noise of standard deviation ``noise``
(absolute, pixel space; default 0.01 as in ROAD; 0 gives the plain linear imputation) is added to
the removed pixels.

How it is solved here: the matrix is symmetric positive definite on every image with at least
one visible pixel (every connected removed region borders a visible pixel, because a maximal
8-connected removed region's outer neighbours are visible), so conjugate gradients solve every
image and channel, preconditioned by a geometric multigrid V-cycle (see ``_System``). Two
implementations of the same solver: on CPU tensors the fused kernel ``masked_ops::imputation_solve``
(csrc/cpu/imputation.cpp; float64 throughout, each image-channel system on its own, in parallel,
stopping on its own), elsewhere (CUDA, or the "torch" backend, or an extension without the kernel)
``_System`` in torch: all systems of a batch at once, float64 CG with a float32 V-cycle, the
operator a 3 x 3 neighbour sum done as two separable passes. Iteration stops when the largest
residual is below ``tol`` (default 1e-6, which leaves errors of about 1e-5; the tests check both
against a scipy ``spsolve`` transcription of road_evaluation's system to 1e-4 and against each other).

Documented value: an image with **no visible pixel** has no linear imputation (the system is
singular); its removed pixels get ``fallback`` (default: the dataset mean colour, what "grey"
paints), plus the noise.

Soft masks (a float mask in [0, 1]): the imputation is that of the hard mask ``mask > 0.5``
(pixels above one half are the boundary values), and the output blends
``m * x + (1 - m) * fill``. Gradients flow to the visible pixels through the solve (its backward
is one more solve with the same symmetric matrix) and to the mask through the blend; the choice
of the hard mask itself has no gradient. A 0/1 mask gives exactly ``where(mask, x, fill)``: the
removed pixels' content never enters (NaN there is harmless).

``segment-mean`` (lime's ``LimeImageExplainer`` default, ``hide_color=None``): every removed pixel
takes the mean colour of its own segment, computed over *all* the segment's original pixels (so
it is made from the removed content, like blur; it is not invariant to what the removed pixels
hold). Segments: an H x W (or N x H x W) label map set with ``strategy.segments = ...`` (the LIME
experiments set the SLIC segments of each image) or, by default, square cells of ``segment_size``
pixels (16, the removal experiments' patches).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import backends
from .._checks import check_input, check_mask
from ..images import IMAGENET_MEAN, IMAGENET_STD
from .strategies import Strategy

__all__ = ["blend", "linear_imputation", "noisy_linear_imputation", "segment_mean_fill", "ImputationStrategy",
           "NoisyLinearStrategy", "SegmentMeanStrategy"]


# ----------------------------------------------------------------------------- masks and blending
def hard_mask(mask: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W bool, True = visible: a bool mask as is, a float mask thresholded at > 0.5."""
    return mask if mask.dtype == torch.bool else mask > 0.5


def blend(images: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``m * x + (1 - m) * fill``; exactly ``where(mask, x, fill)`` for a bool or 0/1 mask.

    Where m == 0 the image is never read (NaN there is harmless, and that pixel gets no mask
    gradient: its content is unknown); elsewhere d out / d m = x - fill. ``fill`` must be finite.
    """
    if mask.dtype == torch.bool:
        return torch.where(mask, images, fill)
    m = mask.to(images.dtype)
    x = torch.where(m > 0, images, fill)
    return m * x + (1 - m) * fill


# ----------------------------------------------------------------------------- the linear system
def _stencil_sum(u: torch.Tensor) -> torch.Tensor:
    """[1 2 1]^T [1 2 1] * u with zero padding: two separable passes, in place on one new buffer each."""
    h = u * 2
    h[..., :, 1:] += u[..., :, :-1]
    h[..., :, :-1] += u[..., :, 1:]
    s = h * 2
    s[..., 1:, :] += h[..., :-1, :]
    s[..., :-1, :] += h[..., 1:, :]
    return s


def _neighbour_sum(u: torch.Tensor) -> torch.Tensor:
    """sum_j w_j u(i + j) over the 8 neighbours, zero outside the image; w = 1/6 edge, 1/12 diagonal.

    [1 2 1]^T [1 2 1] minus 4 x the centre is [[1,2,1],[2,0,2],[1,2,1]] = 12 w.
    """
    return _stencil_sum(u).sub_(u, alpha=4).div_(12)


class _Level:
    """One grid of the multigrid hierarchy: unknowns (removed pixels) and the operator (D - W) on them.

    A u = (d u - W u) r = c1 u - c2 S(u), with S the [1 2 1] x [1 2 1] stencil sum, c1 = (d + 1/3) r,
    c2 = r / 12 (d: in-image weight sums, 1 inside; r: 1 on the unknowns).
    """

    def __init__(self, removed: torch.Tensor, dtype: torch.dtype):
        self.r = removed.to(dtype)                                  # N x 1 x H x W, 1 on R
        ones = torch.ones((1, 1) + tuple(removed.shape[-2:]), dtype=dtype, device=removed.device)
        self.d = _neighbour_sum(ones)
        self.c1 = (self.d + 1 / 3) * self.r
        self.c2 = self.r / 12
        self.inv_d = self.r / self.d                                # Jacobi, zero off R
        self.shape = tuple(removed.shape[-2:])

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.c1 * u, self.c2, _stencil_sum(u), value=-1)

    def dense_inverse(self) -> torch.Tensor:
        """N x K x K inverse of this (small) grid's matrix, identity rows off the unknowns."""
        h, w = self.shape
        k = h * w
        n = self.r.shape[0]
        basis = torch.eye(k, dtype=torch.float64, device=self.r.device).view(k, 1, h, w)
        lv = _Level(self.r[:, None].expand(n, k, 1, h, w).reshape(n * k, 1, h, w) > 0, torch.float64)
        cols = lv.apply(basis.repeat(n, 1, 1, 1)).view(n, k, k)      # column j = A e_j
        a = cols.transpose(1, 2) + torch.diag_embed(1 - self.r.double().view(n, k))
        return torch.linalg.inv(a).to(self.r.dtype)


def _restrict(r: torch.Tensor) -> torch.Tensor:
    """Sum over 2 x 2 blocks (an odd side is padded with one zero row/column): P^T of _prolong."""
    h, w = r.shape[-2:]
    if h % 2 or w % 2:
        r = F.pad(r, (0, w % 2, 0, h % 2))
    rows = r[..., 0::2, :] + r[..., 1::2, :]
    return rows[..., 0::2] + rows[..., 1::2]


def _prolong(e: torch.Tensor, shape) -> torch.Tensor:
    """Piecewise-constant interpolation to the finer grid (cropped to its shape)."""
    up = F.interpolate(e, scale_factor=2, mode="nearest")
    return up[..., :shape[0], :shape[1]]


class _System:
    """(D - W) restricted to the removed pixels R of each image (shared by its channels), with a
    multigrid V-cycle as the preconditioner of conjugate gradients.

    Coarse grids: 2 x 2 blocks; a coarse cell is an unknown when all its fine pixels are (cells that
    touch a visible pixel hold a zero correction, as Dirichlet boundary); the coarse operator is
    the same normalised 8-neighbour stencil; restriction sums 2 x 2 blocks, prolongation is
    piecewise constant. That pair over-corrects (the Galerkin operator P^T A P of this stencil has
    a 2.3x larger diagonal than the re-discretised one), so the coarse correction is damped by
    COARSE_WEIGHT. Two Jacobi steps (omega = 1, the best high-frequency damping of this stencil)
    before and after the coarse correction, an exact solve on the coarsest grid (at most 8 x 8): a
    fixed, symmetric positive definite preconditioner, so CG stays CG. Measured on 224 px photos
    with 50% of 16 px patches removed (tol 1e-6): 1 sweep, weight 1: 15 iterations; 2 sweeps,
    weight 0.9: 9 (0.7: 10, 1.0: 10, 1.5: 22); 3 sweeps cost more than the iterations they save.
    The fused CPU kernel (csrc/cpu/imputation.cpp) uses the same constants.
    """

    COARSEST = 8
    SWEEPS = 2  # Jacobi steps before and after the coarse correction
    COARSE_WEIGHT = 0.9

    def __init__(self, removed: torch.Tensor, dtype: torch.dtype, mg_dtype: torch.dtype = torch.float32):
        self.fine = _Level(removed, dtype)
        self.r = self.fine.r
        self.mg_dtype = mg_dtype
        self.levels = [self.fine if mg_dtype == dtype else _Level(removed, mg_dtype)]
        rem = removed
        while max(rem.shape[-2:]) > self.COARSEST:
            h, w = rem.shape[-2:]
            vis = F.pad((~rem).to(torch.float32), (0, w % 2, 0, h % 2), value=1.0)
            rem = F.max_pool2d(vis, 2) == 0                        # all four children removed
            self.levels.append(_Level(rem, mg_dtype))
        self.coarse_inv = self.levels[-1].dense_inverse()

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        return self.fine.apply(u)

    def _vcycle(self, r: torch.Tensor, k: int) -> torch.Tensor:
        lv = self.levels[k]
        if k == len(self.levels) - 1:
            n, c, h, w = r.shape
            return (self.coarse_inv @ r.reshape(n, c, h * w).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
        e = lv.inv_d * r                                            # pre-smoothing from zero
        for _ in range(self.SWEEPS - 1):
            e.addcmul_(lv.inv_d, r - lv.apply(e))
        rc = _restrict(r - lv.apply(e)).mul_(self.levels[k + 1].r)
        e.addcmul_(_prolong(self._vcycle(rc, k + 1), lv.shape), lv.r, value=self.COARSE_WEIGHT)
        for _ in range(self.SWEEPS):                                # post-smoothing
            e.addcmul_(lv.inv_d, r - lv.apply(e))
        return e

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        return self._vcycle(r.to(self.mg_dtype), 0).to(r.dtype)

    def solve(self, b: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
        """Preconditioned CG, all systems (images x channels) at once; b zero off R."""
        dims = (-2, -1)
        u = torch.zeros_like(b)
        r = b.clone()
        z = self.precondition(r)
        p = z
        rz = (r * z).sum(dims, keepdim=True)
        for _ in range(max_iter):
            if float(r.abs().amax()) <= tol:
                break
            ap = self.apply(p)
            pap = (p * ap).sum(dims, keepdim=True)
            alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))
            u.addcmul_(alpha, p)
            r.addcmul_(alpha, ap, value=-1)
            z = self.precondition(r)
            rz_new = (r * z).sum(dims, keepdim=True)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
            p = z.addcmul_(beta, p)
            rz = rz_new
        else:
            _check_converged(float(r.abs().amax()), tol, max_iter)
        return u


class _FusedSystem:
    """The same system solved by the fused CPU kernel (csrc/cpu/imputation.cpp), float64."""

    def __init__(self, removed: torch.Tensor, dtype: torch.dtype):
        self.removed = removed.contiguous()
        self.r = removed.to(dtype)

    def solve(self, b: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
        u, resid = torch.ops.masked_ops.imputation_solve(b.double(), self.removed, tol, max_iter)
        _check_converged(float(resid.max()), tol, max_iter)
        return u.to(b.dtype)


def _check_converged(resid: float, tol: float, max_iter: int) -> None:
    if not resid <= tol:
        raise RuntimeError(f"noisy-linear: conjugate gradients did not converge in {max_iter} iterations "
                           f"(largest residual {resid:.2e} > tol {tol:.1e})")


def _fused_kernel_available(device: torch.device) -> bool:
    """The fused solve runs for CPU tensors under the "auto" and "cpp" backends, where it is built."""
    if device.type != "cpu" or backends.get_backend() not in ("auto", "cpp") or not backends.available("cpp"):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("masked_ops::imputation_solve", "CPU")
    except RuntimeError:  # an extension built before the op existed
        return False


def _system(removed: torch.Tensor, dtype: torch.dtype):
    return _FusedSystem(removed, dtype) if _fused_kernel_available(removed.device) else _System(removed, dtype)


class _Solve(torch.autograd.Function):
    """u = A^-1 b with A symmetric: the backward is one more solve (gradient to b, not to the mask)."""

    @staticmethod
    def forward(ctx, b, system, tol, max_iter):
        ctx.system, ctx.tol, ctx.max_iter = system, tol, max_iter
        return system.solve(b, tol, max_iter)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.system.solve(grad * ctx.system.r, ctx.tol, ctx.max_iter)
        return g, None, None, None


def linear_imputation(images: torch.Tensor, mask: torch.Tensor, *, fallback: Union[Sequence[float], torch.Tensor,
                      None] = IMAGENET_MEAN, tol: float = 1e-6, max_iter: Optional[int] = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """N x C x H x W fill values: ROAD's linear imputation (no noise) of the removed pixels.

    Visible pixels hold their own value; removed ones the solution of the system (module
    docstring); an image with no visible pixel gets ``fallback`` (one value per channel)
    everywhere. ``mask``: N x 1 x H x W, bool or float (thresholded at > 0.5, see ``hard_mask``).
    Differentiable in the visible pixels of ``images``. ``dtype``: the solve's precision.
    """
    check_input(images, "images")
    check_mask(mask, images, "mask", soft=True)
    if not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    visible = hard_mask(mask)
    n, c, h, w = images.shape
    if max_iter is None:
        max_iter = 2 * (h + w) + 100
    removed = ~visible
    empty = ~visible.flatten(1).any(1)                               # images with nothing visible
    solvable = removed & ~empty.view(n, 1, 1, 1)
    x = images.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=images.device)
    x_vis = torch.where(visible, x, zero)
    out = x_vis
    if bool(solvable.any()):
        system = _system(solvable, dtype)
        b = _neighbour_sum(x_vis) * system.r
        u = _Solve.apply(b, system, float(tol), int(max_iter))
        out = torch.where(solvable, u, out)
    if bool(empty.any()):
        if fallback is None:
            raise ValueError("noisy-linear: an image has no visible pixel and fallback is None")
        fb = torch.as_tensor(fallback, dtype=dtype, device=images.device).flatten()
        if fb.numel() not in (1, c):
            raise ValueError(f"fallback must have 1 or {c} values (one per channel), got {fb.numel()}")
        out = torch.where(empty.view(n, 1, 1, 1) & removed, fb.view(1, -1, 1, 1).expand(1, c, 1, 1), out)
    return out.to(images.dtype)


def noisy_linear_imputation(images: torch.Tensor, mask: torch.Tensor, *, noise: float = 0.01,
                            generator: Optional[torch.Generator] = None, **kwargs) -> torch.Tensor:
    """The imputed images: ``blend(images, mask, linear_imputation(...) + noise * N(0, 1))``.

    The noise (absolute, pixel space) goes on the removed pixels of the hard mask only.
    """
    noise = _check_noise(noise)
    fill = linear_imputation(images, mask, **kwargs)
    if noise > 0:
        eps = torch.randn(fill.shape, generator=generator, dtype=fill.dtype, device=fill.device)
        fill = fill + noise * eps * (~hard_mask(mask)).to(fill.dtype)
    return blend(images, mask, fill)


def _check_noise(noise) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0 (absolute standard deviation), got {noise!r}")
    return float(noise)


# ----------------------------------------------------------------------------- segment mean
def grid_labels(size, cell: int, device=None) -> torch.Tensor:
    """H x W labels of square ``cell`` x ``cell`` cells (the last row/column may be narrower)."""
    h, w = size
    gw = -(-w // cell)
    rows = torch.arange(h, device=device) // cell
    cols = torch.arange(w, device=device) // cell
    return rows[:, None] * gw + cols[None, :]


def segment_mean_fill(images: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """N x C x H x W: every pixel holds the mean colour of its segment (over all its pixels).

    ``segments``: H x W or N x H x W integer labels >= 0.
    """
    n, c, h, w = images.shape
    if not isinstance(segments, torch.Tensor) or segments.dtype in (torch.bool,) or segments.is_floating_point():
        raise TypeError(f"segments must be an integer tensor of labels, got "
                        f"{segments.dtype if isinstance(segments, torch.Tensor) else type(segments).__name__}")
    seg = segments.to(images.device, torch.long)
    if seg.dim() == 2 and tuple(seg.shape) == (h, w):
        seg = seg.expand(n, h, w)
    if tuple(seg.shape) != (n, h, w):
        raise ValueError(f"segments must have shape H x W = {(h, w)} or N x H x W = {(n, h, w)}, "
                         f"got {tuple(segments.shape)}")
    if bool((seg < 0).any()):
        raise ValueError("segments must be labels >= 0")
    k = int(seg.max()) + 1
    flat = seg.reshape(n, 1, h * w).expand(n, c, h * w)
    sums = torch.zeros(n, c, k, dtype=images.dtype, device=images.device).scatter_add_(
        2, flat, images.reshape(n, c, h * w))
    counts = torch.zeros(n, 1, k, dtype=images.dtype, device=images.device).scatter_add_(
        2, seg.reshape(n, 1, h * w), torch.ones(n, 1, h * w, dtype=images.dtype, device=images.device))
    means = sums / counts.clamp_min(1)
    return means.gather(2, flat).view(n, c, h, w)


# ----------------------------------------------------------------------------- strategies
class ImputationStrategy(Strategy):
    """Fill the removed pixels in pixel space (by ``composite``), normalise, run the plain model."""

    def composite(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The imputed images in pixel space (useful for pictures and debugging)."""
        images, visible = self._prepare(images, masks)
        return self._composite(images, visible)

    def _composite(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images, visible):
        return self.model(self.normalise(self._composite(images, visible)))


class NoisyLinearStrategy(ImputationStrategy):
    """``noisy-linear``: ROAD's noisy linear imputation (module docstring)."""

    name = "noisy-linear"

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, noise: float = 0.01, seed: int = 0,
                 tol: float = 1e-6):
        super().__init__(model, mean, std)
        self.noise = _check_noise(noise)
        if not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        self.tol, self.seed, self.generator = float(tol), int(seed), None

    def _composite(self, images, mask):
        if self.noise > 0 and (self.generator is None or self.generator.device != images.device):
            self.generator = torch.Generator(device=images.device).manual_seed(self.seed)
        return noisy_linear_imputation(images, mask, noise=self.noise, generator=self.generator,
                                       fallback=self.mean.tolist(), tol=self.tol)


class SegmentMeanStrategy(ImputationStrategy):
    """``segment-mean``: each removed pixel takes its segment's mean colour (module docstring)."""

    name = "segment-mean"

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, segment_size: int = 16,
                 segments: Optional[torch.Tensor] = None):
        super().__init__(model, mean, std)
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be an int >= 1 (pixels), got {segment_size!r}")
        self.segment_size = segment_size
        self.segments = segments

    def _composite(self, images, mask):
        seg = self.segments
        if seg is None:
            seg = grid_labels(images.shape[-2:], self.segment_size, images.device)
        return blend(images, mask, segment_mean_fill(images, seg))
