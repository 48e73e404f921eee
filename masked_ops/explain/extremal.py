"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019), with any soft masking strategy.

    from masked_ops.explain import explain_extremal, get_strategy
    exp = explain_extremal(get_strategy("blur", model), image, areas=(0.05, 0.1, 0.2))
    exp.masks[0]          # A x H x W: the mask of each area (1 = kept)
    exp.heatmap()         # H x W: the mean of the area masks

For each target area ``a``, find the smooth mask of area ``a`` that keeps the target's logit highest
when the rest of the image is removed by the strategy ("preserve"), that lowers it most when the
mask's region is removed ("delete"), or both at once ("dual": the preserve reward minus the reward
with the mask inverted). The algorithm is TorchRay's ``extremal_perturbation`` (checked against
the ``torchray`` package in tests/test_extremal.py: with TorchRay's own mask generator and blur
pyramid plugged in, our loop retraces its run to 1e-4), written against the Strategy interface so
that the perturbation is whatever the strategy does with a soft mask: blending a blur, a colour,
or (with soft layer masking) dropping the activations. Beware that the optimum is not stable: on
scikit-image's cat (EfficientNet-Lite0, area 0.1, 800 steps) TorchRay's mask and TorchRay's mask
for the image plus 1e-6 of noise overlap with IoU 0.36 only (one blob or three); read one run's
mask as one of several near-optimal answers.

- **Smooth mask.** The mask is a smooth max-pooling of a coarse parameter grid (one value in
  [0, 1] per ``step`` x ``step`` cell): every pixel takes a softmax-weighted maximum (coldness 20)
  of the nearby parameters, each damped by a radial kernel exp(-2 max(d/sigma - 1/2, 0)^2) of its
  distance d to the cell centre, over a (2R+1)^2 neighbourhood, R = 1 + ceil(sigma/step). The
  mask is computed with a margin of ``sigma`` pixels around the image and clamped to [0, 1].
- **Area constraint.** The sorted mask values (margin included) are pulled towards the vector
  with a fraction ``1 - a`` of zeros then ones, a squared penalty whose weight starts at 300
  and grows by a factor 1.0035 per step. As in TorchRay, ``a`` is a fraction of the mask *with
  its margin*: a mask that lies inside the image covers up to a x (H + 2 sigma)(W + 2 sigma) / HW
  of the image (1.35 a at 224 px and sigma 21). ``info["area"]`` reports the fraction of the
  image, ``info["area_with_margin"]`` the constrained one.
- **Optimiser.** SGD, learning rate 0.01, momentum 0.9 with dampening 0.9, on the parameters
  (initialised to 1, clamped to [0, 1] after each step), all areas in one batch; on every even
  step the perturbed image is flipped left-right (jitter).
- **Reward.** "simple" (TorchRay's default): the target's logit; "contrastive": the target's
  logit minus the largest other logit.

Cost: ``iterations`` forward and backward passes of a batch of ``len(areas)`` images (twice
that for "dual"). ``preset="fast"`` (for interactive use) runs 300 iterations with the area
weight growing 1.0035^(800/300) per step, so that it ends at the same weight as the full 800.
Result: a ``MapExplanation`` (masked_ops.explain.maps) with one weight per pixel (the mean of
the area masks; TorchRay's example sums them, which ranks pixels the same way), ``masks``
(T x A x H x W) and ``info`` (final area, reward and penalty per area).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._util.progress import progress_bar
from .maps import MapExplanation, map_explanation
from .perturb import prepare_image, resolve_targets
from .soft import frozen_parameters, require_soft
from .strategies import Strategy

VARIANTS = ("preserve", "delete", "dual")
REWARDS = ("simple", "contrastive")
PRESETS = {
    "paper": dict(iterations=800, area_growth=1.0035),
    "fast": dict(iterations=300, area_growth=1.0035 ** (800 / 300)),
}
COLDNESS = 20.0


class SmoothMask:
    """Smooth-max-pooled masks from a coarse parameter grid (see the module docstring).

    ``params``: K x 1 x h x w with (h, w) = ``param_shape``; ``__call__`` returns
    (K x 1 x H x W mask over the image, K x 1 x H' x W' mask with the margin).
    """

    def __init__(self, height: int, width: int, step: int = 7, sigma: float = 21.0,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.size = (int(height), int(width))
        self.step = step
        self.sigma = float(sigma)
        self.margin = self.sigma
        self.pad = 1 + math.ceil((self.margin + self.sigma) / step)      # zero cells around the grid
        self.radius = 1 + math.ceil(self.sigma / step)                   # neighbourhood half-width
        self.param_shape = tuple(math.ceil(s / step) for s in self.size)
        # windows: one per cell of the padded grid that has a full (2R+1)^2 neighbourhood
        self.windows = tuple(s + 2 * self.pad - 2 * self.radius for s in self.param_shape)
        self.full_shape = tuple(step * n - step + 1 for n in self.windows)
        self.crop = int(round(self.margin))
        if any(f < self.crop + n for f, n in zip(self.full_shape, self.size)):
            raise ValueError(f"step={step}, sigma={sigma:g}: the smooth mask would not cover the image (its margin "
                             f"is too thin); use sigma >= 2 * step (TorchRay's default: step 7, sigma 21)")
        self.weight = self._kernel_weights().to(device=device, dtype=dtype)

    def _kernel_weights(self) -> torch.Tensor:
        """(2R+1)^2 x H' x W': the radial kernel of each neighbour's cell centre at each pixel."""
        k = 2 * self.radius + 1
        offsets = []
        for n in self.full_shape:
            u = torch.arange(n, dtype=torch.float64)
            cell = torch.div(u, self.step, rounding_mode="floor")               # window of pixel u
            j = cell[None, :] + torch.arange(k, dtype=torch.float64)[:, None] - self.pad  # k x n: cell index
            offsets.append(u[None, :] - (self.margin + self.step * j))         # distance to its centre
        dy, dx = offsets
        dist = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2)  # k x k x H' x W'
        w = torch.exp(-2.0 * (dist / self.sigma - 0.5).clamp_min(0) ** 2)
        return w.reshape(k * k, *self.full_shape).float()

    def __call__(self, params: torch.Tensor):
        k = 2 * self.radius + 1
        n = params.shape[0]
        cols = F.unfold(params, (k, k), padding=self.pad)                      # n x k^2 x (windows)
        cols = cols.view(n, k * k, *self.windows)
        # every window covers step x step pixels (nearest upsampling), the last row/column cut
        up = cols.repeat_interleave(self.step, dim=2).repeat_interleave(self.step, dim=3)
        up = up[:, :, :self.full_shape[0], :self.full_shape[1]]
        v = up * self.weight[None]
        full = (v * torch.softmax(COLDNESS * v, dim=1)).sum(dim=1, keepdim=True).clamp(0, 1)
        c = self.crop
        return full[:, :, c:c + self.size[0], c:c + self.size[1]], full


def area_reference(areas: Sequence[float], n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """A x n: for area a, int(n (1 - a)) zeros then ones (what the sorted mask is pulled towards)."""
    ref = torch.ones(len(areas), n, device=device, dtype=dtype)
    for i, a in enumerate(areas):
        ref[i, :int(n * (1 - a))] = 0
    return ref


def check_areas(areas) -> tuple:
    if isinstance(areas, (int, float)) and not isinstance(areas, bool):
        areas = (areas,)
    try:
        areas = tuple(float(a) for a in areas)
    except (TypeError, ValueError):
        raise TypeError(f"areas must be a float or a sequence of floats in (0, 1), got {areas!r}") from None
    if not areas:
        raise ValueError("areas must hold at least one area in (0, 1)")
    for a in areas:
        if not 0 < a < 1:
            raise ValueError(f"areas must lie in (0, 1) (fractions of the image), got {a!r}")
    return areas


def _reward(logits: torch.Tensor, target: int, kind: str) -> torch.Tensor:
    own = logits[:, target]
    if kind == "simple":
        return own
    others = logits.clone()
    others[:, target] = -float("inf")
    return own - others.max(dim=1).values


def explain_extremal(strategy: Strategy, image: torch.Tensor, *, targets: Union[None, int, Sequence[int]] = None,
                     areas: Sequence[float] = (0.05, 0.1, 0.2), variant: str = "preserve",
                     iterations: Optional[int] = None, seed: int = 0, preset: Optional[str] = None,
                     step: int = 7, sigma: float = 21.0, learning_rate: float = 0.01, momentum: float = 0.9,
                     area_weight: float = 300.0, area_growth: Optional[float] = None, jitter: bool = True,
                     reward: str = "simple", progress: Optional[bool] = None) -> MapExplanation:
    """Extremal perturbation masks of ``image`` (3 x H x W in [0, 1]) for each target class.

    ``iterations`` defaults to 800 (``preset="paper"``, TorchRay's default) or 300
    (``preset="fast"``); ``area_growth`` to the preset's ("fast": scaled to ``iterations`` so that
    the area weight ends where the paper's 800 steps end it). ``seed`` seeds torch's global RNG
    for the run (restored afterwards): only a strategy or model that draws random numbers
    (the "noise" fill) uses it; the optimisation itself is deterministic.
    """
    image = prepare_image(image)
    require_soft(strategy, "explain_extremal")
    areas = check_areas(areas)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)} or None, got {preset!r}")
    cfg = dict(PRESETS[preset or "paper"])
    if iterations is None:
        iterations = cfg["iterations"]
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if area_growth is None:
        # "fast" is the paper's schedule compressed: the penalty's weight ends where 800 steps end it,
        # whatever the number of steps (with 150 steps and the 300-step growth the weight stopped at a
        # quarter of it, and the "area 0.1" mask could keep far more than 10%).
        area_growth = cfg["area_growth"] if preset != "fast" else PRESETS["paper"]["area_growth"] ** (
            PRESETS["paper"]["iterations"] / iterations)
    area_growth = float(area_growth)
    targets, _ = resolve_targets(strategy, image, targets, "logit")  # (also builds a layer strategy's model)

    gen = SmoothMask(image.shape[1], image.shape[2], step, sigma, device=image.device)
    n_full = gen.full_shape[0] * gen.full_shape[1]
    ref = area_reference(areas, n_full, device=image.device)
    maps, all_masks, info = [], [], {"areas": list(areas), "variant": variant, "iterations": iterations,
                                     "reward": reward, "per_target": []}
    fork = torch.random.fork_rng(devices=[image.device] if image.device.type == "cuda" else [])
    with fork, frozen_parameters(strategy), progress_bar(iterations * len(targets), f"extremal ({strategy.name})", "step",
                                                                 enabled=progress, auto_min=100) as bar:
        torch.manual_seed(int(seed))
        for target in targets:
            masks, stats = _optimise(strategy, image, target, gen, ref, areas, variant, iterations,
                                     learning_rate, momentum, area_weight, area_growth, jitter, reward, bar)
            all_masks.append(masks)
            maps.append(masks.mean(0))
            info["per_target"].append(stats)
    return map_explanation("extremal", strategy.name, targets, torch.stack(maps), masks=torch.stack(all_masks),
                           info=info)


def _optimise(strategy, image, target, gen, ref, areas, variant, iterations, lr, momentum, weight, growth,
              jitter, reward_kind, bar):
    k = len(areas)
    params = torch.ones(k, 1, *gen.param_shape, device=image.device, requires_grad=True)
    opt = torch.optim.SGD([params], lr=lr, momentum=momentum, dampening=momentum)
    images = image[None].expand(k * (2 if variant == "dual" else 1), -1, -1, -1)
    for t in range(iterations):
        mask, full = gen(params)
        if variant == "preserve":
            m = mask
        elif variant == "delete":
            m = 1 - mask
        else:
            m = torch.cat([mask, 1 - mask])
        x = images
        if jitter and t % 2 == 0:
            x, m = x.flip(-1), m.flip(-1)
        logits = strategy(x, m)
        r = _reward(logits.float(), target, reward_kind)
        if variant == "delete":
            r = -r
        elif variant == "dual":
            r = r[:k] - r[k:]
        penalty = weight * ((full.reshape(k, -1).sort(dim=1).values - ref) ** 2).mean(dim=1)
        opt.zero_grad()
        (penalty - r).sum().backward()
        if not bool(torch.isfinite(params.grad).all()):  # a NaN step would silently ruin every mask
            raise FloatingPointError(f"extremal ({strategy.name}): the mask's gradient became non-finite at step "
                                     f"{t + 1} of {iterations} (target {int(target)})")
        opt.step()
        with torch.no_grad():
            params.clamp_(0, 1)
        weight *= growth
        bar.update(1)
    with torch.no_grad():
        mask, full = gen(params)
    stats = {"target": int(target), "area": mask.mean(dim=(1, 2, 3)).tolist(),
             "area_with_margin": full.mean(dim=(1, 2, 3)).tolist(),
             "reward": r.detach().tolist(), "penalty": penalty.detach().tolist()}
    return mask[:, 0].detach(), stats
