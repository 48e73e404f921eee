"""Forward-only cost of soft layer masking (what RISE with soft layer masking runs), eager and compiled.

    python bench/bench_soft_forward.py            # Lite0, batch 16, channels_last, 224 px, 2 threads

The plain model, the hard layer-masked model (a 0/1 mask) and the soft one (a mask uniform in [0, 1]),
each eager and under torch.compile, interleaved (bench/harness.py), inference mode. Explains issue 29's
compiled soft-RISE figure (bench/README.md). Results: bench/results/cpu-soft-forward-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    args = H.script_args(p, argv, repeats=7, smoke=dict(batch=2, repeats=1))
    import masked_ops as mo

    model, info = H.lite0()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    soft_m = torch.rand(args.batch, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    hard_m = soft_m > 0.5
    soft, hard = mo.layer_mask(model, soft=True), mo.layer_mask(model)
    plain_c, soft_c, hard_c = torch.compile(model), torch.compile(soft), torch.compile(hard)
    contenders = {"plain": lambda: model(x), "plain_compiled": lambda: plain_c(x),
                  "hard": lambda: hard(x, hard_m), "hard_compiled": lambda: hard_c(x, hard_m),
                  "soft": lambda: soft(x, soft_m), "soft_compiled": lambda: soft_c(x, soft_m)}
    with torch.inference_mode():
        times = H.interleaved(contenders, args.repeats, H.CPU, warmup=2)
    out = H.results_path(args, "soft-forward")
    doc = dict(benchmark="soft_forward", model="efficientnet-lite0", shape=list(x.shape), format="channels_last",
               dtype="float32", repeats=args.repeats, **H.environment(H.CPU),
               ms={k: H.stats(v, digits=2) for k, v in times.items()},
               ratios={k: v for k, v in H.ratios(times, ["plain", "plain_compiled"]).items()})
    H.write_json(out, doc)
    for k in contenders:
        r = doc["ratios"].get(k, {})
        print(f"{k:16s} {doc['ms'][k]['median']:8.1f} ms  /plain {r.get('plain', 1.0):.3f}  "
              f"/plain_compiled {r.get('plain_compiled', 1.0):.3f}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
