"""Image sets for the experiments: the real photos bundled with scikit-image and scikit-learn.

``image_set(specs, size, augment)`` returns (N x 3 x size x size tensor in [0, 1], names).

Specs: ``"bundled"`` (the natural colour photos of masked_ops.images.BUNDLED), a bundled sample name
(masked_ops.images.SAMPLES), a file path (read by masked_ops.images.load_image), or a folder: every image under it, in the order
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

from ..images import BUNDLED, centre_view, load_image

MAX_AUGMENT = 9


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
                    photo = load_image(folder.full_path(item))
                except Exception as e:  # a corrupt file is skipped, not fatal (PIL may raise SyntaxError)
                    skipped.append((item.path, str(e)))
                    print(f"masked-ops: warning: skipping {item.path}: {e}", file=sys.stderr)
                    continue
                add(photo, item.path, item.label_name)
            continue
        for name in (BUNDLED if spec == "bundled" else [spec]):
            add(load_image(name), name, "")
    if not images:
        raise ValueError(f"images: no readable image in {specs}")
    return ImageSet(torch.stack(images), names, np.asarray(labels, dtype=np.int64), label_names, skipped)


def image_set(specs: Sequence[str] = ("bundled",), size: int = 224, augment: int = 0
              ) -> Tuple[torch.Tensor, List[str]]:
    """(N x 3 x size x size images in [0, 1], names) for the given specs and augmentation."""
    s = labelled_image_set(specs, size, augment)
    return s.images, s.names
