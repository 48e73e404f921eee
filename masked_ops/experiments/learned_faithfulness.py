"""Faithfulness of learned-mask explanations (DiffMask, extremal, RISE) against LIME, occlusion, Grad-CAM.

Vision DiffMask's faithfulness task, plus deletion and insertion curves, on held-out photos:

1. DiffMask (amortised) is trained on ``train_images`` (augmented views; checkpointed, resumable)
   and explains ``test_images`` it never saw; every other explainer works on each test image alone.
2. Each explanation is turned into a ranking of ``unit`` x ``unit`` pixel cells (mean attribution
   per cell; ties, e.g. inside one DiffMask patch, broken by a seeded random jitter). DiffMask is
   ranked by its gate logits (the order of its expected L0, without float32 ties near 1).
3. Under each *evaluating* strategy (``evaluators``, default grey, blur and layer masking, hard
   masks), the cells are removed in that order, most relevant first (MoRF) and least relevant
   first (LeRF), at ``steps`` fractions 0..1, and we track the probability of the clean top-1
   class and KL(p_clean || p_masked). Insertion (reveal the most relevant first) is LeRF read
   backwards: revealing the top fraction t is removing the bottom 1 - t.

AUCs (trapezoid over the fractions), mean ± standard error over the test images:

- ``morf_prob``: lower = more faithful (the class goes away fast when its evidence goes);
- ``lerf_prob``: higher = more faithful (removing what the explanation calls irrelevant costs little);
- ``insertion_prob``: higher = more faithful;
- ``morf_kl``: higher = more faithful; ``lerf_kl``: lower = more faithful (Vision DiffMask's pair).

Explainers (``EXPLAINERS``; the strategy after the dash is the one that *made* the explanation):
diffmask-blur, extremal-blur, rise-grey, rise-layer, lime-grey, lime-layer, occlusion-grey,
gradcam (the ``grad-cam`` package on the deepest stage output; a ViT: its last block, ``gradcam_layer``),
random, diffmask-layer and extremal-layer (soft layer masking: ``get_strategy("layer", model, soft=True)``).
RISE runs its soft masks through both of its strategies.

Unit of work: one explainer on one test image (its map and every evaluator's curves).
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..masks import DEFAULT_SOFT
from . import masks as M
from .common import Subject, base_config, check_images, fingerprint
from .metrics import auc, kl_divergence, mean_se
from ..runs.store import Run

STEPS = tuple(round(0.1 * i, 1) for i in range(11))
EVALUATORS = ("grey", "blur", "layer")
EXPLAINERS = ("diffmask-blur", "diffmask-layer", "extremal-blur", "extremal-layer", "rise-grey", "rise-layer",
              "lime-grey", "lime-layer", "occlusion-grey", "gradcam", "random")
METRICS = {"morf_prob": "lower", "lerf_prob": "higher", "insertion_prob": "higher", "morf_kl": "higher",
           "lerf_kl": "lower"}
DEFAULTS = dict(unit=8, patch=16, diffmask_epochs=150, diffmask_batch=6, extremal_iterations=300,
                extremal_areas=(0.05, 0.1, 0.2), rise_masks=1000, lime_samples=500, lime_segments=50,
                occlusion_cells=8)


def cell_order(attribution: torch.Tensor, unit: int, generator: torch.Generator) -> torch.Tensor:
    """Cells of ``unit`` px ranked by mean attribution, most relevant first; ties broken at random."""
    h, w = attribution.shape
    cells = attribution.double().view(h // unit, unit, w // unit, unit).mean(dim=(1, 3)).flatten()
    spread = float(cells.max() - cells.min())
    jitter = torch.rand(cells.shape, generator=generator, dtype=torch.float64) * 1e-9 * max(spread, 1e-30)
    return torch.argsort(cells + jitter, descending=True, stable=True)


def removal_masks(order: torch.Tensor, steps: Sequence[float], size, unit: int):
    """(MoRF, LeRF) visibility masks, each len(steps) x 1 x H x W: the top / bottom fraction t removed."""
    return M.removal_masks(size, unit, steps, order), M.removal_masks(size, unit, steps, order.flip(0))


def _available(explainers: Sequence[str]):
    """(explainers to run, those skipped with the reason, the soft semantics of layer masking: part of
    the run's configuration, so that units computed under another semantics are never mixed in)."""
    for e in explainers:
        if e not in EXPLAINERS:
            raise ValueError(f"unknown explainer {e!r}; expected names from {', '.join(EXPLAINERS)}")
    return list(explainers), {}, DEFAULT_SOFT


def gradcam_layer(model, image_size: int) -> str:
    """The module Grad-CAM reads: the deepest stage output of a CNN; for a vision transformer the first
    norm of its last block (its patch tokens still reach the output through the last attention: the last
    block's own output reaches it only through the class token under class-token pooling, so the patch
    tokens there get no gradient), as pytorch-grad-cam's ViT example."""
    from ..explain.gate_net import stage_layers, vit_blocks, vit_tokens

    if vit_tokens(model) is None:
        return stage_layers(model, image_size)[-1]
    last = vit_blocks(model)[-1]
    return f"{last}.norm1" if hasattr(model, "blocks") else f"{last}.ln_1"


def _gradcam(model, images: torch.Tensor, normalise, layer: str, target: int) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from ..explain.gate_net import tokens_to_grid, vit_tokens

    module = dict(model.named_modules())[layer]
    wrapped = torch.nn.Sequential(_Normalise(normalise), model)
    tokens = vit_tokens(model)  # a ViT: the layer's tokens laid out on the patch grid
    reshape = None if tokens is None else (lambda t: tokens_to_grid(t, *tokens, tuple(images.shape[-2:])))
    with GradCAM(model=wrapped, target_layers=[module], reshape_transform=reshape) as cam:
        out = cam(input_tensor=images, targets=[ClassifierOutputTarget(target)])
    return torch.from_numpy(np.asarray(out[0], dtype=np.float64))


class _Normalise(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def learned_faithfulness(model, test_images: torch.Tensor, train_images: torch.Tensor, *,
                         explainers: Sequence[str] = EXPLAINERS, evaluators: Sequence[str] = EVALUATORS,
                         steps: Sequence[float] = STEPS, seed: int = 0, mean=None, std=None,
                         batch_size: Optional[int] = None, out=None, fresh: bool = False, progress: bool = True,
                         image_names: Optional[Sequence[str]] = None, train_names: Optional[Sequence[str]] = None,
                         **params) -> dict:
    """Run the experiment; returns (and with ``out`` writes) the results dict. ``params`` override
    ``DEFAULTS`` (unit, patch, diffmask_epochs, diffmask_batch, extremal_iterations, extremal_areas,
    rise_masks, lime_samples, lime_segments, occlusion_cells)."""
    from ..explain import (DiffMask, explain_extremal, explain_lime, explain_occlusion, explain_rise,
                           get_strategy)
    from ..explain.soft import soft_strategy
    from ..images import IMAGENET_MEAN, IMAGENET_STD

    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS, **params)
    test_images = check_images(test_images)
    train_images = check_images(train_images)
    mean = mean or IMAGENET_MEAN
    std = std or IMAGENET_STD
    size = tuple(test_images.shape[-2:])
    M.patch_grid(size, cfg["unit"])
    if size[0] != size[1] or size[0] % cfg["patch"]:
        raise ValueError(f"test images must be square with a side that is a multiple of patch={cfg['patch']}, "
                         f"got {size}")
    steps = [float(t) for t in steps]
    if len(steps) < 2 or steps[0] != 0.0 or steps[-1] != 1.0:
        raise ValueError(f"steps must run from 0.0 to 1.0 with at least 2 points, got {steps}")
    explainers, skipped, soft_layer = _available(list(explainers))
    evaluators = list(evaluators)
    subject = Subject(model, evaluators, mean=mean, std=std, batch_size=batch_size, seed=seed)
    config = base_config("learned-faithfulness", subject, test_images, seed, train=fingerprint([train_images]),
                         steps=steps, evaluators=evaluators, soft_layer=soft_layer,
                         **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
    run = Run(out, "learned-faithfulness", config, fresh=fresh, progress=progress)
    n = test_images.shape[0]
    clean = subject.clean_logits(test_images).double()
    targets = clean.argmax(1).tolist()

    # -- DiffMask: trained once per strategy on the training photos (its own checkpoint) ---------
    diffmasks: Dict[str, object] = {}
    diffmask_info: Dict[str, dict] = {}

    def diffmask(strategy_name: str):
        if strategy_name not in diffmasks:
            strat = soft_strategy(strategy_name, model, "DiffMask", mean=mean, std=std, seed=seed)
            dm = DiffMask(model, strategy=strat, patch=cfg["patch"], image_size=size[0],
                          batch_size=cfg["diffmask_batch"], seed=seed, mean=mean, std=std)
            ckpt = None if run.dir is None else str(run.dir / f"diffmask-{strategy_name}.pt")
            t0 = time.process_time()
            dm.fit(list(train_images), epochs=cfg["diffmask_epochs"], val_images=test_images, checkpoint=ckpt,
                   checkpoint_every=5, val_every=max(1, cfg["diffmask_epochs"] // 6), progress=progress)
            diffmask_info[strategy_name] = {"history": dm.history, "cpu_s_this_process": time.process_time() - t0,
                                            "layers": dm.layers}
            diffmasks[strategy_name] = dm
        return diffmasks[strategy_name]

    strategies: Dict[str, object] = {}

    def strategy(name, soft=False):
        key = (name, soft)
        if key not in strategies:
            strategies[key] = soft_strategy(name, model, "this explainer", mean=mean, std=std, seed=seed) if soft \
                else get_strategy(name, model, mean=mean, std=std, seed=seed)
        return strategies[key]

    def attribution(e: str, i: int) -> torch.Tensor:
        x = test_images[i]
        t = targets[i]
        method, _, sname = e.partition("-")
        if e == "random":
            return torch.rand(size, generator=M.generator(seed, i, 29), dtype=torch.float64)
        if e == "gradcam":
            return _gradcam(model, x[None], subject.normalise, gradcam_layer(model, size[0]), t)
        if method == "diffmask":  # ranked by the gate logits: the expected L0's order, without float ties
            la = diffmask(sname).explain(x, targets=t).info["log_alpha"].double()
            return la.repeat_interleave(cfg["patch"], 0).repeat_interleave(cfg["patch"], 1)
        if method == "extremal":
            exp = explain_extremal(strategy(sname, soft=True), x, targets=t, iterations=cfg["extremal_iterations"],
                                   areas=cfg["extremal_areas"], preset="fast", seed=seed, progress=False)
            return exp.heatmap().double()
        if method == "rise":
            exp = explain_rise(strategy(sname, soft=soft_layer), x, targets=t, n_masks=cfg["rise_masks"], seed=seed,
                               binary=not soft_layer, batch_size=batch_size, progress=False)
            return exp.heatmap().double()
        if method == "lime":
            exp = explain_lime(strategy(sname), x, targets=t, num_samples=cfg["lime_samples"],
                               n_segments=cfg["lime_segments"], seed=seed, batch_size=batch_size, progress=False)
            return exp.heatmap().double()
        if method == "occlusion":
            exp = explain_occlusion(strategy(sname), x, targets=t, n_segments=cfg["occlusion_cells"] ** 2,
                                    batch_size=batch_size, progress=False)
            return exp.heatmap().double()
        raise AssertionError(e)

    def compute(key):
        e, i = key.rsplit("--", 1)
        i = int(i)
        t0 = time.perf_counter()
        a = attribution(e, i)
        seconds = time.perf_counter() - t0
        order = cell_order(a, cfg["unit"], M.generator(seed, i, 31))
        morf, lerf = removal_masks(order, steps, size, cfg["unit"])
        res = {"attribution": a.float().numpy(), "order": order.numpy(), "seconds": np.float64(seconds)}
        both = torch.cat([morf, lerf])
        for v in evaluators:
            logits = subject.predict(v, test_images[i], both).double()
            prob = logits.softmax(-1)[:, targets[i]]
            kl = kl_divergence(clean[i:i + 1].expand(logits.shape[0], -1), logits)
            res[f"prob_{v}"] = prob.numpy()
            res[f"kl_{v}"] = kl.numpy()
        return res

    keys = [f"{e}--{i:04d}" for e in explainers for i in range(n)]
    units = run.map(keys, compute, desc="learned-faithfulness")
    for e in explainers:  # a rerun that trained nothing still reports the training it loaded
        name = e.partition("-")[2]
        if e.startswith("diffmask-") and name not in diffmask_info and run.dir is not None \
                and (run.dir / f"diffmask-{name}.pt").exists():
            from ..explain.diffmask import load_checkpoint

            ck = load_checkpoint(str(run.dir / f"diffmask-{name}.pt"))
            diffmask_info[name] = {"history": ck["history"], "layers": ck["config"]["layers"]}
    k = len(steps)
    results = {"experiment": "learned-faithfulness", "explainers": explainers, "evaluators": evaluators,
               "skipped": skipped, "steps": steps, "n_images": n, "targets": targets,
               "train_images": list(train_names) if train_names is not None else int(train_images.shape[0]),
               "soft_layer": soft_layer, "params": {kk: list(v) if isinstance(v, tuple) else v for kk, v in cfg.items()},
               "auc": {m: {} for m in METRICS}, "auc_se": {m: {} for m in METRICS}, "better": METRICS,
               "curves": {}, "seconds_per_image": {}, "diffmask": diffmask_info}
    for e in explainers:
        u = [units[f"{e}--{i:04d}"] for i in range(n)]
        results["seconds_per_image"][e] = float(np.median([x["seconds"] for x in u]))
        results["curves"][e] = {}
        for m in METRICS:
            per_v = []
            for v in evaluators:
                vals = []
                for x in u:
                    prob, kl = x[f"prob_{v}"], x[f"kl_{v}"]
                    curves = {"morf_prob": prob[:k], "lerf_prob": prob[k:], "insertion_prob": prob[k:][::-1],
                              "morf_kl": kl[:k], "lerf_kl": kl[k:]}
                    vals.append(auc(curves[m], steps))
                per_v.append(vals)
            mu, se = mean_se(np.array(per_v).T)
            results["auc"][m][e] = dict(zip(evaluators, mu.tolist()))
            results["auc_se"][m][e] = dict(zip(evaluators, se.tolist()))
        for v in evaluators:
            results["curves"][e][v] = {
                "morf_prob": np.mean([x[f"prob_{v}"][:k] for x in u], axis=0).tolist(),
                "insertion_prob": np.mean([x[f"prob_{v}"][k:][::-1] for x in u], axis=0).tolist()}
    if not diffmask_info:
        results.pop("diffmask")
    return run.finish(results, config, image_names)


# ----------------------------------------------------------------------------- report
def _f(x, d=3):
    return f"{x:.{d}f}"


def markdown(r: dict) -> str:
    """The report section (masked_ops.experiments.report)."""
    ev = r["evaluators"]
    p = r["params"]
    out = [f"{r['n_images']} held-out photos ({', '.join(r.get('image_names') or [])}); DiffMask trained on "
           f"{r['train_images'] if isinstance(r['train_images'], int) else ', '.join(r['train_images'])} "
           f"({p['diffmask_epochs']} steps of {p['diffmask_batch']} augmented views). Cells of {p['unit']} px "
           f"removed in attribution order at {len(r['steps'])} fractions; rows: explainer (and the strategy that "
           f"made it), columns: strategy that removes the cells in the evaluation. Extremal: "
           f"{p['extremal_iterations']} steps, areas {p['extremal_areas']}; RISE: {p['rise_masks']} masks"
           f"{'' if r['soft_layer'] else ' (binary, see below)'}"
           f"{'; soft layer masking: ' + repr(r['soft_layer']) if isinstance(r['soft_layer'], str) else ''}; LIME: {p['lime_samples']} samples, "
           f"{p['lime_segments']} SLIC segments; occlusion: {p['occlusion_cells']}x{p['occlusion_cells']} grid."]
    names = {"morf_prob": "Most relevant removed first, AUC of the class probability",
             "lerf_prob": "Least relevant removed first, AUC of the class probability",
             "insertion_prob": "Insertion (most relevant revealed first), AUC of the class probability",
             "morf_kl": "Most relevant removed first, AUC of KL(clean || masked)",
             "lerf_kl": "Least relevant removed first, AUC of KL(clean || masked)"}
    for m, better in r["better"].items():
        best = {v: (min if better == "lower" else max)(r["auc"][m][e][v] for e in r["explainers"]) for v in ev}
        rows = []
        for e in r["explainers"]:
            cells = []
            for v in ev:
                s = f"{_f(r['auc'][m][e][v])} ± {_f(r['auc_se'][m][e][v])}"
                cells.append(f"**{s}**" if r["auc"][m][e][v] == best[v] else s)
            rows.append([e] + cells)
        header = "| explainer | " + " | ".join(ev) + " |"
        table = "\n".join([header, "|" + "---|" * (len(ev) + 1)] + ["| " + " | ".join(row) + " |" for row in rows])
        out += [f"{names[m]} ({better} = more faithful; best per column in bold):", table]
    secs = ", ".join(f"{e} {s:.1f} s" for e, s in r["seconds_per_image"].items())
    out.append(f"Median seconds per explanation on this shared 2-core CPU (not a benchmark): {secs}.")
    for name, info in (r.get("diffmask") or {}).items():
        h = info["history"][-1] if info["history"] else {}
        if h:
            out.append(f"DiffMask ({name}) after {h['step']} steps: training KL {h['train_kl']:.3f}, kept "
                       f"{h['train_kept']:.0%} of the patches; on the held-out photos (deterministic gates) KL "
                       f"{h.get('val_kl', float('nan')):.3f}, kept {h.get('val_kept', float('nan')):.0%}; "
                       f"lambda {h['lagrange']:.2f}.")
    if r.get("skipped"):
        out.append("Not run: " + "; ".join(f"{e} ({why})" for e, why in r["skipped"].items()) + ".")
    out.append("![learned-faithfulness](learned-faithfulness/learned-faithfulness.png)")
    return "\n\n".join(out)


def plot(r: dict, path) -> None:
    """Deletion (MoRF) and insertion curves of every explainer under each evaluator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = r["evaluators"]
    fig, axes = plt.subplots(2, len(ev), figsize=(4.2 * len(ev), 7), squeeze=False)
    for j, v in enumerate(ev):
        for e in r["explainers"]:
            c = r["curves"][e][v]
            style = dict(lw=2.2 if "layer" in e or e.startswith("diffmask") else 1.3,
                         ls="-" if e != "random" else ":")
            axes[0, j].plot(r["steps"], c["morf_prob"], label=e, **style)
            axes[1, j].plot(r["steps"], c["insertion_prob"], label=e, **style)
        axes[0, j].set_title(f"deletion, most relevant first ({v})", fontsize=9)
        axes[1, j].set_title(f"insertion ({v})", fontsize=9)
        for i in range(2):
            axes[i, j].set_xlabel("fraction of cells removed" if i == 0 else "fraction revealed")
            axes[i, j].set_ylabel("p(clean class)")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
