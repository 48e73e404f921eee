"""Vision DiffMask on vision transformers, as published, and the project's token-dropping variant (issue 26).

    from masked_ops.explain.vit_diffmask import VisionDiffMask, explain_vision_diffmask
    dm = VisionDiffMask(vit)                       # timm or torchvision VisionTransformer, frozen
    dm.fit(train_images, epochs=5, checkpoint="vdm.pt")
    exp = dm.explain(image)                        # a MapExplanation: keep per patch, masks = the pixel map
    exp = explain_vision_diffmask(vit, image)      # per image: fit on that one image, then explain it

**The method** (Nalmpantis, Panagiotopoulos, Gkountouras, Papakostas, Aziz, "Vision DiffMask: Faithful
Interpretation of Vision Transformers with Differentiable Patch Masking", CVPR-W XAI4CV 2023; code
github.com/AngelosNal/Vision-DiffMask, read at commit 988d879). With L transformer layers there are L + 2
hidden states h_0 .. h_{L+1}: h_0 the patch embeddings (the patch projection's output, *before* the class
token and the position embeddings are added), h_i for 1 <= i <= L the input of layer i, h_{L+1} the output
of the last layer (before the final norm) (code/utils/getters_setters.py, ``_add_hooks``/``vit_getter``).
A probe per hidden state (code/models/gates.py, ``MLPMaxGate`` in ``DiffMaskGateInput``) reads, per patch,
[h_0 ; h_i] and gives a gate logit: weight-normed Linear(2D -> D/4), tanh, weight-normed Linear(D/4 -> 1),
tanh, times ``scale`` (``mul_activation``, 15) plus a learned offset (``add_activation``, starting at 8).
The gates are hard-concrete (temperature 0.2, stretch (-0.2, 1.0): ``RectifiedStreched(BinaryConcrete(0.2,
logits), l=-0.2, r=1.0)``, here masked_ops.explain.hard_concrete). In each training step a layer k is drawn
uniformly from 0..L+1 (``forward_explainer``; its weighted option is off by default), the probes 0..k are
evaluated and a patch's gate is the product of their samples (``cumprod``): every layer up to k votes, all
must keep the patch. The gated patch embedding replaces h_0: ``h_0' = z h_0 + (1 - z) b`` with a learned
baseline vector b (``placeholder``, one D-vector shared by all patches, Xavier-normal start), and the frozen
ViT runs on from there (``vit_setter``: the class token and the position embeddings are added after, so the
class token is never gated). Loss (``training_step``): ``alpha_k (KL(p_clean || p_masked) - eps) + mean over
positions of sum_{i<=k} log P(z_i != 0)`` (the log expected L0, ``log_expected_L0().cumsum``), one Lagrange
multiplier alpha_k per hidden state. The probes and b descend it, the multipliers ascend it and are clamped to
[0, 200] (``configure_optimizers``/``optimizer_step``). The explanation (``get_mask``) is the expected L0 of
the product of all L + 2 gates, exp(sum_i log P(z_i != 0)) per patch, upsampled to pixels (nearest); a
single layer's aggregated map (``idx``) is ``explain(..., layer=i)``.

**Published defaults, taken as this class's defaults** (code/models/interpretation.py,
``add_model_specific_args``, which main.py passes to the constructor, whose own defaults differ): alpha (the
multipliers' start) 20, lr (probes) 2e-5, eps (the KL budget) 0.1, lr_placeholder (b) 1e-3, lr_alpha 0.3,
mul_activation 15, add_activation 8; the optimisers are Lookahead(Adam) with Lookahead's alpha 0.5 and k 6
(code/utils/optimizer.py, ``LookaheadAdam``), the probes' and b's learning rates warm up linearly over 1200
steps (``get_constant_schedule_with_warmup(optimizer, 12 * 100)``), the multipliers' stay constant; batch 32
(code/datamodules/base.py), 5 epochs and seed 123 (code/main.py); no augmentation unless asked for
(``--add_noise`` etc. are off).

**replace** picks how a gated patch is removed:
  "baseline" (default): the published method above.
  "drop": the project's variant, layer masking of the ViT: the gates are the soft keeps of
    masked_ops.vit.TokenMasked (``soft=True``: a token with keep z is a key whose attention weight is
    scaled by z; z = 0 drops it), so a removed patch is dropped rather than replaced by anything; no
    baseline vector. Everything else (probes, gates, loss, multipliers, defaults) is the same.

Deviations from the published code, and why:
  * the L0 term averages over the patch tokens only; the published mean also counts a gate at the class
    token's position, which never acts on the forward (its blended value is discarded);
  * one forward and one backward per step update probes, b and the multipliers together; the published
    Lightning module (two optimisers, PL 1.x) ran the training step once per optimiser, i.e. two forwards
    with two layer draws per batch;
  * Lookahead's slow weights start at the initial weights (Zhang et al. 2019); the published copy creates
    them lazily at the first synchronisation, which therefore does nothing;
  * ``evaluate`` scores the deterministic gates (the product over all probes of the noiseless stretched
    sigmoid); the published validation draws gates as in training.
The CNN DiffMask of this project (masked_ops.explain.diffmask) adds a straight-through gradient with a
gate floor, a damping term and a KL budget on the deterministic gates; none of them is used here.

The ViT's weights never change (gradients off during ``fit``, restored after); it should be in eval mode.
Images are pixels in [0, 1], N x 3 x S x S, S the model's image size; they are normalised with ``mean`` and
``std`` (default: the timm model's pretrained config, else ImageNet's). Supported models: those
masked_ops.vit.TokenMasked supports (timm's VisionTransformer with or without class and register tokens,
torchvision's), with square patches. Checkpoints use the CNN DiffMask's format and file handling
(masked_ops.explain.checkpoint: atomic writes, resume with the same path, refusal of another model,
configuration or training data), with the method recorded so that neither loads the other's.
"""
from __future__ import annotations

import contextlib
import math
import os
import types
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._util.fingerprint import model_fingerprint
from ..images import IMAGENET_MEAN, IMAGENET_STD
from ..vit import TokenMasked, is_vision_transformer
from .checkpoint import CHECKPOINT_FORMAT, Checkpointed, load_checkpoint
from .hard_concrete import (STRETCH, TEMPERATURE, deterministic_gate, gates_to_mask, hard_concrete_sample,
                            kl_divergence)
from .maps import MapExplanation, patch_segments
from .perturb import check_pixel_range, check_positive, per_image_targets, prepare_image
from .soft import frozen_parameters

__all__ = ["VisionDiffMask", "explain_vision_diffmask", "REPLACES", "PUBLISHED_DEFAULTS", "log_open_probability"]

METHOD = "vision_diffmask"
REPLACES = ("baseline", "drop")
# The published hyper-parameters (module docstring: where each comes from), the defaults of VisionDiffMask.
PUBLISHED_DEFAULTS = dict(eps=0.1, lr=2e-5, lr_baseline=1e-3, lr_alpha=0.3, alpha_init=20.0, alpha_max=200.0,
                          scale=15.0, offset=8.0, lookahead=(0.5, 6), warmup=1200, batch_size=32, seed=123)


def log_open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """log P(z != 0) of hard-concrete gates (log of hard_concrete.open_probability, computed stably):
    Vision DiffMask's ``log_expected_L0``."""
    lo, hi = STRETCH
    return F.logsigmoid(log_alpha - TEMPERATURE * math.log(-lo / hi))


def _number(name: str, v, *, low: float = 0.0, strict: bool = True) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or \
            not (v > low if strict else v >= low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {v!r}")
    return float(v)


# ----------------------------------------------------------------------------- probes and optimisers
class _Probe(nn.Module):
    """Vision DiffMask's gate MLP: tanh(W2 tanh(W1 [h_0; h_i])) * scale + offset (weight norm, learned offset)."""

    def __init__(self, dim: int, hidden: int, scale: float, offset: float):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.f = nn.Sequential(wn(nn.Linear(2 * dim, hidden)), nn.Tanh(), wn(nn.Linear(hidden, 1)), nn.Tanh())
        self.scale = scale
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, h0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.f(torch.cat([h0, h], dim=-1))[..., 0] * self.scale + self.offset


class _Gates(nn.Module):
    """The trained part: one probe per hidden state, and the baseline vector (a zero buffer if not learned)."""

    def __init__(self, dim: int, probes: int, hidden: int, scale: float, offset: float, learn_baseline: bool):
        super().__init__()
        self.probes = nn.ModuleList([_Probe(dim, hidden, scale, offset) for _ in range(probes)])
        if learn_baseline:  # Xavier-normal of a 1 x 1 x D tensor: std sqrt(2 / (D + D))
            self.baseline = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        else:
            self.register_buffer("baseline", torch.zeros(dim))

    def forward(self, states: Sequence[torch.Tensor], upto: int) -> torch.Tensor:
        """N x P x (upto + 1) gate logits of the probes 0..upto."""
        return torch.stack([self.probes[i](states[0], states[i]) for i in range(upto + 1)], dim=-1)


class _Lookahead:
    """Lookahead (Zhang et al. 2019) around an optimiser, as Vision DiffMask's ``Lookahead``: every k-th step
    the slow copy of each parameter that has a gradient moves ``alpha`` of the way to it and the parameter is
    set to it. ``alpha=None``: the plain optimiser."""

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: Optional[float], k: int):
        self.optimizer, self.alpha, self.k, self.count = optimizer, alpha, k, 0
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.slow = [p.detach().clone() for p in self.params] if alpha is not None else []

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def step(self):
        self.optimizer.step()
        self.count += 1
        if self.alpha is not None and self.count % self.k == 0:
            with torch.no_grad():
                for p, s in zip(self.params, self.slow):
                    if p.grad is not None:
                        s.add_(p - s, alpha=self.alpha)
                        p.copy_(s)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "slow": [s.clone() for s in self.slow], "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for s, v in zip(self.slow, state["slow"]):
                s.copy_(v)
        self.count = int(state["count"])


# ----------------------------------------------------------------------------- the explainer
class VisionDiffMask(Checkpointed):
    """Amortised Vision DiffMask for a timm or torchvision VisionTransformer (see the module docstring).

    ``replace``: "baseline" (published: a learned baseline vector) or "drop" (tokens dropped, TokenMasked's
    soft keeps). ``hidden``: the probes' hidden width (default D // 4, published). ``learn_baseline=False``:
    b is a zero vector, not trained (published ``--no_placeholder``). ``lookahead``: (alpha, k) or None.
    ``warmup``: steps over which the probes' and b's learning rates rise linearly from 0 (0: none).
    """

    def __init__(self, model: nn.Module, *, replace: str = "baseline", image_size: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 eps: float = 0.1, lr: float = 2e-5, lr_baseline: float = 1e-3, lr_alpha: float = 0.3,
                 alpha_init: float = 20.0, alpha_max: float = 200.0, scale: float = 15.0, offset: float = 8.0,
                 hidden: Optional[int] = None, learn_baseline: bool = True,
                 lookahead: Optional[Tuple[float, int]] = (0.5, 6), warmup: int = 1200, batch_size: int = 32,
                 seed: int = 123):
        if isinstance(model, TokenMasked):  # a layer-masked ViT (masked_ops.layer_mask): the ViT inside
            model = model.model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a timm or torchvision VisionTransformer, got {type(model).__name__}")
        if not is_vision_transformer(model):
            raise TypeError(f"model must be a timm or torchvision VisionTransformer (Vision DiffMask gates the "
                            f"patch tokens of a ViT; for a CNN use masked_ops.explain.DiffMask), got "
                            f"{type(model).__name__}")
        if replace not in REPLACES:
            raise ValueError(f"replace must be one of {REPLACES} ('baseline': the published learned baseline vector; "
                             f"'drop': tokens dropped by layer masking), got {replace!r}")
        # TokenMasked checks that the model is one whose token layout we know (refusing others by name)
        self.masked = TokenMasked(model, soft=True, patch_keep="all")
        if self.masked.patch[0] != self.masked.patch[1]:
            raise ValueError(f"model: patches must be square, got {self.masked.patch}")
        self.patch = int(self.masked.patch[0])
        if image_size is None:
            if self.masked.img_size is None:
                raise ValueError("image_size is required for a model built with dynamic_img_size=True")
            image_size = self.masked.img_size[0]
        check_positive(image_size, "image_size")
        if image_size % self.patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of the model's patch size ({self.patch})")
        if self.masked.img_size is not None and (image_size, image_size) != self.masked.img_size:
            raise ValueError(f"image_size ({image_size}) must be the model's image size {self.masked.img_size}")
        eps = _number("eps", eps)
        lr, lr_baseline = _number("lr", lr), _number("lr_baseline", lr_baseline)
        lr_alpha = _number("lr_alpha", lr_alpha)
        alpha_max = _number("alpha_max", alpha_max)
        alpha_init = _number("alpha_init", alpha_init, strict=False)
        if alpha_init > alpha_max:
            raise ValueError(f"alpha_init must lie in [0, alpha_max={alpha_max:g}], got {alpha_init!r}")
        scale = _number("scale", scale)
        offset = _number("offset", offset, low=-math.inf)
        if lookahead is not None:
            if not (isinstance(lookahead, (tuple, list)) and len(lookahead) == 2
                    and isinstance(lookahead[0], (int, float)) and not isinstance(lookahead[0], bool)
                    and 0 < lookahead[0] <= 1 and isinstance(lookahead[1], int) and not isinstance(lookahead[1], bool)
                    and lookahead[1] >= 1):
                raise ValueError(f"lookahead must be None or (alpha in (0, 1], k an int >= 1), got {lookahead!r}")
            lookahead = (float(lookahead[0]), int(lookahead[1]))
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        check_positive(batch_size, "batch_size")
        if not isinstance(learn_baseline, bool):
            raise TypeError(f"learn_baseline must be True or False, got {learn_baseline!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")

        self.model, self.replace = model, replace
        self.kind = self.masked.kind
        vit = model
        if self.kind == "timm":
            self._embed_module, self._blocks = vit.patch_embed, list(vit.blocks)
            dim = int(vit.embed_dim)
        else:
            self._embed_module, self._blocks = vit.conv_proj, list(vit.encoder.layers)
            dim = int(vit.hidden_dim)
        self.prefix = int(self.masked.prefix)
        self.n_probes = len(self._blocks) + 2
        hidden = dim // 4 if hidden is None else hidden
        check_positive(hidden, "hidden")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(float(v) for v in (mean if mean is not None else cfg.get("mean", IMAGENET_MEAN)))
        std = tuple(float(v) for v in (std if std is not None else cfg.get("std", IMAGENET_STD)))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must hold 3 values each, std > 0; got mean={mean}, std={std}")
        self.image_size = image_size
        self.grid = (image_size // self.patch, image_size // self.patch)
        self.config = dict(method=METHOD, replace=replace, image_size=image_size, mean=mean, std=std, eps=eps, lr=lr,
                           lr_baseline=lr_baseline, lr_alpha=lr_alpha, alpha_init=alpha_init, alpha_max=alpha_max,
                           scale=scale, offset=offset, hidden=hidden, learn_baseline=learn_baseline,
                           lookahead=lookahead, warmup=warmup, batch_size=batch_size, seed=seed)

        p = next(model.parameters())
        with _seeded(seed):
            self.gate = _Gates(dim, self.n_probes, hidden, scale, offset, learn_baseline).to(p.device, p.dtype)
        self.multipliers = nn.ParameterList([nn.Parameter(torch.tensor(alpha_init, device=p.device, dtype=p.dtype))
                                             for _ in range(self.n_probes)])
        groups = [{"params": list(self.gate.probes.parameters()), "lr": lr}]
        if learn_baseline:
            groups.append({"params": [self.gate.baseline], "lr": lr_baseline})
        la, lk = lookahead if lookahead is not None else (None, 1)
        self.optimizer = _Lookahead(torch.optim.Adam(groups), la, lk)
        self.lagrange_optimizer = _Lookahead(torch.optim.Adam(list(self.multipliers), lr=lr_alpha, maximize=True),
                                             la, lk)
        self._base_lrs = [g["lr"] for g in self.optimizer.optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.history: List[dict] = []
        self._running = {"kl": [], "kept": []}
        self._fingerprint: Optional[str] = None

    # -- properties --------------------------------------------------------------------------
    @property
    def model_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def baseline(self) -> torch.Tensor:
        """The baseline vector b (D), a patch embedding before the position embedding."""
        return self.gate.baseline

    @property
    def lagrange(self) -> torch.Tensor:
        """The L + 2 Lagrange multipliers, one per hidden state."""
        return torch.stack([m.detach() for m in self.multipliers])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.config["mean"], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config["std"], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def _check_images(self, images, name: str = "images") -> torch.Tensor:
        images = self._image_batch(images, name, "the ViT's image size")
        check_pixel_range(images, name)
        p = next(self.model.parameters())
        return images.to(p.device, p.dtype)

    def _as_gates(self, gates: torch.Tensor, n: int) -> torch.Tensor:
        """N x P gates from N x P, N x gh x gw or N x 1 x gh x gw."""
        p = self.grid[0] * self.grid[1]
        if not isinstance(gates, torch.Tensor) or gates.numel() != n * p:
            got = tuple(gates.shape) if isinstance(gates, torch.Tensor) else repr(gates)
            raise ValueError(f"gates must hold one value per patch ({n} x {p}, or {n} x 1 x {self.grid[0]} x "
                             f"{self.grid[1]}), got {got}")
        return gates.reshape(n, p)

    # -- the ViT's forward with hooks -------------------------------------------------------
    def _tokens(self, out: torch.Tensor) -> torch.Tensor:
        """The patch embedding module's output as N x P x D (timm NLC or NHWC; torchvision NCHW)."""
        if self.kind == "torchvision":
            return out.flatten(2).transpose(1, 2)
        return out.reshape(out.shape[0], -1, out.shape[-1])

    def _blend(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z h + (1 - z) b at the patch embedding module's output, in its own layout."""
        n = out.shape[0]
        b = self.gate.baseline.to(out.dtype)
        if self.kind == "torchvision":  # N x D x gh x gw
            z, b = z.reshape(n, 1, *out.shape[2:]), b.view(1, -1, 1, 1)
        elif out.dim() == 4:  # timm NHWC (dynamic image size)
            z = z.reshape(n, out.shape[1], out.shape[2], 1)
        else:  # timm N x L x D
            z = z.reshape(n, -1, 1)
        z = z.to(out.dtype)
        return z * out + (1 - z) * b

    @contextlib.contextmanager
    def _hooked(self, states: Optional[list] = None, gates: Optional[torch.Tensor] = None):
        """Hooks for one forward: collect the L + 2 hidden states (patch tokens only) into ``states``; replace
        the patch embeddings by the blend with the baseline at ``gates``."""
        p = self.prefix
        handles = []

        def on_embed(_m, _inp, out):
            if states is not None:
                states.append(self._tokens(out))
            if gates is not None:
                return self._blend(out, gates)

        handles.append(self._embed_module.register_forward_hook(on_embed))
        if states is not None:
            for blk in self._blocks:
                handles.append(blk.register_forward_pre_hook(lambda _m, inp: states.append(inp[0][:, p:])))
            handles.append(self._blocks[-1].register_forward_hook(lambda _m, _i, out: states.append(out[:, p:])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def hidden_states(self, images: torch.Tensor):
        """(clean logits, the L + 2 hidden states as N x P x D, patch tokens only) of images (pixels)."""
        images = self._check_images(images)
        states: list = []
        with self._hooked(states=states):
            logits = self.model(self.normalise(images))
        if len(states) != self.n_probes:
            raise RuntimeError(f"expected {self.n_probes} hidden states from {type(self.model).__name__}, got "
                               f"{len(states)} (a block was skipped or called twice)")
        return logits, [s.detach() for s in states]

    def gate_logits(self, images: torch.Tensor, upto: Optional[int] = None):
        """(clean logits, N x P x (upto + 1) gate logits of the probes 0..upto (default all))."""
        logits, states = self.hidden_states(images)
        return logits, self.gate(states, self.n_probes - 1 if upto is None else upto)

    def masked_logits(self, images: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The ViT's logits on images (pixels) with the patches gated by ``gates`` in [0, 1] (one per patch:
        N x P, N x gh x gw or N x 1 x gh x gw): blended with the baseline ("baseline") or the soft keeps of
        token dropping ("drop"). Differentiable in the gates and the baseline."""
        images = self._check_images(images)
        n = images.shape[0]
        z = self._as_gates(gates, n)
        x = self.normalise(images)
        if self.replace == "baseline":
            with self._hooked(gates=z):
                return self.model(x)
        mask = gates_to_mask(z.reshape(n, 1, *self.grid).to(x.dtype), self.patch)
        return self.masked(x, mask)

    # -- explaining -------------------------------------------------------------------------
    def _layer(self, layer: Optional[int]) -> int:
        if layer is None:
            return self.n_probes - 1
        if isinstance(layer, bool) or not isinstance(layer, int) or not -self.n_probes <= layer < self.n_probes:
            raise ValueError(f"layer must be None or an int in [-{self.n_probes}, {self.n_probes - 1}] (one per hidden "
                             f"state), got {layer!r}")
        return layer % self.n_probes

    @torch.no_grad()
    def log_keep(self, images: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """N x 1 x gh x gw log expected L0 of each patch's gate, aggregated over the probes 0..layer (default
        all: the explanation)."""
        images = self._check_images(images)
        k = self._layer(layer)
        _, la = self.gate_logits(images, k)
        return log_open_probability(la).sum(-1).reshape(-1, 1, *self.grid)

    def keep_probability(self, images: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """N x 1 x gh x gw expected L0 of each patch's gate (1 = the patch is needed)."""
        return self.log_keep(images, layer).exp()

    @torch.no_grad()
    def explain(self, images: torch.Tensor, targets: Union[None, int, Sequence[int]] = None,
                layer: Optional[int] = None):
        """One MapExplanation per image (a single one for a 3 x H x W image), from one forward pass.

        Weights: each patch's expected L0 (the same for every target: the objective is the whole output
        distribution); ``masks``: that map upsampled to pixels (1 x H x W); ``targets`` (default the top-1
        class) only label them. ``info["log_keep"]``: the log of the weights (gh x gw), which orders the
        patches without the float saturation near 1. ``layer``: the map aggregated up to that probe.
        """
        single = isinstance(images, torch.Tensor) and images.dim() == 3
        images = self._check_images(images)
        k = self._layer(layer)
        logits, la = self.gate_logits(images, k)
        log_keep = log_open_probability(la).sum(-1).reshape(-1, 1, *self.grid)
        keep = log_keep.exp()
        targets = per_image_targets(targets, logits)
        seg = patch_segments(self.image_size, self.image_size, self.patch)
        out = []
        for i, t in enumerate(targets):
            out.append(MapExplanation(METHOD, self.replace, [t], keep[i].reshape(1, -1).float().cpu(), seg,
                                      masks=gates_to_mask(keep[i:i + 1], self.patch)[0].float().cpu(),
                                      info={"kept": float(keep[i].mean()), "amortised": True, "layer": k,
                                            "log_keep": log_keep[i, 0].float().cpu()}))
        return out[0] if single else out

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, batch_size: Optional[int] = None) -> dict:
        """Mean KL(clean || masked) at the deterministic gates (the product over all probes) and the mean
        expected L0 (kept fraction)."""
        images = self._check_images(images, "val_images")
        bs = batch_size or self.config["batch_size"]
        kls, kept = [], []
        for i in range(0, images.shape[0], bs):
            x = images[i:i + bs]
            clean, la = self.gate_logits(x)
            kls.append(kl_divergence(clean, self.masked_logits(x, deterministic_gate(la).prod(-1))))
            kept.append(log_open_probability(la).sum(-1).exp().mean(-1))
        return {"kl": float(torch.cat(kls).mean()), "kept": float(torch.cat(kept).mean())}

    # -- training ---------------------------------------------------------------------------
    def fit(self, data, *, epochs: int = 5, val_images: Optional[torch.Tensor] = None, augment: bool = False,
            checkpoint: Optional[str] = None, checkpoint_every: int = 10, val_every: int = 1,
            progress: Optional[bool] = None, callback: Optional[Callable[[dict], None]] = None) -> List[dict]:
        """Train the probes, the baseline and the multipliers; returns the history (one dict per epoch).

        ``data``: an N x 3 x H x W tensor or a list of 3 x H x W photos (resized to the image size, or
        random resized crops and flips when ``augment``), or a DataLoader of ready batches. As
        masked_ops.explain.DiffMask.fit otherwise (checkpoint and resume, ``val_images``, ``callback``).
        """
        return self._fit_loop(data, epochs=epochs, val_images=val_images, augment=augment, checkpoint=checkpoint,
                              checkpoint_every=checkpoint_every, val_every=val_every, progress=progress,
                              callback=callback, device=next(self.model.parameters()).device,
                              desc=f"Vision DiffMask fit ({self.replace})",
                              frozen=frozen_parameters(types.SimpleNamespace(model=self.model)))  # the ViT's too

    def _history_lagrange(self) -> List[float]:
        return [float(v) for v in self.lagrange]

    def _train_step(self, x: torch.Tensor) -> dict:
        """One step of the published objective (module docstring) on the batch x (pixels)."""
        k = int(torch.randint(self.n_probes, (), generator=self.generator))
        warm = self.config["warmup"]
        factor = min(1.0, self.step / warm) if warm else 1.0
        for group, base in zip(self.optimizer.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor
        with torch.enable_grad():
            clean, la = self.gate_logits(x, k)                          # N x P x (k + 1)
            z = hard_concrete_sample(la, self.generator).prod(-1)       # every probe 0..k must keep the patch
            log_l0 = log_open_probability(la).sum(-1)                   # log P(product gate != 0), N x P
            kl = kl_divergence(clean, self.masked_logits(x, z))
            alpha = self.multipliers[k]
            loss = (alpha * (kl - self.config["eps"]) + log_l0.mean(-1)).mean()
            self.optimizer.zero_grad()
            self.lagrange_optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.lagrange_optimizer.step()  # gradient ascent (maximize=True) on alpha_k only (the others: no grad)
        with torch.no_grad():
            for m in self.multipliers:
                m.clamp_(0, self.config["alpha_max"])
        return {"loss": float(loss.detach()), "kl": float(kl.detach().mean()),
                "kept": float(log_l0.detach().exp().mean()),
                "layer": k, "lagrange": float(self.multipliers[k].detach())}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "method": METHOD, "config": dict(self.config),
                "model": self.model_fingerprint, "gate": self.gate.state_dict(), "lagrange": self.lagrange.clone(),
                "optimizer": self.optimizer.state_dict(), "lagrange_optimizer": self.lagrange_optimizer.state_dict(),
                "step": self.step, "generator": self.generator.get_state(), "history": list(self.history),
                "running": {k: list(v) for k, v in self._running.items()}}

    def load_state_dict(self, state: dict, *, source: str = "state_dict") -> None:
        """Load a state (``state_dict()`` or a checkpoint file's content) made for this model and config."""
        if state.get("format") != CHECKPOINT_FORMAT or state.get("method") != METHOD:
            raise ValueError(f"{source} is not a Vision DiffMask state (format {CHECKPOINT_FORMAT}, method {METHOD})")
        if state["model"] != self.model_fingerprint:
            raise ValueError(f"{source} was made for another model (its weights' fingerprint is {state['model']}, "
                             f"this model's is {self.model_fingerprint})")
        saved = state["config"]
        diff = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
        if diff:
            what = ", ".join(f"{k}={saved.get(k)!r} vs {self.config.get(k)!r}" for k in diff)
            raise ValueError(f"{source} was made with another Vision DiffMask configuration (differs in: {what})")
        self.gate.load_state_dict(state["gate"])
        with torch.no_grad():
            for m, v in zip(self.multipliers, state["lagrange"]):
                m.fill_(float(v))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lagrange_optimizer.load_state_dict(state["lagrange_optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self._running = {k: list(v) for k, v in state["running"].items()}

    @classmethod
    def load(cls, path: str, model: nn.Module) -> "VisionDiffMask":
        """A VisionDiffMask rebuilt from a checkpoint file for ``model`` (refused if made for another model)."""
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != METHOD:
            raise ValueError(f"checkpoint {os.fspath(path)!r} is not a Vision DiffMask checkpoint")
        cfg = dict(ckpt["config"])
        cfg.pop("method")
        dm = cls(model, **cfg)
        dm.load_state_dict(ckpt, source=f"checkpoint {os.fspath(path)!r}")
        return dm


@contextlib.contextmanager
def _seeded(seed: int):
    """Run with torch's global generator seeded (the probes' initialisation), restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- per-image variant
def explain_vision_diffmask(model: nn.Module, image: torch.Tensor, *, targets: Union[None, int, Sequence[int]] = None,
                            replace: str = "baseline", steps: int = 300, samples: int = 8, lr: float = 1e-2,
                            lr_baseline: float = 1e-2, warmup: int = 0, augment: bool = False,
                            progress: Optional[bool] = None, **options) -> MapExplanation:
    """Per-image Vision DiffMask: fit the probes (and baseline, multipliers) on ``image`` alone, then explain it.

    Each step runs ``samples`` copies of the image (one gate draw each); ``steps`` steps in all. The paper
    trains on a data set (``VisionDiffMask.fit``); on one image its learning rates (2e-5, 1e-3) and warm-up
    (1200 steps) move nothing in a few hundred steps, so this helper's defaults are larger (lr and
    lr_baseline 1e-2, no warm-up). ``options``: any other VisionDiffMask argument (eps, alpha_init, ...).
    ``info`` adds the KL at the deterministic gates and the final multipliers.
    """
    image = prepare_image(image)
    check_positive(steps, "steps")
    check_positive(samples, "samples")
    size = options.pop("image_size", None)
    if size is None and getattr(model, "dynamic_img_size", False):  # a timm ViT for any size: this image's
        size = int(image.shape[-1])
    dm = VisionDiffMask(model, replace=replace, lr=lr, lr_baseline=lr_baseline, warmup=warmup, batch_size=samples,
                        image_size=size, **options)
    dm._check_images(image, "image")
    dm.fit([image] * samples, epochs=steps, augment=augment, progress=progress)
    exp = dm.explain(image, targets)
    exp.info.update(amortised=False, steps=steps, kl=dm.evaluate(image)["kl"],
                    lagrange=[float(v) for v in dm.lagrange])
    return exp
