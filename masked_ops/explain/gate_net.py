"""DiffMask's gate network for CNNs: the stage outputs it reads, the hooks that read them, the network.

``stage_layers(model)`` picks the modules whose outputs are the model's stages; ``HiddenFeatures``
keeps their outputs during a clean forward (forward hooks); ``GateNet`` turns them into one gate
logit per patch (see masked_ops.explain.diffmask for the whole method).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def stage_layers(model: nn.Module, image_size: int = 224, max_layers: int = 4) -> List[str]:
    """Names of the modules whose outputs are the model's stage outputs: for each spatial
    resolution, among the outermost modules (fewest dots in the name) that output it and are
    called once per forward, the last to run;
    the ``max_layers`` deepest resolutions (1 x 1 outputs, globally pooled, and padding modules
    do not count). Raises ValueError when the model has none."""
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
