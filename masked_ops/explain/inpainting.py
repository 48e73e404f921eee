"""OpenCV inpainting as masking strategies: ``inpaint-telea`` and ``inpaint-ns``.

The removed pixels are painted by ``cv2.inpaint`` (Telea's fast marching method, or the
Navier-Stokes based method of Bertalmio et al.), the strongest cheap pixel-space fills in the
literature (shap's ``maskers.Image("inpaint_telea" / "inpaint_ns")`` uses the same calls).

- ``radius`` (default 3 px, shap's choice): the neighbourhood each inpainted pixel is computed from
  (cv2's ``inpaintRadius``); an int >= 1.
- Each channel is inpainted in float32 (cv2 accepts float only one channel at a time), so the fill
  is not quantised to 8 bits and visible pixels keep their exact values. Telea runs on the 0-255
  scale (OpenCV's Telea assumes the 8-bit range even for floats: on [0, 1] it returns noise), then
  is scaled back; Navier-Stokes runs on the [0, 1] values (its result depends slightly on the
  scale, by up to ~0.015 on noise images; both scales are legitimate inputs to it). The fill is
  clipped to the range of the channel's visible pixels (Telea extrapolates along gradients and
  can overshoot; the 8-bit path clips too).
- Images are inpainted one by one on the CPU (OpenCV), in a thread pool of ``workers`` threads
  (default: torch's intra-op thread count; cv2 releases the GIL), then moved back to the images'
  device and dtype.
- Documented value: an image with no visible pixel has nothing to inpaint from (OpenCV would
  return its input unchanged, i.e. the removed content); its removed pixels get ``fallback``
  (the dataset mean colour, what "grey" paints).
- Removed content never enters: it is replaced by 0 before cv2 sees the image, and cv2 only reads
  the known pixels. Soft masks: the inpainted region is the hard mask ``mask <= 0.5``, the output
  blends ``m * x + (1 - m) * fill``; the fill itself carries no gradient (OpenCV), gradients reach
  the visible pixels and the mask through the blend.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from .imputation import ImputationStrategy, blend, hard_mask
from ..images import IMAGENET_MEAN, IMAGENET_STD

METHODS = ("telea", "ns")
DEFAULT_RADIUS = 3


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - the explain extra installs it
        raise ImportError("inpainting needs OpenCV: pip install opencv-python-headless "
                          "(part of masked_ops[explain])") from e
    return cv2


def check_radius(radius) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 1:
        raise ValueError(f"inpainting radius must be an int >= 1 (pixels), got {radius!r}")
    return int(radius)


def _inpaint_one(img: np.ndarray, removed: np.ndarray, flag: int, radius: int) -> np.ndarray:
    cv2 = _cv2()
    out = np.empty_like(img)
    # OpenCV's Telea assumes the 8-bit value range even for float input (on [0, 1] floats it returns
    # noise): it runs on the 0-255 scale, in float, scaled back. Navier-Stokes works on [0, 1] floats.
    scale = 255.0 if flag == cv2.INPAINT_TELEA else 1.0
    for c in range(img.shape[0]):
        out[c] = cv2.inpaint(np.ascontiguousarray(img[c] * scale), removed, radius, flag) / scale
    return out


def inpaint(images: torch.Tensor, mask: torch.Tensor, method: str = "telea", *, radius: int = DEFAULT_RADIUS,
            workers: Optional[int] = None, fallback: Sequence[float] = IMAGENET_MEAN) -> torch.Tensor:
    """N x C x H x W fill: OpenCV inpainting of the removed pixels (module docstring).

    Visible pixels hold their own value. ``mask``: N x 1 x H x W, bool or float (hard mask > 0.5).
    """
    if method not in METHODS:
        raise ValueError(f"inpainting method must be one of {METHODS}, got {method!r}")
    radius = check_radius(radius)
    cv2 = _cv2()
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    visible = hard_mask(mask)
    n, c = images.shape[:2]
    zero = torch.zeros((), dtype=images.dtype, device=images.device)
    known = torch.where(visible, images, zero).detach()
    arr = known.to("cpu", torch.float32).numpy()
    removed = (~visible[:, 0]).to("cpu", torch.uint8).numpy()
    fb = torch.as_tensor(fallback, dtype=torch.float32).flatten()
    if fb.numel() not in (1, c):
        raise ValueError(f"fallback must have 1 or {c} values (one per channel), got {fb.numel()}")
    fb = fb.expand(c).numpy() if fb.numel() == 1 else fb.numpy()

    def work(i: int) -> np.ndarray:
        if not removed[i].any():
            return arr[i]
        if removed[i].all():
            return np.broadcast_to(fb[:, None, None], arr[i].shape).astype(np.float32)
        out = _inpaint_one(arr[i], removed[i], flag, radius)
        # Telea extrapolates along gradients and can overshoot: keep the fill within the range of
        # each channel's known pixels (cv2's 8-bit path clips the same way, to [0, 255]).
        keep = removed[i] == 0
        lo = arr[i][:, keep].min(axis=1)[:, None, None]
        hi = arr[i][:, keep].max(axis=1)[:, None, None]
        return np.clip(out, lo, hi)

    if workers is None:
        workers = max(1, torch.get_num_threads())
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers == 1 or n == 1:
        filled = [work(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, n)) as pool:
            filled = list(pool.map(work, range(n)))
    return torch.from_numpy(np.stack(filled)).to(images.device, images.dtype)


class InpaintStrategy(ImputationStrategy):
    """``inpaint-telea`` / ``inpaint-ns`` (module docstring)."""

    def __init__(self, method: str, model, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, radius: int = DEFAULT_RADIUS,
                 workers: Optional[int] = None):
        super().__init__(model, mean, std)
        if method not in METHODS:
            raise ValueError(f"inpainting method must be one of {METHODS}, got {method!r}")
        self.method, self.name = method, f"inpaint-{method}"
        self.radius = check_radius(radius)
        self.workers = workers
        _cv2()

    def _composite(self, images, mask):
        fill = inpaint(images, mask, self.method, radius=self.radius, workers=self.workers,
                       fallback=self.mean.tolist())
        return blend(images, mask, fill)
