"""``masked-ops explain --method extremal|rise|diffmask``: learned and random masks on the command line.

Called by masked_ops/cli.py once the model's top-5 are printed. One column per masking strategy
(``--masking``; each must take soft masks, see masked_ops.explain.soft) with the map over the
image (top) and the learned mask over the image (bottom: the image where the mask keeps it,
washed to grey elsewhere). ``--samples`` sets the work: optimisation steps for extremal (default
300, the "fast" preset) and per-image DiffMask (default 300), masks for RISE (default 1000).
Default ``--masking``: layer,blur once layer masking takes soft masks, blur,grey until then.
``--checkpoint FILE`` (diffmask only) explains with a fitted amortised DiffMask (one forward
pass; see masked_ops.explain.diffmask): then there is one column, the checkpoint's training
strategy, whatever ``--masking`` says.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .soft import soft_strategy, supports_soft

DEFAULT_WORK = {"extremal": 300, "rise": 1000, "diffmask": 300}


def default_masking() -> List[str]:
    """--masking when not given: layer masking against blur (both take soft masks)."""
    return ["layer", "blur"] if supports_soft("layer") else ["blur", "grey"]


def settings(args, image) -> Tuple[dict, str]:
    """The CLI's Method.settings for the mask methods: (no explainer keyword arguments, a description)."""
    work = args.samples or DEFAULT_WORK[args.method]
    if args.method == "diffmask" and args.checkpoint is not None:
        return {}, f"DiffMask (amortised, {args.checkpoint})"
    what = {"extremal": f"extremal perturbations, {work} steps (fast preset)", "rise": f"RISE, {work} masks",
            "diffmask": f"DiffMask per image, {work} steps"}[args.method]
    return {}, what


def mask_figure(image: torch.Tensor, explanations: Sequence, class_name: str, title: Optional[str] = None):
    """Column 0 the image; column i the map of explanation i over the image (top) and its mask (bottom)."""
    import matplotlib.pyplot as plt

    rgb = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    n = len(explanations)
    fig, axes = plt.subplots(2, n + 1, figsize=(3.2 * (n + 1), 6.6), squeeze=False)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image")
    axes[1, 0].axis("off")
    for i, exp in enumerate(explanations, 1):
        heat = exp.heatmap().numpy()
        axes[0, i].imshow(rgb, alpha=0.35)
        im = axes[0, i].imshow(heat, cmap="viridis", alpha=0.75)
        axes[0, i].set_title(f"{exp.method} ({exp.strategy}): {class_name}", fontsize=9)
        fig.colorbar(im, ax=axes[0, i], fraction=0.046, pad=0.02)
        keep, label = shown_mask(exp)
        axes[1, i].imshow(rgb * keep[:, :, None] + 0.5 * (1 - keep[:, :, None]))
        axes[1, i].set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def shown_mask(exp):
    """(H x W mask in [0, 1], caption) to draw over the image for a MapExplanation."""
    if exp.method == "extremal" and exp.masks is not None:
        areas = exp.info.get("areas", [])
        k = int(np.argmin([abs(a - 0.1) for a in areas])) if areas else 0
        return exp.masks[0, k].numpy(), f"mask, area {areas[k]:g}" if areas else "mask"
    if exp.method == "diffmask" and exp.masks is not None:
        m = exp.masks
        m = m[0] if m.dim() == 3 else m
        return m.numpy(), f"gates (kept {exp.info.get('kept', float(m.mean())):.0%})"
    heat = exp.heatmap()
    cut = torch.quantile(heat.flatten().float(), 0.8)
    return (heat >= cut).float().numpy(), "top 20% of pixels"


def explain_masks(args, x: torch.Tensor, model, info, masking: Sequence[str], target: int) -> list:
    """The explanations of ``x`` (3 x S x S, pixel space) for ``target``: one per masking strategy, or
    one from the fitted DiffMask of ``--checkpoint`` (its training strategy, whatever --masking says)."""
    from .diffmask import DiffMask, explain_diffmask
    from .extremal import explain_extremal
    from .rise import explain_rise

    work = args.samples or DEFAULT_WORK[args.method]
    progress = False if args.no_progress else None
    if args.method == "diffmask" and args.checkpoint is not None:
        t0 = time.perf_counter()
        dm = DiffMask.load(args.checkpoint, model, mean=info.mean, std=info.std)
        try:
            if tuple(x.shape[-2:]) != (dm.image_size, dm.image_size):
                raise ValueError(f"--checkpoint {args.checkpoint!r} explains {dm.image_size} px images; the model "
                                 f"{info.name} takes {x.shape[-1]} px")
            exp = dm.explain(x, targets=target)
        finally:
            dm.close()
        print(f"diffmask (amortised, trained with {exp.strategy} masking): one forward pass, "
              f"{time.perf_counter() - t0:.2f} s")
        return [exp]
    explanations = []
    for name in masking:
        s = soft_strategy(name, model, f"--method {args.method}", mean=info.mean, std=info.std, seed=args.seed)
        t0 = time.perf_counter()
        if args.method == "extremal":
            exp = explain_extremal(s, x, targets=[target], iterations=work, preset="fast", seed=args.seed,
                                   progress=progress)
            what = f"{work} steps x {len(exp.info['areas'])} areas"
        elif args.method == "rise":
            exp = explain_rise(s, x, targets=[target], n_masks=work, seed=args.seed, output=args.output or "prob",
                               batch_size=args.batch_size, progress=progress)
            what = f"{work} masks"
        else:
            patch = 16 if x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0 else 8
            exp = explain_diffmask(s, x, targets=[target], steps=work, patch=patch, seed=args.seed,
                                   progress=progress)
            what = f"{work} steps, per image, kept {exp.info['kept']:.0%}"
        print(f"{args.method} with {s.name} masking: {what}, {time.perf_counter() - t0:.1f} s")
        explanations.append(exp)
    return explanations
