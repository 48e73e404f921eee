"""Image folders: every image under a directory, in a fixed order, with labels from an ImageFolder layout.

    folder = scan_folder("photos/")          # Folder(root, items, classes)
    folder.items[0].path                     # "cat/chelsea.png" (relative, "/"-separated)
    folder.items[0].label_name               # "cat" (ImageFolder layout) or "" (no labels)

Rules (the same on every machine and every rank, so that shards and outputs line up):

- Recursive. A file is an image when its extension (any case) is one of ``IMAGE_EXTENSIONS``
  (torchvision's ImageFolder list); other files are ignored, and so are hidden files and folders
  (names starting with ".", which is also how our temporary files are named).
- Order: relative POSIX paths sorted by code point.
- Labels: when ``root`` holds no image directly and every image lies below a sub-folder, the first
  path component is the image's class, as in torchvision's ``ImageFolder`` (``DIR/<class>/**/<image>``).
  Otherwise the folder has no labels (``classes`` is None, every ``label_name`` is "").

``model_class_index(name, class_names)`` maps a class folder's name to the model's output index:
an integer ("281"), an ImageNet WordNet id ("n02123045", for 1,000-class models: ImageNet's
validation set unpacked into class folders) or a class name of the model ("tabby", "Egyptian_cat",
case and "_" / " " ignored). Anything else gives -1: the folder is labelled, but not in the model's
classes, so accuracy against labels cannot be computed for it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a folder: its path relative to the root ("/"-separated) and its class folder."""

    path: str
    label_name: str = ""


@dataclasses.dataclass
class Folder:
    root: str
    items: List[Item]
    classes: Optional[List[str]]  # sorted class folder names, None when the folder has no labels

    @property
    def labelled(self) -> bool:
        return self.classes is not None

    def full_path(self, item: Item) -> str:
        return os.path.join(self.root, *item.path.split("/"))


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str) -> Folder:
    """Every image under ``root`` (see the module docstring). Raises ValueError if there is none."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(root).__name__}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a directory")
    paths: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip hidden folders (and ours)
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        paths.extend(prefix + f for f in filenames if is_image_file(f))
    if not paths:
        raise ValueError(f"image folder {root!r} holds no image files (extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    paths.sort()
    labelled = all("/" in p for p in paths)
    items = [Item(p, p.split("/", 1)[0] if labelled else "") for p in paths]
    classes = sorted({it.label_name for it in items}) if labelled else None
    return Folder(root, items, classes)


def _raise(err: OSError) -> None:
    raise ValueError(f"cannot list {err.filename!r}: {err.strerror}") from err


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@lru_cache(maxsize=None)
def imagenet_wnids() -> Tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in class-index order (sorted; shipped data file)."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "imagenet_wnids.txt")
    with open(path, encoding="ascii") as f:
        ids = tuple(line.strip() for line in f if line.strip())
    assert len(ids) == 1000, f"imagenet_wnids.txt has {len(ids)} ids, expected 1000"
    return ids


def model_class_index(name: str, class_names: Sequence[str]) -> int:
    """The model output index a class folder called ``name`` stands for, or -1 (module docstring)."""
    n = len(class_names)
    text = name.strip()
    if text.isdigit():
        i = int(text)
        return i if i < n else -1
    if _WNID.match(text) and n == 1000:
        try:
            return imagenet_wnids().index(text)
        except ValueError:
            return -1
    return _name_index(tuple(class_names)).get(_normalise(text), -1)


@lru_cache(maxsize=8)
def _name_index(class_names: Tuple[str, ...]) -> Dict[str, int]:
    index: Dict[str, int] = {}
    for i, c in enumerate(class_names):
        index.setdefault(_normalise(c), i)
    return index


def label_indices(folder: Folder, class_names: Sequence[str]) -> Dict[str, int]:
    """{class folder name: model output index or -1} for a labelled folder ({} for an unlabelled one)."""
    return {c: model_class_index(c, class_names) for c in (folder.classes or ())}
