"""Masking strategies: one interface that turns (model, images, masks) into logits.

Every perturbation explainer and experiment removes parts of the input; *how* it removes
them is the strategy, chosen by name::

    from masked_ops.explain.strategies import STRATEGIES, get_strategy
    strat = get_strategy("layer", model, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    logits = strat(images, masks)

Interface
---------
``get_strategy(name, model, *, mean=..., std=..., mode="fill", seed=0, **options) -> Strategy``

``Strategy(images, masks) -> logits`` (N x num_classes):

- ``images``: N x C x H x W floating tensor in **pixel space** ([0, 1]); the strategy applies the
  model's normalisation ``(x - mean) / std`` itself. A batch of one image is broadcast to the
  masks' batch (LIME: one image, many masks).
- ``masks``: N x 1 x H x W, bool or float 0/1, **1 = visible**, 0 = removed, on the images' device.
- Runs on whatever device the images and the model live on. Gradients are not disabled: wrap the
  call in ``torch.inference_mode()`` (the explainers do) when you do not need them.
- Memory format follows the model: convert it with ``model.to(memory_format=torch.channels_last)``
  (much faster on CPU for depthwise convs) and the strategy feeds it channels_last images.

``strategy.bind(image) -> (masks -> logits)``: one image (C x H x W) under many masks, the same logits as
``strategy(image[None], masks)`` with the image's normalisation, layout and constant fill done once (the
perturbation explainers call it per batch).

Strategies (``STRATEGIES``):

========== =============================================================================
black      removed pixels = 0 (pixel space)
grey       removed pixels = the dataset mean colour (``mean``), i.e. 0 after normalisation
mean       removed pixels = the image's mean colour over its *visible* pixels (dataset mean
           if nothing is visible), so the removed content never leaks in
blur       removed pixels = a Gaussian blur (sigma ``blur_sigma``, default 5 px) of the image
noise      removed pixels = uniform noise in [0, 1), from a seeded generator
smooth-grey grey fill, then a small Gaussian blur (sigma ``smooth_sigma``, default 2 px) of the
           composite, applied inside the removed region only: softens the hole's edge, as in
           the paper's "smoothed" baseline
layer      layer masking (masked_ops.layer_mask) in ``mode`` (default "fill", the paper's)
layer-renorm, layer-zero   layer masking in mode "renorm" / "zero"
inpaint-telea, inpaint-ns  OpenCV inpainting (Telea / Navier-Stokes), option ``radius`` (3 px);
           masked_ops.explain.inpainting
noisy-linear ROAD's noisy linear imputation (Rong et al. 2022), option ``noise`` (0.01; 0 = plain
           linear imputation); masked_ops.explain.imputation
segment-mean each removed pixel takes its segment's mean colour (lime's ``hide_color=None``),
           options ``segment_size`` (16 px cells) or ``segments`` (a label map)
========== =============================================================================

Vision transformers (timm's and torchvision's ``VisionTransformer``): "layer" drops the tokens of the removed
patches (masked_ops.vit, ``layer_mask(vit)``); soft=True scales the attention to each token by its patch's
keep. "layer-renorm", "layer-zero" and the CNN options (padding_visible, fill_grad) do not apply to them
and raise ValueError when the strategy is made; ``strategies_for(model)`` is the list a default ("all") means.

Except blur, noise and segment-mean (whose fill is *made from* the image or random by definition), every
strategy gives bit-identical logits whatever the removed pixels hold, NaN and inf included:
removed pixels are selected away with ``torch.where``, never multiplied by zero.

Soft masks (learned-mask explainers: extremal perturbations, RISE, DiffMask)
----------------------------------------------------------------------------
A strategy with ``strategy.soft`` True also takes float masks in [0, 1] (a degree of visibility)
and is differentiable in them. The colour and blur fills are soft: they *blend*,
``m * x + (1 - m) * fill``, so the gradient with respect to ``m`` is ``x - fill`` (also at
m = 0 and m = 1: what revealing or hiding the pixel would change). "mean" takes the
m-weighted mean colour, "smooth-grey" blends grey, blurs, and blends again. A float mask
takes this path when it requires grad or holds a value other than 0 and 1; a bool mask, or a
0/1 float mask without grad, takes the hard path above, unchanged. At 0/1 values the blend
equals the hard composite bit for bit (tested), and a pixel with m == 0 exactly that holds NaN
or inf is replaced by the fill before blending, so it reaches neither the output nor any
gradient (a finite removed value does reach ``mask.grad``, through ``x - fill``). Layer
masking takes soft masks when asked for (``get_strategy("layer", model, soft=True)``: the model is
converted with ``layer_mask(..., soft=True)``, see docs/design.md "Soft masks"); by default it is
hard-only, and a soft mask gives a clear error.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks as C
from ..images import IMAGENET_MEAN, IMAGENET_STD
from ..masks import check_soft


FILL_STRATEGIES = ("black", "grey", "mean", "blur", "noise", "smooth-grey")
# fills that are the same whatever the mask and on every call (Strategy.bind makes them once per image)
CONSTANT_FILLS = ("black", "grey")
LAYER_STRATEGIES = {"layer": None, "layer-renorm": "renorm", "layer-zero": "zero"}
# Pixel-space imputations (masked_ops/explain/imputation.py, inpainting.py): name -> the options it takes.
IMPUTATION_STRATEGIES = {"inpaint-telea": ("radius", "workers"), "inpaint-ns": ("radius", "workers"),
                         "noisy-linear": ("noise", "tol"), "segment-mean": ("segment_size", "segments")}
STRATEGIES = FILL_STRATEGIES + tuple(LAYER_STRATEGIES) + tuple(IMPUTATION_STRATEGIES)


class Strategy:
    """Base class: validation, broadcasting and normalisation shared by all strategies."""

    name = "?"
    #: True when the strategy takes float masks in [0, 1] and is differentiable in them (see the
    #: module docstring); learned-mask explainers check it (masked_ops.explain.soft).
    soft = False

    def __init__(self, model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        if not callable(model):
            raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
        self.model = model
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float64).flatten()
        if self.mean.numel() != self.std.numel():
            raise ValueError(f"mean and std must have one value per channel, got {self.mean.numel()} "
                             f"and {self.std.numel()}")
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {self.std.tolist()}")
        self._channels_last: Optional[bool] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -- helpers shared by subclasses ------------------------------------------------
    def _channel(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self._channel(self.mean, images)) / self._channel(self.std, images)

    def _prepare(self, images, masks):
        C.check_input(images, "images")
        if images.shape[1] != self.mean.numel():
            raise ValueError(f"images must have {self.mean.numel()} channels (one per mean/std value), "
                             f"got shape {tuple(images.shape)}")
        if isinstance(masks, torch.Tensor) and masks.dim() == 4 and images.shape[0] == 1 \
                and masks.shape[0] > 1:
            images = images.expand(masks.shape[0], -1, -1, -1)
        # soft masks: float masks in [0, 1], for the strategies that take them
        if self.soft and is_soft_mask(masks):
            C.check_mask(masks, images, "masks", check_values=False)
            check_soft_values(masks, "masks")
            return images, masks.to(images.dtype)
        C.check_mask(masks, images, "masks")
        return images, masks > 0 if masks.dtype != torch.bool else masks

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        images, visible = self._prepare(images, masks)
        return self.forward(self._in_model_layout(images), visible)

    @property
    def memory_format(self) -> torch.memory_format:
        """The model's memory format (see ``channels_last``)."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _in_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in channels_last when the model is (a copy only then; NCHW inputs pass as they are)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def channels_last(self) -> bool:
        """True when the model's conv weights are channels_last (model.to(memory_format=...)): the
        images are then fed channels_last too, which is what makes oneDNN fast on CPU."""
        if self._channels_last is None:
            params = self.model.parameters() if isinstance(self.model, nn.Module) else ()
            w = next((p for p in params if p.dim() == 4 and p.shape[-1] > 1), None)
            self._channels_last = bool(w is not None and not w.is_contiguous()
                                       and w.is_contiguous(memory_format=torch.channels_last))
        return self._channels_last

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, image: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``masks -> logits`` for one image (C x H x W, pixels) under many masks, equal to
        ``self(image[None], masks)`` (bit for bit with hard masks): what a perturbation explainer calls
        once per batch.

        Strategies whose model input is the image and a fill that does not depend on the mask (grey and
        black fills, layer masking) normalise the image, put it in the model's memory format and make
        the fill once, here, instead of once per batch (at small compiled batches that work was ~5% of an
        explanation, bench/README.md). Soft masks take the general path, except with the constant fills:
        there the blend is one lerp in the normalised space, equal to the call within rounding (exact at
        0 and 1)."""
        images = _one_image(image)
        return lambda masks: self(images, masks)

    def _bound_images(self, image: torch.Tensor) -> torch.Tensor:
        """1 x C x H x W: ``image`` checked as ``__call__`` checks its images, normalised, in the model's
        memory format."""
        images = _one_image(image)
        self._prepare(images, torch.ones(1, 1, *images.shape[2:], dtype=torch.bool, device=images.device))
        return self._in_model_layout(self.normalise(images))


class FillStrategy(Strategy):
    """Paint the removed pixels in pixel space, normalise, run the plain model.

    Soft masks blend the fill in (see the module docstring)."""

    soft = True

    def __init__(self, name: str, fill: Callable, model, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(model, mean, std)
        self.name = name
        self._fill = fill

    def composite(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The painted images in pixel space (useful for pictures and debugging)."""
        images, visible = self._prepare(images, masks)
        return self._composite(images, visible)

    def model_inputs(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """What the model reads: the painted images, normalised (incremental inference compares them with
        the clean image's to find what changed)."""
        images, visible = self._prepare(images, masks)
        return self._in_model_layout(self._painted_input(images, visible))

    def _painted_input(self, images, visible):
        return self.normalise(self._composite(images, visible))

    def _composite(self, images, visible):
        if visible.dtype != torch.bool:  # a soft mask (see _prepare)
            return self._blend(images, visible)
        fill = self._fill(self, images, visible)
        return torch.where(visible, images, fill)

    def _blend(self, images, m):
        """m * x + (1 - m) * fill, differentiable in m; non-finite x where m == 0 never enters."""
        bad = (m == 0) & ~torch.isfinite(images)
        has_bad = bool(bad.any())
        safe = torch.where(bad, torch.zeros((), dtype=images.dtype, device=images.device), images) \
            if has_bad else images
        fill = self._fill(self, safe, m)
        if has_bad:
            safe = torch.where(bad, fill, images)
        return blend(m, safe, fill)

    def forward(self, images, visible):
        return self.model(self._painted_input(images, visible))

    def bind(self, image):
        if self.name not in CONSTANT_FILLS:  # the fill depends on the mask or is drawn per call
            return super().bind(image)
        images = _one_image(image)
        x = self._bound_images(image)
        # normalise(where(v, image, fill)) == where(v, normalise(image), normalise(fill)), elementwise
        fill = self.normalise(self._fill(self, images, None))
        finite = bool(torch.isfinite(image).all())

        def forward(masks):
            _, visible = self._prepare(images, masks)
            if visible.dtype == torch.bool:
                return self.model(torch.where(visible, x, fill).contiguous(memory_format=self.memory_format))
            if not finite:  # NaN/inf where m == 0 must not enter the blend: the general path keeps it out
                return self(images, masks)
            # A soft mask: the blend m x + (1 - m) fill taken in the normalised space (normalising is affine,
            # so it is the same blend) as one fused lerp instead of five passes (RISE); exact at m = 0 and 1,
            # equal to the pixel-space blend within rounding elsewhere.
            return self.model(torch.lerp(fill, x, visible).contiguous(memory_format=self.memory_format))
        return forward


class LayerStrategy(Strategy):
    """Layer masking: the mask travels through the network (masked_ops.layer_mask).

    ``soft=True`` (or a name of masks.SOFT_SEMANTICS) converts the model with
    ``layer_mask(..., soft=soft)``: it then takes float masks in [0, 1] and is differentiable in them
    (the learned-mask explainers need that); at 0/1 masks it gives the hard model's logits bit for bit. ``fill_grad`` is layer_mask's (default False:
    fill values pass gradient to the mask, not to the image, as in the paper).
    """

    def __init__(self, name: str, model, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode: str = "fill",
                 padding_visible: bool = False, soft=False, fill_grad: bool = False):
        super().__init__(model, mean, std)
        from ..modes import check_mode

        self.name = name
        self.mode = check_mode(mode)
        self.padding_visible = bool(padding_visible)
        # False, or the soft semantics' name (truthy: learned-mask explainers test ``strategy.soft``)
        self.soft = check_soft(soft) or False
        self.fill_grad = bool(fill_grad)
        self._masked: Optional[nn.Module] = None
        self._check_vision_transformer()

    def _check_vision_transformer(self) -> None:
        """A vision transformer is layer-masked by token dropping (masked_ops.vit), which has none of the CNN
        options: refuse them here, when the strategy is made, rather than at its first forward."""
        from ..vit import is_vision_transformer, refuse_cnn_options

        if is_vision_transformer(self.model):
            refuse_cnn_options(self.model, f"strategy {self.name!r}", [c for c in (
                f"mode {self.mode!r}" if self.mode != "fill" else "",
                "padding_visible=True" if self.padding_visible else "",
                "fill_grad=True" if self.fill_grad else "") if c], hint="Use the strategy 'layer' ")

    @property
    def masked_model(self) -> nn.Module:
        # Converted on first use: the conversion traces the model, which costs time.
        if self._masked is None:
            from .. import layer_mask

            self._masked = layer_mask(self.model, mode=self.mode, padding_visible=self.padding_visible,
                                      soft=self.soft, fill_grad=self.fill_grad)
        return self._masked

    def model_inputs(self, images: torch.Tensor, masks: torch.Tensor):
        """What the masked model reads: (the normalised images, the masks in their dtype)."""
        images, visible = self._prepare(images, masks)
        return self._masked_inputs(self._in_model_layout(images), visible)

    def _masked_inputs(self, images, visible):
        return self.normalise(images), visible.to(images.dtype)

    def forward(self, images, visible):
        # Removed pixels may hold anything (NaN included): the masked model never reads them.
        return self.masked_model(*self._masked_inputs(images, visible))

    def bind(self, image):
        images = _one_image(image)
        x = self._bound_images(image)

        def forward(masks):
            _, visible = self._prepare(images, masks)
            if visible.dtype != torch.bool:  # a soft mask
                return self(images, masks)
            # A real batch, not a stride-0 view of the one image: a compiled model recompiles for new
            # strides (the second time with dynamic strides: 1.3x slower, measured on Lite0).
            batch = x.expand(visible.shape[0], -1, -1, -1).contiguous(memory_format=self.memory_format)
            return self.masked_model(batch, visible.to(x.dtype))
        return forward


def bound_forward(strategy, image: torch.Tensor):
    """``masks -> logits`` of ``image`` (C x H x W) under ``strategy``: its ``bind`` (Strategy.bind: the
    image's share of the work done once), or a plain call for other callables."""
    bind = getattr(strategy, "bind", None)
    if bind is not None:
        return bind(image)
    # any callable (images, masks) -> logits: the image repeated to the masks' batch (a view), as the
    # experiments always passed it
    images = _one_image(image)
    return lambda masks: strategy(images.expand(masks.shape[0], -1, -1, -1), masks)


def _one_image(image) -> torch.Tensor:
    """1 x C x H x W from the C x H x W image that bind takes (TypeError / ValueError otherwise)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor of shape C x H x W, got {type(image).__name__}")
    if image.dim() != 3:
        raise ValueError(f"image must have shape C x H x W (one image; the masks carry the batch), got shape "
                         f"{tuple(image.shape)}")
    return image[None]


# ----------------------------------------------------------------------------- soft masks
def is_soft_mask(masks) -> bool:
    """True for a float mask that requires grad or holds a value other than 0 and 1."""
    if not isinstance(masks, torch.Tensor) or not masks.is_floating_point():
        return False
    if masks.requires_grad and torch.is_grad_enabled():
        return True
    return bool(((masks != 0) & (masks != 1)).any())


def check_soft_values(masks: torch.Tensor, name: str = "masks") -> None:
    bad = ~((masks >= 0) & (masks <= 1))  # NaN is bad too
    if bool(bad.any()):
        raise ValueError(f"{name} must hold values in [0, 1] (soft masks: 1 = visible, 0 = removed); got "
                         f"{masks.detach()[bad].flatten()[0].item()!r}")


def blend(m: torch.Tensor, images: torch.Tensor, fill) -> torch.Tensor:
    """m * images + (1 - m) * fill: at m in {0, 1} exactly torch.where(m > 0, images, fill)."""
    return m * images + (1 - m) * fill


# ----------------------------------------------------------------------------- fills
def _visible_mean(images: torch.Tensor, visible: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    if visible.dtype != torch.bool:  # soft mask: the m-weighted mean colour
        count = visible.sum(dim=(2, 3), keepdim=True)
        # (at 0/1 values count is a whole number, so this equals the hard branch below bit for bit)
        mean = (visible * images).sum(dim=(2, 3), keepdim=True) / count.clamp_min(torch.finfo(count.dtype).tiny)
        return torch.where(count > 0, mean, fallback)
    vis = visible.to(images.dtype)
    total = torch.where(visible, images, torch.zeros((), dtype=images.dtype, device=images.device))
    count = vis.sum(dim=(2, 3), keepdim=True)
    mean = total.sum(dim=(2, 3), keepdim=True) / count.clamp_min(1)
    return torch.where(count > 0, mean, fallback)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius ceil(3 sigma), reflect padding (clamped to the image size)."""
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    h, w = images.shape[-2:]
    ph, pw = min(radius, h - 1), min(radius, w - 1)
    x = F.pad(images, (pw, pw, ph, ph), mode="reflect") if (ph or pw) else images
    # A kernel wider than the padded image is cut to its centre.
    kh, kw = k[radius - ph: radius + ph + 1], k[radius - pw: radius + pw + 1]
    x = F.conv2d(x, (kh / kh.sum()).view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, (kw / kw.sum()).view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)


def _black(s, images, visible):
    return torch.zeros((), dtype=images.dtype, device=images.device)


def _grey(s, images, visible):
    return s._channel(s.mean, images)


def _mean(s, images, visible):
    return _visible_mean(images, visible, s._channel(s.mean, images))


def _blur(s, images, visible):
    return gaussian_blur(images, s.blur_sigma)


def _noise(s, images, visible):
    if s.generator is None or s.generator.device != images.device:
        s.generator = torch.Generator(device=images.device).manual_seed(s.seed)
    return torch.rand(images.shape, generator=s.generator, dtype=images.dtype, device=images.device)


def _smooth_grey(s, images, visible):
    if visible.dtype != torch.bool:  # soft mask
        return gaussian_blur(blend(visible, images, _grey(s, images, visible)), s.smooth_sigma)
    grey = torch.where(visible, images, _grey(s, images, visible))
    return gaussian_blur(grey, s.smooth_sigma)


_FILLS: Dict[str, Callable] = {
    "black": _black, "grey": _grey, "mean": _mean, "blur": _blur, "noise": _noise,
    "smooth-grey": _smooth_grey,
}


def get_strategy(name: str, model: nn.Module, *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, mode: str = "fill", seed: int = 0,
                 blur_sigma: float = 5.0, smooth_sigma: float = 2.0,
                 padding_visible: bool = False, soft=False, fill_grad: bool = False,
                 **options) -> Strategy:
    """The strategy called ``name`` (see ``STRATEGIES``) for ``model``.

    ``mode`` applies to "layer" ("layer-renorm"/"layer-zero" fix theirs); ``seed`` seeds
    "noise"; ``blur_sigma``/``smooth_sigma`` (pixels) set "blur"/"smooth-grey".
    ``padding_visible`` (layer renorm only) counts the zero padding as visible, so that an
    all-visible mask reproduces the plain model exactly; by default the border is renormalised
    as in partial convolution, so "layer-renorm" with nothing removed differs at the borders.
    ``options``: the options of the imputation strategies (``IMPUTATION_STRATEGIES``); any other
    option raises ValueError. ``soft=True`` (layer strategies) asks for layer masking that takes
    soft masks in [0, 1] and is differentiable in them (``LayerStrategy``; a name of
    masks.SOFT_SEMANTICS picks the semantics, True the default); the colour and blur
    fills take soft masks anyway, and the other strategies refuse ``soft=True``. ``fill_grad``
    (soft layer strategies): fill values pass gradient to the image too, which makes the mask's
    gradient exact in deep models (default False: the paper's surrogate, cheaper; docs/design.md).
    """
    if isinstance(name, Strategy):
        return name
    if fill_grad and not (soft and name in LAYER_STRATEGIES):
        raise ValueError("fill_grad=True is for soft layer strategies (get_strategy('layer', model, soft=True, "
                         "fill_grad=True))")
    if isinstance(soft, str) and name not in LAYER_STRATEGIES:
        raise ValueError(f"soft={soft!r}: a soft semantics by name is for layer strategies; masking strategy "
                         f"{name!r} takes soft=True or False")
    if soft and name not in soft_strategy_names():
        raise ValueError(f"masking strategy {name!r} takes hard 0/1 masks only (soft=True is for "
                         f"{', '.join(soft_strategy_names())})")
    if name in IMPUTATION_STRATEGIES:
        return _imputation_strategy(name, model, mean, std, seed, options)
    if options:
        raise ValueError(f"unknown option(s) {', '.join(sorted(options))} for masking strategy {name!r}")
    if name in LAYER_STRATEGIES:
        return LayerStrategy(name, model, mean, std, mode=LAYER_STRATEGIES[name] or mode,
                             padding_visible=padding_visible, soft=soft, fill_grad=fill_grad)
    if name not in _FILLS:
        raise ValueError(f"unknown masking strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    s = FillStrategy(name, _FILLS[name], model, mean, std)
    s.seed, s.generator = int(seed), None
    s.blur_sigma, s.smooth_sigma = float(blur_sigma), float(smooth_sigma)
    return s


def strategies_for(model, names: Sequence[str] = STRATEGIES) -> list:
    """``names`` without the strategies ``model`` cannot take: for a vision transformer (masked_ops.vit, token
    dropping) the CNN layer-masking modes "layer-renorm" and "layer-zero"; ``names`` itself otherwise. What a
    default list ("all" strategies) means for a model; a name asked for explicitly is refused by get_strategy."""
    from ..vit import is_vision_transformer

    if not is_vision_transformer(model):
        return list(names)
    return [n for n in names if not LAYER_STRATEGIES.get(n)]  # out: the layer strategies with a CNN mode of their own


def soft_strategy_names() -> tuple:
    """The names in STRATEGIES that take soft masks: the colour and blur fills (always) and layer
    masking (with ``soft=True``)."""
    return tuple(n for n in STRATEGIES if n in LAYER_STRATEGIES or n in _FILLS)


def _imputation_strategy(name, model, mean, std, seed, options) -> Strategy:
    allowed = IMPUTATION_STRATEGIES[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for masking strategy {name!r}; "
                         f"it takes {', '.join(allowed)}")
    if name.startswith("inpaint-"):
        from .inpainting import InpaintStrategy

        return InpaintStrategy(name[len("inpaint-"):], model, mean, std, **options)
    from .imputation import NoisyLinearStrategy, SegmentMeanStrategy

    if name == "noisy-linear":
        return NoisyLinearStrategy(model, mean, std, seed=seed, **options)
    return SegmentMeanStrategy(model, mean, std, **options)
