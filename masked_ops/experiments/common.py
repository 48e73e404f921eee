"""What every experiment runs on: a model, its masking strategies, batched prediction.

An experiment function takes ``model`` (any nn.Module classifier), ``images`` (N x 3 x H x W in
[0, 1], pixel space) and ``strategies``: names from masked_ops.explain.strategies.STRATEGIES, or
a mapping ``{name: predict}`` with ``predict(images, masks) -> logits`` for a strategy of your own
(``Subject(..., options={name: {...}})`` passes options to get_strategy, e.g. segment-mean's cell size)
(``images`` and ``masks`` as in the Strategy interface: masks N x 1 x H x W, 1 = visible).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .._util.fingerprint import fingerprint, model_fingerprint
from ..explain.strategies import STRATEGIES, bound_forward, get_strategy, strategies_for
from ..images import IMAGENET_MEAN, IMAGENET_STD

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StrategySpec = Union[Sequence[str], Mapping[str, Predictor]]

# The comparison the paper headlines, plus the other input fills and both other layer modes.
DEFAULT_STRATEGIES = STRATEGIES


class Subject:
    """A model, its normalisation and its strategies, with batched no-grad prediction."""

    def __init__(self, model: nn.Module, strategies: StrategySpec = DEFAULT_STRATEGIES, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 batch_size: Optional[int] = None, seed: int = 0, options: Optional[Mapping[str, dict]] = None):
        if not callable(model):
            raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
        if batch_size is None:  # the explainers' constant for the model's device (explain.batching: measured)
            from ..explain.batching import default_batch_size

            param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
            batch_size = default_batch_size(param.device if param is not None else "cpu")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1 or None (the device's default), got {batch_size!r}")
        self.model = model
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.batch_size = batch_size
        if strategies is DEFAULT_STRATEGIES:  # every strategy the model takes (a ViT: no CNN-only layer modes)
            strategies = strategies_for(model, strategies)
        if isinstance(strategies, str):
            strategies = [strategies]
        if isinstance(strategies, Mapping):
            self.strategies: Dict[str, Predictor] = dict(strategies)
        else:
            names = list(strategies)
            if not names:
                raise ValueError(f"strategies: need at least one of {', '.join(STRATEGIES)}")
            if len(set(names)) != len(names):
                raise ValueError(f"strategies: duplicate names in {names}")
            options = dict(options or {})
            self.strategies = {n: get_strategy(n, model, mean=mean, std=std, seed=seed, **options.get(n, {}))
                               for n in names}
        for name in self.strategies:
            if "--" in name or "/" in name:
                raise ValueError(f"strategy name {name!r} must not contain '--' or '/'")

    @property
    def names(self):
        return list(self.strategies)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images)) / self.std.to(images)

    def clean_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the plain model on the unmasked images (the reference every metric uses)."""
        out = []
        with torch.inference_mode():
            for i in range(0, images.shape[0], self.batch_size):
                out.append(self.model(self.normalise(images[i:i + self.batch_size])))
        return torch.cat(out)

    def predict(self, name: str, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Logits of strategy ``name`` for one image (3 x H x W or 1 x 3 x H x W) under many masks."""
        img = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if img.dim() != 3:
            raise ValueError(f"image must be 3 x H x W or 1 x 3 x H x W, got shape {tuple(image.shape)}")
        out = []
        with torch.inference_mode():
            forward = bound_forward(self.strategies[name], img)  # the image's share of the work once
            for i in range(0, masks.shape[0], self.batch_size):
                out.append(forward(masks[i:i + self.batch_size]))
        return torch.cat(out)


    def predict_pairs(self, name: str, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Logits of strategy ``name`` for image i under mask i (batched)."""
        fn = self.strategies[name]
        out = []
        with torch.inference_mode():
            for i in range(0, masks.shape[0], self.batch_size):
                out.append(fn(images[i:i + self.batch_size], masks[i:i + self.batch_size]))
        return torch.cat(out)


def base_config(experiment: str, subject: Subject, images: torch.Tensor, seed: int, **params) -> dict:
    """The configuration a checkpointed run is tied to (see runner.Run).

    The strategies are not part of it: units are keyed by strategy, so a run resumed with more
    or fewer strategies reuses the units it has and computes only the new ones.
    """
    return dict(experiment=experiment, model=model_fingerprint(subject.model), images=fingerprint([images]),
                n_images=int(images.shape[0]), seed=int(seed), **params)


def check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be an N x C x H x W tensor in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.shape[0] < 1:
        raise ValueError("images: need at least one image")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    return images
