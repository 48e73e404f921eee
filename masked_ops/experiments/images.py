"""Image sets for the experiments: the real photos bundled with scikit-image and scikit-learn.

``image_set(specs, size, augment)`` returns (N x 3 x size x size tensor in [0, 1], names).

Specs: ``"bundled"`` (all natural colour photos below), a scikit-image sample name, ``"motorcycle"``
(left view of skimage's stereo pair), ``"china"``/``"flower"`` (scikit-learn's sample images),
``"grace_hopper"`` (matplotlib's sample photo), a
file path (read by masked_ops.models.load_image), or a folder: every image under it, in the order
and with the labels of masked_ops.dataset.folder (``DIR/<class>/<image>``: the class folder names
the label). Each photo is resized so its shorter side is ``size`` and centre-cropped (the usual
ImageNet evaluation view, aspect ratio kept).

``labelled_image_set(specs, size, augment, class_names)`` also returns each image's label as an
index into ``class_names`` (-1 where there is none: not from a class folder, or a folder name that
names no class of the model) and skips, with a warning, folder images that cannot be read. The
whole set is held in memory (3 x size x size floats per view: ~0.6 MB at 224 px).

``augment = k`` adds k extra views per photo, in a fixed order: the horizontal flip, then crops of
75% of the shorter side at the four corners, then their flips. They are not independent photos
(the report says so) but give the probe and the curves more samples from the same few photos.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import List, Optional, Sequence, Tuple

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


@dataclasses.dataclass
class ImageSet:
    images: torch.Tensor          # N x 3 x size x size in [0, 1]
    names: List[str]              # "photo" / "photo:view" / "<class>/<file>" (folder images)
    labels: np.ndarray            # N int64: index into the model's classes, -1 = no label
    label_names: List[str]        # the class folder, "" for images not from a class folder
    skipped: List[Tuple[str, str]]  # folder images that could not be read, and why

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())


def _check(specs, size, augment):
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("images: need at least one image spec (e.g. 'bundled' or 'chelsea')")
    if not isinstance(augment, int) or not 0 <= augment <= MAX_AUGMENT:
        raise ValueError(f"augment must be an int in [0, {MAX_AUGMENT}], got {augment!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    return list(specs)


def labelled_image_set(specs: Sequence[str] = ("bundled",), size: int = 224, augment: int = 0,
                       class_names: Optional[Sequence[str]] = None) -> ImageSet:
    """The images of ``specs`` with labels (see the module docstring)."""
    from ..dataset.folder import model_class_index, scan_folder

    specs = _check(specs, size, augment)
    images, names, labels, label_names, skipped = [], [], [], [], []

    def add(photo, name, label_name):
        label = model_class_index(label_name, class_names) if label_name and class_names else -1
        for tag, view in _views(photo, size, augment):
            images.append(view)
            names.append(f"{name}:{tag}" if tag else name)
            labels.append(label)
            label_names.append(label_name)

    for spec in specs:
        if spec != "bundled" and os.path.isdir(spec):
            folder = scan_folder(spec)
            for item in folder.items:
                try:
                    photo = load_photo(folder.full_path(item))
                except Exception as e:  # a corrupt file is skipped, not fatal (PIL may raise SyntaxError)
                    skipped.append((item.path, str(e)))
                    print(f"masked-ops: warning: skipping {item.path}: {e}", file=sys.stderr)
                    continue
                add(photo, item.path, item.label_name)
            continue
        for name in (BUNDLED if spec == "bundled" else [spec]):
            add(load_photo(name), name, "")
    if not images:
        raise ValueError(f"images: no readable image in {specs}")
    return ImageSet(torch.stack(images), names, np.asarray(labels, dtype=np.int64), label_names, skipped)


def image_set(specs: Sequence[str] = ("bundled",), size: int = 224, augment: int = 0
              ) -> Tuple[torch.Tensor, List[str]]:
    """(N x 3 x size x size images in [0, 1], names) for the given specs and augmentation."""
    s = labelled_image_set(specs, size, augment)
    return s.images, s.names
