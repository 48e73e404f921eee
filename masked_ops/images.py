"""Images: the bundled sample photos, reading image files, the centre view a model sees.

    image = load_image("chelsea")            # 3 x H x W float32 in [0, 1]: a bundled sample or a file
    view = centre_view(image, 224)           # the centre square of the shorter side, resized to 224 x 224

Bundled samples (they ship inside installed wheels, so nothing is downloaded): scikit-image's
"chelsea", "coffee", "astronaut", "rocket", ..., "motorcycle" (left view of its stereo pair),
scikit-learn's "china" and "flower", matplotlib's "grace_hopper". ``BUNDLED`` lists the natural colour
photographs among them (the experiments' default image set).

Files: anything PIL reads. Grayscale and palette images become RGB, CMYK and YCbCr are converted by
PIL, 16-bit images are scaled by 1/65535; alpha channels are dropped when fully opaque and refused
otherwise (what is behind a transparent pixel is undefined).

``IMAGENET_MEAN`` / ``IMAGENET_STD``: the usual ImageNet normalisation, the default of every strategy
and model description.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# scikit-image samples bundled inside its wheel: other skimage.data names would try to download.
SKIMAGE_SAMPLES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
                   "coins", "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                   "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text")
SKLEARN_SAMPLES = ("china", "flower")
SAMPLES = SKIMAGE_SAMPLES + ("motorcycle",) + SKLEARN_SAMPLES + ("grace_hopper",)
# The natural colour photographs among them (skimage's "cat" is the same photo as "chelsea"; colorwheel
# and logo are drawings).
BUNDLED = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "motorcycle", "china", "flower", "grace_hopper")


def _from_array(a: np.ndarray, what: str) -> torch.Tensor:
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype.kind == "f" and a.size and 0.0 <= float(np.nanmin(a)) and float(np.nanmax(a)) <= 1.0:
        a = a.astype(np.float32)
    else:
        raise ValueError(f"image {what}: expected 8-bit or 16-bit RGB, or float in [0, 1], got dtype {a.dtype}")
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


def _sample(name: str) -> np.ndarray:
    if name == "grace_hopper":  # matplotlib's sample photo (ships inside its wheel)
        from matplotlib import cbook

        return _pil_array(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    if name in SKLEARN_SAMPLES:
        import sklearn.datasets

        path = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", f"{name}.jpg")
        return _pil_array(path)
    import skimage.data

    if name == "motorcycle":
        return np.asarray(skimage.data.stereo_motorcycle()[0])
    return np.asarray(getattr(skimage.data, name)())


def _pil_array(src: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(src) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("LA", "PA", "La"):
                im = im.convert("RGBA")
            elif mode.startswith("I;16"):  # 16-bit grayscale
                return np.asarray(im).astype(np.uint16)
            elif mode == "I":  # 32-bit integer: PIL's mode for 16-bit PNGs
                a = np.asarray(im)
                if a.size and (a.min() < 0 or a.max() > 65535):
                    raise ValueError(f"image {src!r} has 32-bit integer pixels outside 0..65535; convert it to 8- or "
                                     f"16-bit first")
                return a.astype(np.uint16)
            elif mode == "F":
                return np.asarray(im)  # accepted by _from_array only within [0, 1]
            elif mode not in ("RGB", "RGBA"):
                try:
                    im = im.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, ...
                except (ValueError, OSError) as e:
                    raise ValueError(f"image {src!r} has mode {mode!r}, which PIL cannot convert to RGB ({e}); "
                                     f"convert it to 8-bit RGB first") from e
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {src!r} cannot be read as an image: {e}") from e


def load_image(path_or_name: str) -> torch.Tensor:
    """A 3 x H x W float32 tensor in [0, 1] from a bundled sample name or an image file.

    Raises ValueError (unreadable file, unknown name, transparent pixels) with the reason.
    """
    src = str(path_or_name)
    if os.path.isdir(src):
        raise ValueError(f"image {src!r} is a folder; expected an image file or a sample name")
    if not os.path.exists(src):
        if src not in SAMPLES:
            raise ValueError(f"image {src!r}: no such file, and not a bundled sample name "
                             f"(one of {', '.join(SAMPLES)})")
        try:
            arr = _sample(src)
        except Exception as e:
            raise ValueError(f"image {src!r}: cannot load the bundled sample ({e})") from e
        return _from_array(arr, repr(src))
    return _from_array(_pil_array(src), repr(src))


def centre_view(image: torch.Tensor, size: int, *, scale: float = 1.0, corner: str = "c") -> torch.Tensor:
    """Square crop of ``scale`` x the shorter side (at the centre or a corner), resized to size."""
    _, h, w = image.shape
    side = max(1, int(round(min(h, w) * scale)))
    top = {"c": (h - side) // 2, "tl": 0, "tr": 0, "bl": h - side, "br": h - side}[corner]
    left = {"c": (w - side) // 2, "tl": 0, "bl": 0, "tr": w - side, "br": w - side}[corner]
    crop = image[None, :, top:top + side, left:left + side]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)
