"""Image sets for the experiments: the real photos bundled with scikit-image and scikit-learn.

``image_set(specs, size, augment)`` returns (N x 3 x size x size tensor in [0, 1], names).

Specs: ``"bundled"`` (all natural colour photos below), a scikit-image sample name, ``"motorcycle"``
(left view of skimage's stereo pair), ``"china"``/``"flower"`` (scikit-learn's sample images),
``"grace_hopper"`` (matplotlib's sample photo), or a
file path (read by masked_ops.models.load_image). Each photo is resized so its shorter side is
``size`` and centre-cropped (the usual ImageNet evaluation view, aspect ratio kept).

``augment = k`` adds k extra views per photo, in a fixed order: the horizontal flip, then crops of
75% of the shorter side at the four corners, then their flips. They are not independent photos
(the report says so) but give the probe and the curves more samples from the same few photos.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# The natural colour photographs that ship inside the scikit-image, scikit-learn and matplotlib wheels
# (skimage's "cat" is the same photo as "chelsea"; colorwheel and logo are drawings).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina")
EXTRA_PHOTOS = ("motorcycle", "china", "flower", "grace_hopper")
BUNDLED = SKIMAGE_PHOTOS + EXTRA_PHOTOS
MAX_AUGMENT = 9


def _uint8_to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a[:, :, :3])).permute(2, 0, 1).float() / 255.0


def load_photo(spec: str) -> torch.Tensor:
    """3 x H x W float in [0, 1] for one image spec (see the module docstring)."""
    if spec == "motorcycle":
        import skimage.data

        return _uint8_to_tensor(skimage.data.stereo_motorcycle()[0])
    if spec == "grace_hopper":  # matplotlib's sample photo (ships inside its wheel)
        from matplotlib import cbook

        return load_photo(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    if spec in ("china", "flower"):
        import os

        import sklearn.datasets

        path = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", f"{spec}.jpg")
        spec = path
    from ..models import load_image

    return load_image(spec)


def centre_view(image: torch.Tensor, size: int, *, scale: float = 1.0, corner: str = "c") -> torch.Tensor:
    """Square crop of ``scale`` x the shorter side (at the centre or a corner), resized to size."""
    _, h, w = image.shape
    side = max(1, int(round(min(h, w) * scale)))
    top = {"c": (h - side) // 2, "tl": 0, "tr": 0, "bl": h - side, "br": h - side}[corner]
    left = {"c": (w - side) // 2, "tl": 0, "bl": 0, "tr": w - side, "br": w - side}[corner]
    crop = image[None, :, top:top + side, left:left + side]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def _views(image: torch.Tensor, size: int, augment: int) -> List[Tuple[str, torch.Tensor]]:
    base = centre_view(image, size)
    views = [("", base), ("flip", base.flip(-1))]
    crops = [(c, centre_view(image, size, scale=0.75, corner=c)) for c in ("tl", "tr", "bl", "br")]
    views += [(f"crop-{c}", v) for c, v in crops]
    views += [(f"crop-{c}-flip", v.flip(-1)) for c, v in crops]
    return views[:1 + augment]


def image_set(specs: Sequence[str] = ("bundled",), size: int = 224, augment: int = 0
              ) -> Tuple[torch.Tensor, List[str]]:
    """(N x 3 x size x size images in [0, 1], names) for the given specs and augmentation."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("images: need at least one image spec (e.g. 'bundled' or 'chelsea')")
    if not isinstance(augment, int) or not 0 <= augment <= MAX_AUGMENT:
        raise ValueError(f"augment must be an int in [0, {MAX_AUGMENT}], got {augment!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    names: List[str] = []
    for s in specs:
        names.extend(BUNDLED if s == "bundled" else [s])
    images, labels = [], []
    for name in names:
        photo = load_photo(name)
        for tag, view in _views(photo, size, augment):
            images.append(view)
            labels.append(f"{name}:{tag}" if tag else name)
    return torch.stack(images), labels
