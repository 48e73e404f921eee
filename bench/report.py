"""Turn pytest-benchmark JSON from bench/bench_ops.py into a table of median ratios.

    python bench/report.py bench/results/cpu-latest.json [--markdown]

Every figure is a ratio of medians measured in the same run: for each group (one op at one
shape) each implementation against the plain-PyTorch op ("plain", where the group has one)
and the pure-PyTorch masking backend ("torch") against the fused one ("cpp").
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load_groups(data: dict) -> dict:
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        if ":" not in (bench.get("group") or ""):  # not from bench_ops.py
            continue
        impl = bench.get("extra_info", {}).get("impl") or bench["params"].get("impl")
        groups[bench["group"]][impl] = bench
    return groups


def rows(data: dict):
    for group, impls in sorted(load_groups(data).items()):
        op, shape = group.split(":", 1)
        med = {impl: b["stats"]["median"] for impl, b in impls.items()}
        info = next(iter(impls.values())).get("extra_info", {})
        row = dict(op=op, shape=shape, input=info.get("shape"), dtype=info.get("dtype"),
                   median_ms={k: round(v * 1e3, 3) for k, v in med.items()})
        if "plain" in med:
            row["torch_vs_plain"] = med.get("torch", float("nan")) / med["plain"]
            row["cpp_vs_plain"] = med.get("cpp", float("nan")) / med["plain"]
        if "torch" in med and "cpp" in med:
            row["cpp_speedup_vs_torch"] = med["torch"] / med["cpp"]
        yield row


def markdown(data: dict) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    extra = data.get("masked_ops", {})
    lines = [f"Machine: {cpu}, {m.get('cpu', {}).get('count', '?')} cores; torch {extra.get('torch', '?')}, "
             f"threads {extra.get('threads', 2)}; {data.get('datetime', '')}", "",
             "| op | shape (batch 8, fp32) | plain ms | torch ms | cpp ms | torch/plain | cpp/plain | torch/cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows(data):
        ms = r["median_ms"]

        def f(key, fmt="{:.2f}"):
            v = r.get(key)
            return "" if v is None else fmt.format(v)
        lines.append(f"| {r['op']} | {r['shape']} | {ms.get('plain', '')} | {ms.get('torch', '')} | {ms.get('cpp', '')} "
                     f"| {f('torch_vs_plain')} | {f('cpp_vs_plain')} | {f('cpp_speedup_vs_torch', '{:.1f}x')} |")
    return "\n".join(lines)


def annotate(path: str) -> dict:
    """Record the torch version and thread count in the JSON (pytest-benchmark does not)."""
    import torch

    with open(path) as f:
        data = json.load(f)
    data.setdefault("masked_ops", {}).update(torch=torch.__version__, threads=2,
                                             note="ratios of medians measured in the same run")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    args = parser.parse_args(argv)
    print(markdown(annotate(args.json)))


if __name__ == "__main__":
    main()
