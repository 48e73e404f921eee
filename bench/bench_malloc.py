"""What glibc's malloc settings cost a CPU explanation: the system defaults against masked_ops.keep_freed_memory().

    python bench/bench_malloc.py                 # EfficientNet-Lite0 channels_last, batch 4, eager, 4 rounds
    python bench/bench_malloc.py --compile       # the same models under torch.compile
    python bench/bench_malloc.py --smoke         # 2 batches, 1 round: tests the script

mallopt settings are per process and cannot be taken back, so each round runs two child processes, one
with the defaults and one with keep_freed_memory(), in alternating order. Each child times, interleaved
per batch (a shared host's slow phases hit all alike), the per-batch work of a LIME run on the
scikit-image cat: the plain model's forward of a ready batch (the floor), and the bound forwards of grey
fill and layer masking (masked_ops.explain.Strategy.bind) on masks built from SLIC segments.
Figures: per contender the median over rounds of ms per batch under each setting, and of the per-round
ratio keep_freed_memory / defaults (< 1: faster with it).
Results go to bench/results/<device>-malloc-<date>.json (--compile: <device>-malloc-compiled-<date>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def child(args) -> dict:
    """One process's ms per batch for each contender (run with or without --keep-freed-memory)."""
    from masked_ops.explain import get_strategy, segment
    from masked_ops.images import load_image

    model, info = H.lite0()
    image = info.prepare(load_image("chelsea"))[0]
    seg = segment(image, "slic", n_segments=50)
    k = int(seg.max()) + 1
    b = args.batch_size
    run_model = torch.compile(model) if args.compile else model
    grey = get_strategy("grey", run_model, mean=info.mean, std=info.std)
    layer = get_strategy("layer", model, mean=info.mean, std=info.std)
    if args.compile:
        layer._masked = torch.compile(layer.masked_model)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    ready = ((image[None] - mean) / std).expand(b, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    samples = torch.randint(0, 2, (args.batches * b, k), generator=torch.Generator().manual_seed(0)).bool()

    def per_batch(forward):
        def step(i):
            z = samples[i * b:(i + 1) * b]
            return forward(z[:, seg].unsqueeze(1)).float().softmax(1)[:, 0].cpu()
        return step

    contenders = {"plain_forward": lambda i: run_model(ready), "grey": per_batch(grey.bind(image)),
                  "layer": per_batch(layer.bind(image))}
    seconds = {n: 0.0 for n in contenders}
    with torch.inference_mode():
        for f in contenders.values():  # warm-up (and compiles)
            f(0)
            f(0)
        for i in range(args.batches):
            for n, f in contenders.items():
                t = time.perf_counter()
                f(i)
                seconds[n] += time.perf_counter() - t
    return {n: s * 1e3 / args.batches for n, s in seconds.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=60, help="batches per contender per child (default 60)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4, the CPU default)")
    p.add_argument("--compile", action="store_true", help="the plain and the layer-masked model under torch.compile")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = H.script_args(p, argv, repeats=4, smoke=dict(batches=2, repeats=1))
    if args.child:
        print(json.dumps(child(args)))
        return 0

    out = H.results_path(args, "malloc-compiled" if args.compile else "malloc")
    settings = ("defaults", "keep_freed_memory")
    per_round = {s: [] for s in settings}
    summary = dict(benchmark="malloc", model="efficientnet-lite0", format="channels_last", compiled=args.compile,
                   batch_size=args.batch_size, batches=args.batches, repeats=args.repeats, dtype="float32",
                   input_shape=[args.batch_size, 3, 224, 224], **H.environment(torch.device("cpu")),
                   complete=False, results={})
    base = [sys.executable, os.path.abspath(__file__), "--child", "--batches", str(args.batches),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads)] + (["--compile"] if args.compile else [])
    for r in range(args.repeats):
        order = settings if r % 2 == 0 else settings[::-1]  # alternate who runs first
        for s in order:
            cmd = base + (["--keep-freed-memory"] if s == "keep_freed_memory" else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            per_round[s].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.repeats} {s}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in per_round[s][-1].items()),
                  flush=True)
        results = {}
        for n in per_round[settings[0]][0]:
            d = [x[n] for x in per_round["defaults"]]
            k = [x[n] for x in per_round["keep_freed_memory"]]
            results[n] = {"defaults_ms": statistics.median(d), "keep_freed_memory_ms": statistics.median(k),
                          "defaults_all_ms": d, "keep_freed_memory_all_ms": k,
                          "ratio": statistics.median(b / a for a, b in zip(d, k))}
        summary["results"] = results
        H.write_json(out, summary)
    summary["complete"] = True
    H.write_json(out, summary)
    print(json.dumps({n: round(v["ratio"], 3) for n, v in summary["results"].items()}),
          "(ms per batch with keep_freed_memory / with the defaults)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
