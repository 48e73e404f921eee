"""The cross-model report: one page comparing the runs of several models side by side.

``write_summary(root)`` finds every ROOT/<model>/ that holds experiment results (written by
``masked-ops experiment NAME --out ROOT/<model>``), rebuilds each model's own page
(report.write_report) and writes ROOT/README.md: the hand-written ROOT/FINDINGS.md at the top, then
generated tables with one column per model (removal curves, paired differences against layer
masking with their confidence intervals and a verdict, the shape probe, the salient-region test,
LIME faithfulness as SRG), then links to the per-model pages. ``masked-ops experiment summary --out
ROOT`` runs it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from .report import LAYER, ORDER, _table, write_report

# The strongest pixel-space baselines, against which layer masking is judged first.
BASELINES = ("inpaint-telea", "inpaint-ns", "noisy-linear", "blur", "segment-mean", "grey")


def _models(root: Path) -> Dict[str, Dict[str, dict]]:
    found = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        res = {e: json.loads((d / e / "results.json").read_text()) for e in ORDER if (d / e / "results.json").exists()}
        if res:
            found[d.name] = res
    return found


def _ci(v: float, lo: float, hi: float, d: int = 3) -> str:
    return f"{v:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def verdict(lo: float, hi: float) -> str:
    """How a paired difference's 95% CI reads: layer wins / loses / the CI does not separate."""
    if lo > 0:
        return "layer wins"
    if hi < 0:
        return "layer loses"
    return "no separation"


def _removal(models: Dict[str, Dict[str, dict]]) -> List[str]:
    runs = {m: r["removal"] for m, r in models.items() if "removal" in r}
    if not runs:
        return []
    names = list(dict.fromkeys(s for r in runs.values() for s in r["strategies"]))
    mean_rank = {s: -sum(r["strategies"][s]["mean_agreement"] for r in runs.values() if s in r["strategies"])
                 / max(1, sum(s in r["strategies"] for r in runs.values())) for s in names}
    rows = []
    for s in sorted(names, key=mean_rank.get):
        cells = []
        for r in runs.values():
            v = r["strategies"].get(s)
            cells.append(_ci(v["mean_agreement"], *v["mean_agreement_ci95"]) if v else "")
        rows.append([f"**{s}**" if s in LAYER else s] + cells)
    head = ["strategy"] + [f"{m} (mean top-1 agreement [95% CI])" for m in runs]
    setup = "; ".join(
        f"{m}: {r['n_images']} images ({r.get('n_photos', r['n_images'])} photos) x {r['repeats']} orders, "
        f"{r['config'].get('patch', 16)} px patches, {len(r['fractions'])} fractions" for m, r in runs.items())
    out = ["## Removal curves: mean top-1 agreement over the removal fractions",
           f"Random patch removal, 0% to 100% (the paper's experiment; agreement with the clean prediction). "
           f"{setup}. CIs: percentile bootstrap over photos (the views of a photo averaged first).",
           _table(head, rows)]
    prow = []
    for s in [b for b in BASELINES if b in names] + [s for s in names if s not in BASELINES and s != "layer"]:
        cells = []
        for r in runs.values():
            d = r.get("paired_vs_layer", {}).get(s)
            cells.append(f"{d['mean_agreement_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
                         f"{verdict(*d['ci95'])}" if d else "")
        prow.append([s] + cells)
    out += ["Paired difference, layer masking (fill mode) minus each strategy, on the same images and masks "
            "(95% bootstrap CI over photos; 'no separation' = the CI contains 0):",
            _table(["vs"] + list(runs), prow)]
    return out


def _probe(models) -> List[str]:
    runs = {m: r["leakage-probe"] for m, r in models.items() if "leakage-probe" in r}
    if not runs:
        return []
    names = list(dict.fromkeys(s for r in runs.values() for s in r["strategies"]))
    rows = [[f"**{s}**" if s in LAYER else s] +
            [f"{r['strategies'][s]['accuracy']:.3f} ± {r['strategies'][s]['accuracy_se']:.3f} "
             f"(shuffled {r['strategies'][s]['shuffled_accuracy']:.2f})" if s in r["strategies"] else ""
             for r in runs.values()] for s in names]
    r0 = next(iter(runs.values()))
    return ["## Mask-shape leakage: linear probe on the outputs",
            f"Accuracy of a logistic-regression probe naming which of {len(r0['shapes'])} equal-area shapes was "
            f"removed, from the model's log-probabilities (chance {r0['chance']:.3f}; lower = the hole's shape "
            f"leaks less); mean ± s.e. over photo-grouped folds. "
            + "; ".join(f"{m}: {r['n_images']} images from {r['n_photos']} photos" for m, r in runs.items()) + ".",
            _table(["strategy"] + list(runs), rows)]


def _salient(models) -> List[str]:
    runs = {m: r["leakage-salient"] for m, r in models.items() if "leakage-salient" in r}
    if not runs:
        return []
    names = list(dict.fromkeys(s for r in runs.values() for s in r["strategies"]))
    rows = []
    for s in names:
        cells = []
        for r in runs.values():
            v = r["strategies"].get(s)
            cells.append(f"{v['agreement_salient']:.2f} ± {v['agreement_salient_se']:.2f} / "
                         f"{v['agreement_moved']:.2f} ± {v['agreement_moved_se']:.2f}" if v else "")
        rows.append([f"**{s}**" if s in LAYER else s] + cells)
    return ["## Salient region removed vs the same mask moved away",
            "Top-1 agreement with the clean prediction when a blob over the most salient region is removed "
            "(lower = less leakage) / when the same blob is moved away (higher = less missingness bias); "
            "mean ± s.e. over images.",
            _table(["strategy"] + [f"{m} (salient / moved)" for m in runs], rows)]


def _faith(models) -> List[str]:
    runs = {m: r["faithfulness"] for m, r in models.items() if "faithfulness" in r and "srg" in r["faithfulness"]}
    if not runs:
        return []
    out = ["## LIME faithfulness: SRG = AUC(LeRF) - AUC(MoRF)",
           "Explanations by LIME under each strategy (rows; 'random' = a random segment order), scored by "
           "removing segments most-relevant-first and least-relevant-first under each strategy (columns); "
           "SRG on the clean class's probability, higher = more faithful; mean [95% CI over photos]."]
    for m, r in runs.items():
        ev = r["evaluators"]
        rows = [[f"**{e}**" if e in LAYER else e] +
                [_ci(r["srg"][e][v], *r["srg_ci95"][e][v]) for v in ev] for e in r["explainers"]]
        out += [f"**{m}** ({r['n_images']} images, {r['samples']} LIME samples each, {len(r['steps'])} points per "
                f"curve):", _table(["explained under \\ evaluated under"] + ev, rows)]
    return out


def write_summary(root) -> Path:
    """Rebuild every ROOT/<model>/README.md and write ROOT/README.md (module docstring)."""
    root = Path(root)
    models = _models(root)
    if not models:
        raise ValueError(f"{root} holds no experiment results under ROOT/<model>/<experiment>/results.json")
    for m in models:
        write_report(root / m, title=f"Experiments on {m}: layer masking against input fills and imputations "
                                     f"(see ../README.md for all models)")
    parts = ["# Experiments: layer masking against the strongest pixel-space baselines, three pretrained CNNs",
             "Generated by `masked-ops experiment summary --out reports` from the `results.json` files below; "
             "the findings at the top are written by hand."]
    findings = root / "FINDINGS.md"
    if findings.exists():
        parts.append(findings.read_text().strip())
    for section in (_removal, _probe, _salient, _faith):
        parts += section(models)
    parts += ["## Per-model pages (all tables, plots, exact commands and timings)",
              "\n".join(f"- [{m}]({m}/README.md)" for m in models)]
    run_script = root / "run_experiments.sh"
    if run_script.exists():
        parts.append("Every run: [`run_experiments.sh`](run_experiments.sh) (the exact commands, seeds, chunking).")
    path = root / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text("\n\n".join(parts) + "\n")
    tmp.replace(path)
    return path
