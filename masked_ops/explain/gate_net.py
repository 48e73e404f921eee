"""DiffMask's gate network for CNNs: the stage outputs it reads, the hooks that read them, the network.

``stage_layers(model)`` picks the modules whose outputs are the model's stages; ``HiddenFeatures``
keeps their outputs during a clean forward (forward hooks); ``GateNet`` turns them into one gate
logit per patch (see masked_ops.explain.diffmask for the whole method).

Vision transformers (timm's and torchvision's ``VisionTransformer``, masked_ops.vit): the hidden states
are token sequences (N x tokens x D) of one resolution, so the "stages" are transformer blocks,
``max_layers`` of them evenly spaced up to the last; ``HiddenFeatures`` lays each block's patch tokens
out on the patch grid (N x D x H/p x W/p, the prefix tokens left out), which the gate network reads
as it reads a CNN's feature maps.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def vit_tokens(model: nn.Module) -> Optional[Tuple[int, Tuple[int, int]]]:
    """(number of prefix tokens, patch size) of a timm or torchvision VisionTransformer, None for any
    other model."""
    from ..vit import is_vision_transformer

    if not is_vision_transformer(model):
        return None
    if hasattr(model, "patch_embed"):  # timm
        return int(model.num_prefix_tokens), tuple(int(p) for p in model.patch_embed.patch_size)
    return 1, (int(model.patch_size), int(model.patch_size))  # torchvision: the class token


def vit_blocks(model: nn.Module) -> List[str]:
    """Names of a vision transformer's blocks, in order."""
    if hasattr(model, "blocks"):  # timm
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    return [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]


def tokens_to_grid(t: torch.Tensor, prefix: int, patch: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """N x (prefix + L) x D tokens of an H x W image (``size``) -> N x D x H/p x W/p: the patch tokens on
    their grid (row-major, as a ViT orders them), the prefix tokens (class, registers) left out."""
    gh, gw = size[0] // patch[0], size[1] // patch[1]
    if t.dim() != 3 or t.shape[1] != prefix + gh * gw:
        raise ValueError(f"expected N x {prefix + gh * gw} x D tokens ({prefix} prefix + {gh} x {gw} patches of a "
                         f"{size[0]} x {size[1]} image), got shape {tuple(t.shape)}")
    return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)


def stage_layers(model: nn.Module, image_size: int = 224, max_layers: int = 4) -> List[str]:
    """Names of the modules whose outputs are the model's stage outputs: for each spatial
    resolution, among the outermost modules (fewest dots in the name) that output it and are
    called once per forward, the last to run;
    the ``max_layers`` deepest resolutions (1 x 1 outputs, globally pooled, and padding modules
    do not count). Raises ValueError when the model has none.
    A vision transformer: ``max_layers`` of its blocks, evenly spaced, the last included."""
    if vit_tokens(model) is not None:
        blocks = vit_blocks(model)
        depth = len(blocks)
        picked = sorted({max(0, round((k + 1) * depth / max_layers) - 1) for k in range(max_layers)})
        return [blocks[i] for i in picked]
    seen: Dict[str, tuple] = {}
    calls: Dict[str, int] = {}
    order: List[str] = []
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
                seen[name] = tuple(out.shape[-2:])
                order.append(name)
        return fn

    padding = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
    for name, mod in model.named_modules():
        if name and not isinstance(mod, padding):  # a padded copy is no stage output
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, 3, image_size, image_size, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    # per resolution: the outermost modules (fewest dots: blocks rather than their insides), the last
    # of them to run (the stage's last block)
    depth = {}
    for name in order:
        if calls[name] == 1:
            depth[seen[name]] = min(depth.get(seen[name], 99), name.count("."))
    last: Dict[tuple, str] = {}
    for name in order:
        if calls[name] == 1 and name.count(".") == depth[seen[name]]:
            last[seen[name]] = name
    found = sorted(last.items(), key=lambda kv: order.index(kv[1]))
    if not found:
        raise ValueError("layers: found no module with a 4-D (N x C x H x W) output to read hidden activations "
                         "from; pass layers=[module names]")
    return [name for _, name in found[-max_layers:]]


class HiddenFeatures:
    """Forward hooks that keep the outputs of named modules during a clean forward."""

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"layers: {missing} are not modules of the model (see model.named_modules())")
        self.layers = list(layers)
        self.tokens = vit_tokens(model)  # a ViT: token outputs are laid out on the patch grid
        self.active = False
        self.out: Dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]

    def _hook(self, name):
        def fn(mod, inp, out):
            if self.active:
                self.out[name] = out.detach()
        return fn

    def run(self, model: nn.Module, x: torch.Tensor):
        self.out = {}
        self.active = True
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            self.active = False
        feats = [self.out[n] for n in self.layers]
        if self.tokens is not None:
            feats = [tokens_to_grid(f, *self.tokens, tuple(x.shape[-2:])) if f.dim() == 3 else f for f in feats]
        self.out = {}
        return logits, feats

    def remove(self):
        for h in self.handles:
            h.remove()


def _resample(x: torch.Tensor, grid) -> torch.Tensor:
    if x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


class GateNet(nn.Module):
    """Per-patch gate logits from a CNN's hidden activations (see the module docstring)."""

    def __init__(self, channels: Sequence[int], hidden: int = 64, scale: float = 10.0, offset: float = 5.0):
        super().__init__()
        self.norms = nn.ModuleList([nn.GroupNorm(1, c, affine=False) for c in channels])
        self.proj = nn.ModuleList([nn.Conv2d(c, hidden, 1) for c in channels])
        self.context = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.out.weight)  # every gate starts at logit ``offset``: open
        nn.init.zeros_(self.out.bias)
        self.scale = scale
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, features: Sequence[torch.Tensor], grid) -> torch.Tensor:
        h = 0
        for f, norm, proj in zip(features, self.norms, self.proj):
            h = h + proj(norm(_resample(f.float(), grid)))
        h = torch.tanh(self.context(torch.tanh(h)))
        return torch.tanh(self.out(h)) * self.scale + self.offset
