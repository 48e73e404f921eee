"""The report: PNG plots and a markdown summary of whatever results an output directory holds.

``write_report(out)`` reads OUT/<experiment>/results.json for every experiment that has run,
draws OUT/<experiment>/<experiment>.png, and writes OUT/README.md with the tables, the plots,
the exact commands and seeds (OUT/commands.json, written by the CLI) and, at the top, the
hand-written OUT/FINDINGS.md when there is one (the generated part can be rebuilt at any time
with ``masked-ops experiment report --out OUT`` without losing it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from .._util.io import atomic_write, write_json

ORDER = ("removal", "leakage-salient", "leakage-probe", "faithfulness", "linearity", "learned-faithfulness")
LAYER = ("layer", "layer-renorm", "layer-zero")


def _load(out: Path) -> Dict[str, dict]:
    found = {}
    for exp in ORDER:
        p = out / exp / "results.json"
        if p.exists():
            found[exp] = json.loads(p.read_text())
    return found


def units_elapsed(out, experiment: str) -> Optional[float]:
    """Seconds from the oldest checkpointed unit of OUT/<experiment> to now: the wall time of a run
    that was resumed in chunks (each chunk's own times are lost when it is killed)."""
    units = list((Path(out) / experiment / "units").glob("*.npz"))
    return time.time() - min(p.stat().st_mtime for p in units) if units else None


def record_command(out, experiment: str, command: str, wall_s: float, cpu_s: float,
                   elapsed_s: Optional[float] = None) -> None:
    """Remember how an experiment's results were produced (shown in the report)."""
    path = Path(out) / "commands.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    old = data.get(experiment)
    chunks = 1
    if old and old.get("command") == command:  # a resumed chunk of the same run: times add up
        wall_s, cpu_s = wall_s + old["wall_s"], cpu_s + old["cpu_s"]
        chunks = old.get("chunks", 1) + 1
    data[experiment] = {"command": command, "wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1),
                        "chunks": chunks, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if elapsed_s is not None:
        data[experiment]["elapsed_s"] = round(elapsed_s, 1)
    write_json(path, data)


def has_record(out, experiment: str) -> bool:
    path = Path(out) / "commands.json"
    return path.exists() and experiment in json.loads(path.read_text())


# ----------------------------------------------------------------------------- plots
STRONG = ("inpaint-telea", "inpaint-ns", "noisy-linear", "segment-mean")  # the strongest pixel-space fills


def _style(name: str, index: int = 0) -> dict:
    import matplotlib

    colour = {"color": matplotlib.colormaps["tab20"](index % 20)}
    if name in LAYER:
        return {"lw": 2.4, "ls": "-", **colour}
    return {"lw": 1.8 if name in STRONG else 1.3, "ls": "-." if name in STRONG else "--", **colour}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_line(*results: Optional[dict]) -> str:
    """"model: NAME, weights: W" from the first results carrying a "model" entry (the CLI adds it);
    random weights are said loudly. Empty when no result names its model."""
    for r in results:
        m = (r or {}).get("model")
        if isinstance(m, dict):
            text = f"model: {m.get('name')}, weights: {m.get('weights') or 'unknown'}"
            if m.get("pretrained") is False:
                text = "RANDOM WEIGHTS (numbers say nothing about a trained model): " + text
            return text
    return ""


def _save(fig, path: Path, *results: Optional[dict]) -> None:
    caption = model_line(*results)
    if caption:
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=9,
                 color="red" if caption.startswith("RANDOM") else "black")
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_removal(r: dict, path: Path) -> None:
    plt = _plt()
    x = [100 * f for f in r["fractions"]]
    labelled = "clean_accuracy" in r
    fig, axes = plt.subplots(1, 4 if labelled else 3, figsize=(20 if labelled else 15, 4.2))
    for k, (s, v) in enumerate(r["strategies"].items()):
        st = _style(s, k)
        axes[0].errorbar(x, v["agreement"], yerr=v["agreement_se"], label=s, capsize=2, **st)
        axes[1].plot(x, v["kl"], label=s, **st)
        axes[2].plot(x, v["entropy_bits"], label=s, **st)
        if labelled:
            axes[3].errorbar(x, v["accuracy"], yerr=v["accuracy_se"], label=s, capsize=2, **st)
    axes[2].axhline(r["clean_entropy_bits"], color="k", lw=0.8, ls=":", label="clean predictions")
    titles = ("top-1 agreement with the clean prediction", "KL(clean || masked), nats",
              "entropy of the predicted-class histogram, bits")
    if labelled:
        axes[3].axhline(r["clean_accuracy"], color="k", lw=0.8, ls=":", label="clean accuracy")
        titles += (f"top-1 accuracy against the labels ({r['n_labelled']} images)",)
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("patches removed (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Random 16x16 patch removal: {r['n_images']} images x {r['repeats']} orders")
    _save(fig, path, r)
    plt.close(fig)


def plot_leakage(salient: Optional[dict], probe: Optional[dict], path: Path) -> None:
    plt = _plt()
    panels = [p for p in (salient, probe) if p]
    fig, axes = plt.subplots(1, len(panels) + (1 if salient else 0), figsize=(6 * (len(panels) + 1), 4.2))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    i = 0
    if salient:
        names = list(salient["strategies"])
        for j, metric in enumerate(("agreement", "p_clean")):
            ax = axes[i + j]
            for k, which in enumerate(("salient", "moved")):
                vals = [salient["strategies"][s][f"{metric}_{which}"] for s in names]
                errs = [salient["strategies"][s][f"{metric}_{which}_se"] for s in names]
                ax.bar([n + 0.4 * k - 0.2 for n in range(len(names))], vals, 0.4, yerr=errs, capsize=2,
                       label="mask over the salient region" if which == "salient" else "same mask moved away")
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
            ax.set_title(("top-1 agreement" if metric == "agreement" else "probability of the clean class")
                         + f" ({int(100 * salient['area'])}% removed)", fontsize=10)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        i += 2
    if probe:
        ax = axes[i]
        names = list(probe["strategies"])
        vals = [probe["strategies"][s]["accuracy"] for s in names]
        errs = [probe["strategies"][s]["accuracy_se"] for s in names]
        ax.bar(range(len(names)), vals, yerr=errs, capsize=2, color="tab:purple")
        ax.axhline(probe["chance"], color="k", ls=":", label=f"chance ({probe['chance']:.2f})")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"shape probe: accuracy predicting the removed shape ({len(probe['shapes'])} shapes)",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path, salient, probe)
    plt.close(fig)


def plot_faithfulness(r: dict, path: Path) -> None:
    plt = _plt()
    import numpy as np

    ex, ev = r["explainers"], r["evaluators"]
    fig, axes = plt.subplots(1, 2, figsize=(6 + 2.4 * len(ev), 1.6 + 0.6 * len(ex)), layout="constrained")
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        m = np.array([[r[f"{kind}_auc"][e][v] for v in ev] for e in ex])
        im = ax.imshow(m, cmap="viridis_r" if kind == "deletion" else "viridis", aspect="auto")
        for a in range(len(ex)):
            for b in range(len(ev)):
                level = (m[a, b] - m.min()) / (np.ptp(m) + 1e-12)
                dark = level > 0.5 if kind == "deletion" else level < 0.5  # viridis_r vs viridis
                ax.text(b, a, f"{m[a, b]:.3f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
        ax.set_xticks(range(len(ev)), ev, rotation=35, ha="right")
        ax.set_yticks(range(len(ex)), ex)
        ax.set_xlabel("evaluated under")
        ax.set_ylabel("explained under")
        ax.set_title(f"{kind} AUC ({better} = more faithful)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path, r)
    plt.close(fig)


def plot_linearity(r: dict, path: Path) -> None:
    plt = _plt()
    names = list(r["strategies"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric, title in zip(axes, ("cosine", "rel_err"),
                                 ("cosine(F(union), sum of F(patch)), centred", "relative error, centred")):
        vals = [r["strategies"][s][metric] for s in names]
        errs = [r["strategies"][s][f"{metric}_se"] for s in names]
        ax.bar(range(len(names)), vals, yerr=errs, capsize=2,
               color=["tab:red" if s in LAYER else "tab:gray" for s in names])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Linearity: {r['groups']} disjoint patch groups of {100 * r['group_fraction']:.1f}% each")
    _save(fig, path, r)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables
def _f(x, d=3) -> str:
    return f"{x:.{d}f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _removal_md(r: dict) -> str:
    fr = r["fractions"]
    pick = [i for i, f in enumerate(fr) if round(f * 10) % 2 == 0 or f in (0.0, 1.0)]
    rows = []
    labelled = "clean_accuracy" in r
    for s, v in sorted(r["strategies"].items(), key=lambda kv: -kv[1]["mean_agreement"]):
        lo, hi = v["mean_agreement_ci95"]
        acc = [f"{_f(v['mean_accuracy'])} [{_f(v['mean_accuracy_ci95'][0])}, {_f(v['mean_accuracy_ci95'][1])}]"] \
            if labelled else []
        rows.append([f"**{s}**" if s in LAYER else s] + acc + [f"{_f(v['mean_agreement'])} [{_f(lo)}, {_f(hi)}]",
                     _f(v["mean_kl"], 2)] + [_f(v["agreement"][i], 2) for i in pick])
    head = ["strategy"] + (["mean top-1 accuracy vs labels [95% CI]"] if labelled else []) + \
        ["mean top-1 agreement [95% CI]", "mean KL"] + [f"{round(100 * fr[i])}%" for i in pick]
    ent_rows = []
    for s, v in r["strategies"].items():
        cells = [f"{_f(v['entropy_bits'][i], 2)} ({v['top_class_name'][i]}, {100 * v['top_share'][i]:.0f}%)"
                 for i in pick[1:-1]]
        ent_rows.append([s] + cells)
    ent_head = ["strategy"] + [f"{round(100 * fr[i])}%" for i in pick[1:-1]]
    paper = r.get("paper", {})
    return "\n\n".join([
        f"{r['n_images']} images x {r['repeats']} random patch orders, 16x16 patches. Agreement = top-1 "
        f"prediction equal to the clean one"
        + (f"; accuracy = top-1 prediction equal to the label, over the {r['n_labelled']} labelled images "
           f"(clean accuracy {_f(r['clean_accuracy'])}); the columns per fraction are agreement"
           if labelled else " (the images have no labels)")
        + f". Paper ({paper.get('model')}): "
        f"mean top-1 over the fractions "
        + ", ".join(f"{k} {v}" for k, v in paper.get("mean_agreement", {}).items()) + ".",
        _table(head, rows),
        "Paired over images (same masks): layer masking's mean agreement minus each other strategy's, "
        "95% bootstrap CI over images: " + "; ".join(
            f"{s} {d['mean_agreement_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            for s, d in r.get("paired_vs_layer", {}).items()) + ".",
        f"Entropy (bits) of the predicted-class histogram over the {r['n_images'] * r['repeats']} masked "
        f"predictions per fraction (most frequent class and its share in brackets); clean predictions: "
        f"{_f(r['clean_entropy_bits'], 2)} bits, maximum {_f(r['max_entropy_bits'], 2)}.",
        _table(ent_head, ent_rows),
        "![removal curves](removal/removal.png)"])


def _salient_md(r: dict) -> str:
    rows = []
    labelled = "clean_accuracy" in r
    for s, v in r["strategies"].items():
        acc = [f"{_f(v[f'accuracy_{w}'], 2)} ± {_f(v[f'accuracy_{w}_se'], 2)}" for w in ("salient", "moved")] \
            if labelled else []
        rows.append([f"**{s}**" if s in LAYER else s] + acc + [
                     f"{_f(v['agreement_salient'], 2)} ± {_f(v['agreement_salient_se'], 2)}",
                     f"{_f(v['p_clean_salient'])} ± {_f(v['p_clean_salient_se'])}",
                     f"{_f(v['agreement_moved'], 2)} ± {_f(v['agreement_moved_se'], 2)}",
                     f"{_f(v['p_clean_moved'])} ± {_f(v['p_clean_moved_se'])}", _f(v["p_clean_gap"])])
    return "\n\n".join([
        f"{r['n_images']} images; a blob of {100 * r['area']:.0f}% of the image over the most salient region "
        f"(plain model's gradient saliency, smoothed), and the same blob moved to where it overlaps the "
        f"first least (mean overlap {100 * r['moved_overlap_mean']:.0f}%). Mean ± standard error over images."
        + (f" Accuracy against the labels over the {r['n_labelled']} labelled images (clean accuracy "
           f"{_f(r['clean_accuracy'])})." if labelled else ""),
        _table(["strategy"] + (["accuracy vs labels, salient removed", "accuracy vs labels, moved"] if labelled
                               else []) +
               ["agreement, salient removed (lower = less leakage)", "p(clean class), salient removed",
                "agreement, moved (higher = less bias)", "p(clean class), moved", "p gap (moved - salient)"],
               rows)])


def _probe_md(r: dict) -> str:
    rows = [[f"**{s}**" if s in LAYER else s, f"{_f(v['accuracy'])} ± {_f(v['accuracy_se'])}",
             _f(v["shuffled_accuracy"])] for s, v in r["strategies"].items()]
    return "\n\n".join([
        f"{len(r['shapes'])} shapes ({', '.join(r['shapes'])}) of equal area "
        f"(~{100 * sum(r['removed_area'].values()) / len(r['removed_area']):.0f}% of the image, position "
        f"jittered), each on {r['n_images']} images from {r['n_photos']} photos; logistic regression on the "
        f"{r['features']}, cross-validated with folds grouped by photo. Chance = {_f(r['chance'])}.",
        _table(["strategy", "probe accuracy (mean ± s.e. over folds)", "same, labels shuffled"], rows),
        "![leakage](leakage/leakage.png)"])


def _faith_md(r: dict) -> str:
    ev = r["evaluators"]
    out = [f"{r['n_images']} images, SLIC segments (~{r['n_segments_mean']:.0f} per image), {r['samples']} LIME "
           f"samples per image shared by all strategies; curves at {len(r['steps'])} points. Rows: strategy "
           f"that produced the explanation ('random' = random segment order); columns: strategy used to "
           f"delete/insert. Mean over images."]
    for kind, note in (("deletion", "lower = more faithful"), ("insertion", "higher = more faithful")):
        rows = [[f"**{e}**" if e in LAYER else e] +
                [f"{_f(r[f'{kind}_auc'][e][v])} ± {_f(r[f'{kind}_auc_se'][e][v])}" for v in ev]
                for e in r["explainers"]]
        out += [f"{kind.capitalize()} AUC ({note}):", _table(["explained under \\ evaluated under"] + ev, rows)]
    if "srg" in r:
        rows = [[f"**{e}**" if e in LAYER else e] +
                [f"{_f(r['srg'][e][v])} [{_f(r['srg_ci95'][e][v][0])}, {_f(r['srg_ci95'][e][v][1])}]" for v in ev]
                for e in r["explainers"]]
        out += ["SRG = AUC(LeRF) - AUC(MoRF) on the clean class's probability (higher = more faithful; 95% "
                "bootstrap CI over photos):", _table(["explained under \\ evaluated under"] + ev, rows)]
        rows = [[f"**{e}**" if e in LAYER else e] +
                [f"{_f(r['road_morf_auc'][e][v])} / {_f(r['road_lerf_auc'][e][v])}" for v in ev]
                for e in r["explainers"]]
        out += ["ROAD-style accuracy curves (top-1 agreement with the clean prediction): AUC of MoRF (lower = "
                "more faithful) / AUC of LeRF (higher = more faithful):",
                _table(["explained under \\ evaluated under"] + ev, rows)]
    out.append("![faithfulness](faithfulness/faithfulness.png)")
    return "\n\n".join(out)


def _linearity_md(r: dict) -> str:
    rows = [[f"**{s}**" if s in LAYER else s, f"{_f(v['cosine'])} ± {_f(v['cosine_se'])}",
             f"{_f(v['rel_err'])} ± {_f(v['rel_err_se'])}", _f(v["rel_err_raw"])]
            for s, v in r["strategies"].items()]
    return "\n\n".join([
        f"{r['n_images']} images x {r['repeats']} draws of {r['groups']} disjoint groups of 16x16 patches "
        f"({100 * r['group_fraction']:.1f}% of the image each). Features = logits; centred = minus the "
        f"logits with nothing visible. Layer masking pools by a masked *mean*, so its union is the average "
        f"of the parts, not their sum: read its cosine, not its relative error.",
        _table(["strategy", "cosine (centred)", "relative error (centred)", "relative error (raw)"], rows),
        "![linearity](linearity/linearity.png)"])


SECTIONS = (("removal", "1. Removal curves", _removal_md),
            ("leakage-salient", "2a. Mask-shape leakage: salient region vs the same mask moved away", _salient_md),
            ("leakage-probe", "2b. Mask-shape leakage: linear probe on the outputs", _probe_md),
            ("faithfulness", "3. LIME faithfulness (deletion / insertion)", _faith_md),
            ("linearity", "4. Linearity", _linearity_md))


def _learned_md(r: dict) -> str:
    from .learned_faithfulness import markdown

    return markdown(r)


SECTIONS += (("learned-faithfulness", "5. Learned masks: faithfulness of DiffMask, extremal, RISE, LIME, occlusion, "
              "Grad-CAM", _learned_md),)


def write_report(out, command: Optional[str] = None, title: Optional[str] = None) -> Path:
    """Draw the plots and write OUT/README.md from the results in OUT; returns the README path."""
    out = Path(out)
    results = _load(out)
    if "removal" in results:
        plot_removal(results["removal"], out / "removal" / "removal.png")
    if "leakage-salient" in results or "leakage-probe" in results:
        (out / "leakage").mkdir(parents=True, exist_ok=True)
        plot_leakage(results.get("leakage-salient"), results.get("leakage-probe"), out / "leakage" / "leakage.png")
    if "faithfulness" in results:
        plot_faithfulness(results["faithfulness"], out / "faithfulness" / "faithfulness.png")
    if "linearity" in results:
        plot_linearity(results["linearity"], out / "linearity" / "linearity.png")
    if "learned-faithfulness" in results:
        from .learned_faithfulness import plot as plot_learned

        plot_learned(results["learned-faithfulness"], out / "learned-faithfulness" / "learned-faithfulness.png")

    parts = [f"# {title or 'Experiments: layer masking against input fills'}",
             "Generated by `masked-ops experiment report` from the `results.json` files next to this page; "
             "the findings at the top are written by hand."]
    findings = out / "FINDINGS.md"
    if findings.exists():
        parts.append(findings.read_text().strip())
    for exp, title, fn in SECTIONS:
        if exp in results:
            line = model_line(results[exp])
            parts += [f"## {title}"] + ([f"*{line[0].upper() + line[1:]}.*"] if line else []) + \
                [fn(results[exp]), f"Numbers: [`{exp}/results.json`]({exp}/results.json)."]
    cmds_path = out / "commands.json"
    if cmds_path.exists():
        cmds = json.loads(cmds_path.read_text())
        rows = [[e, f"`{c['command']}`", f"{c['wall_s']:.0f}", f"{c['cpu_s']:.0f}",
                 f"{c['elapsed_s']:.0f}" if "elapsed_s" in c else ""] for e, c in cmds.items()]
        parts += ["## How these numbers were produced",
                  "Each command below resumes from its checkpoints if interrupted (`OUT/<experiment>/units/`, "
                  "not committed). Seeds are the `--seed` values (masks, patch orders, LIME samples, noise "
                  "fill all derive from it). Wall and CPU seconds are those of the process that finished the "
                  "run (user+system time on the shared 2-core machine); a run resumed in chunks also shows the "
                  "elapsed time from its first checkpointed unit to its results.",
                  _table(["experiment", "command", "wall s (last process)", "CPU s (last process)",
                          "elapsed s (first unit to results)"], rows)]
    path = out / "README.md"
    with atomic_write(path, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    return path
