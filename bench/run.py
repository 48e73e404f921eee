"""Benchmarks of masked_ops, ops and whole models, on CPU or GPU, in one format (bench/harness.py).

    python bench/run.py --device cpu                      # make bench: bench/results/cpu-<date>.json
    python bench/run.py --device cuda                     # make bench-gpu: bench/results/gpu-<date>.json
    python bench/run.py --device cpu --only models        # one section
    python bench/run.py --device cpu --smoke              # tests the script: tiny shapes, results in /tmp

Every record is measured with interleaved rounds; ratios are against baselines of the same rounds.

models: each model in fill mode (and renorm on GPU), contenders
    plain             the plain model, eager
    plain_compiled    torch.compile(plain model)            (what a speed-minded user runs)
    masked            the layer-masked model, eager, on the fastest backend
    masked_compiled   torch.compile(layer-masked model)
    torch_compiled    torch.compile(layer-masked model on the pure-PyTorch backend): the
                      "write it in PyTorch and compile it" peer
    torch             the layer-masked model on the pure-PyTorch backend, eager (CPU only)
  baselines: plain, plain_compiled, torch_compiled.
ops: each op at ResNet-50 shapes on every backend that runs on the device, against the plain op
  and the pure-PyTorch backend; under compile, the kernel against the decomposed (reference) form
  inside a compiled conv, which is how masked_ops.backends.UNDER_COMPILE was chosen.
soft: each model's forward + backward with respect to a soft mask (layer_mask(..., soft=True)), what a
  learned-mask explainer pays per optimisation step, against the plain model's forward + backward
  with respect to its input (a saliency gradient) and the pure-PyTorch backend.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402  (also puts this checkout's package first on sys.path)

import masked_ops as mo  # noqa: E402
from masked_ops import backends as B  # noqa: E402


# ----------------------------------------------------------------------------- inputs
def patch_mask(n, h, w, device, seed=0, patch=16, fraction=0.5, dtype=torch.float32):
    """Square patches removed with probability ``fraction`` (the paper's random patch removal)."""
    g = torch.Generator("cpu").manual_seed(seed)
    cells = (torch.rand(n, 1, -(-h // patch), -(-w // patch), generator=g) >= fraction).float()
    m = F.interpolate(cells, scale_factor=patch, mode="nearest")[:, :, :h, :w]
    return m.to(device=device, dtype=dtype).contiguous()


def randn(*shape, device, dtype, seed=0, channels_last=False):
    g = torch.Generator("cpu").manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def fast_backends(device):
    if device.type == "cuda":
        return [b for b in ("cuda", "triton") if mo.available(b)]
    return ["cpp"] if mo.available("cpp") else []


@contextlib.contextmanager
def backend(name):
    with mo.set_backend(name):
        yield


def on(name, fn):
    def run():
        with mo.set_backend(name):
            return fn()
    return run


# ----------------------------------------------------------------------------- models
def build_model(name):
    torch.manual_seed(0)
    if name.startswith("efficientnet-lite"):
        from masked_ops.models import load_model

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_model(name)[0]
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval()  # speed does not depend on the weights


def compile_model(fn, args):
    return torch.compile(fn, mode=args.compile_mode) if args.compile_mode else torch.compile(fn)


def bench_models(args, device, records):
    for name, batch in args.models:
        for mode in args.modes:
            label = f"model/{name}/{mode}"
            try:
                net = build_model(name).to(device=device, dtype=args.dtype)
                if args.channels_last:
                    net = net.to(memory_format=torch.channels_last)
                lm = mo.layer_mask(net, mode=mode)
            except Exception as exc:  # a model this torchvision lacks, a rule missing
                records.append({"name": label, "batch": batch, "skipped": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            px = args.pixels
            x = randn(batch, 3, px, px, device=device, dtype=args.dtype, channels_last=args.channels_last)
            m = patch_mask(batch, px, px, device, dtype=args.dtype)
            fast = fast_backends(device)[0] if fast_backends(device) else "torch"
            torch._dynamo.reset()
            plain_c = compile_model(net, args)
            masked_c = compile_model(lm, args)
            torch_c = compile_model(lm, args)  # its own cache entry: guarded on the backend selected
            contenders = {
                "plain": lambda: net(x),
                "plain_compiled": lambda: plain_c(x),
                "masked": on(fast, lambda: lm(x, m)),
                "masked_compiled": on(fast, lambda: masked_c(x, m)),
                "torch_compiled": on("torch", lambda: torch_c(x, m)),
            }
            if device.type == "cpu":
                contenders["torch"] = on("torch", lambda: lm(x, m))
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    times = H.interleaved(contenders, args.rounds, device, warmup=args.warmup,
                                          budget_s=args.section_budget_s)
                    peaks = {k: H.peak_mib(fn, device) for k, fn in contenders.items()} \
                        if device.type == "cuda" else None
                records.append(H.record(label, device, args.dtype, batch, x.shape, times,
                                        ["plain", "plain_compiled", "torch_compiled"], peaks, mode=mode,
                                        backend=fast, channels_last=args.channels_last,
                                        compile_mode=args.compile_mode or "default"))
                print_record(records[-1])
            except torch.cuda.OutOfMemoryError as exc:
                records.append({"name": label, "batch": batch, "skipped": f"out of memory: {exc}"[:200]})
            finally:  # free the inputs and compiled models (the contenders' closures hold them) before the next
                contenders = x = m = plain_c = masked_c = torch_c = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def bench_soft(args, device, records):
    """Forward + backward with respect to a soft mask (what a learned-mask explainer pays per step),
    against the plain model's forward + backward with respect to its input (a saliency gradient)."""
    for name, batch in args.models:
        label = f"soft/{name}/fill"
        net = build_model(name).to(device=device, dtype=args.dtype)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(False)  # gradients with respect to the input / the mask only
        lm = mo.layer_mask(net, soft=True)
        px = args.pixels
        x = randn(batch, 3, px, px, device=device, dtype=args.dtype, channels_last=args.channels_last)
        g = torch.Generator("cpu").manual_seed(1)
        m0 = (torch.rand(batch, 1, px // 16, px // 16, generator=g) * 0.9 + 0.05).to(device=device, dtype=args.dtype)
        m = F.interpolate(m0, size=(px, px), mode="bilinear", align_corners=False).clamp(0, 1).contiguous()
        fast = fast_backends(device)[0] if fast_backends(device) else "torch"

        def plain_step():
            xi = x.clone().requires_grad_()
            net(xi).logsumexp(-1).sum().backward()
            return xi.grad

        def masked_step():
            mi = m.clone().requires_grad_()
            lm(x, mi).logsumexp(-1).sum().backward()
            return mi.grad

        contenders = {"plain": plain_step, "masked": on(fast, masked_step), "torch": on("torch", masked_step)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = H.interleaved(contenders, args.rounds, device, warmup=1, budget_s=args.section_budget_s)
        records.append(H.record(label, device, args.dtype, batch, x.shape, times, ["plain", "torch"], mode="fill",
                                backend=fast, what="forward + backward w.r.t. the mask (masked) or the input (plain)"))
        print_record(records[-1])


# ----------------------------------------------------------------------------- ops
# name: (c_in, c_out, kernel, stride, input size) at ResNet-50's layer shapes
CONV_SHAPES = {
    "stem_7x7s2_3-64@224": (3, 64, 7, 2, 224),
    "3x3_64-64@56": (64, 64, 3, 1, 56),
    "3x3s2_128-128@56": (128, 128, 3, 2, 56),
    "3x3_256-256@14": (256, 256, 3, 1, 14),
    "1x1_256-64@56": (256, 64, 1, 1, 56),
}


def op_cases(args, device):
    """(name, shape, masked fn (backend-selected), plain fn[, the functional floor of a masked conv])."""
    dt, bs, cl = args.dtype, args.op_batch, args.channels_last
    s = 4 if args.smoke else 1
    cases = []
    for shape_name, (c_in, c_out, k, st, size) in CONV_SHAPES.items():
        size = max(size // s, 8)
        x = randn(bs, c_in, size, size, device=device, dtype=dt, channels_last=cl)
        m = patch_mask(bs, size, size, device, dtype=dt)
        w = randn(c_out, c_in, k, k, device=device, dtype=dt, seed=1) / (c_in * k * k) ** 0.5
        b = randn(c_out, device=device, dtype=dt, seed=2)
        keep = F.max_pool2d(m, k, st, k // 2)
        cases.append((f"masked_conv2d[fill]:{shape_name}", x.shape,
                      lambda x=x, m=m, w=w, b=b, st=st, k=k: mo.masked_conv2d(x, m, w, b, st, k // 2, mode="fill"),
                      lambda x=x, w=w, b=b, st=st, k=k: F.conv2d(x, w, b, st, k // 2),
                      # The passes any functional masked conv on a vendor conv makes, with nothing else: a
                      # copy of x (the fill must not write into x), the conv, one pass zeroing the output
                      # at removed positions (its output mask given: no mask path, no fill arithmetic).
                      lambda x=x, w=w, b=b, st=st, k=k, keep=keep: F.conv2d(x.clone(), w, b, st, k // 2).mul_(keep)))
    size = max(56 // s, 8)
    x = randn(bs, 64, size, size, device=device, dtype=dt, channels_last=cl)
    m = patch_mask(bs, size, size, device, dtype=dt)
    zero = torch.zeros((), device=device, dtype=dt)
    for iters in (2, 6):
        cases.append((f"neighbor_fill[iters={iters}]:64@{size}", x.shape,
                      lambda iters=iters: mo.neighbor_fill(x, m, iters), lambda: torch.where(m > 0, x, zero)))
    size2 = max(112 // s, 8)
    x2 = randn(bs, 64, size2, size2, device=device, dtype=dt, channels_last=cl)
    m2 = patch_mask(bs, size2, size2, device, dtype=dt)
    cases.append((f"masked_max_pool2d[3,2,1]:64@{size2}", x2.shape, lambda: mo.masked_max_pool2d(x2, m2, 3, 2, 1),
                  lambda: F.max_pool2d(x2, 3, 2, 1)))
    x7 = randn(bs, 2048, 7, 7, device=device, dtype=dt, channels_last=cl)
    m7 = patch_mask(bs, 7, 7, device, patch=2, dtype=dt)
    cases.append(("masked_mean:2048@7", x7.shape, lambda: mo.masked_mean(x7, m7), lambda: x7.mean(dim=(2, 3))))
    return cases


def bench_ops(args, device, records):
    backends = fast_backends(device)
    for name, shape, masked, plain, *floor in op_cases(args, device):
        contenders = {"plain": plain, "torch": on("torch", masked)}
        if floor:
            contenders["copy_conv_zero"] = floor[0]
        for b in backends:
            contenders[b] = on(b, masked)
        with torch.no_grad():
            times = H.interleaved(contenders, args.op_rounds, device, warmup=1, budget_s=args.section_budget_s)
        records.append(H.record(f"op/{name}", device, args.dtype, args.op_batch, shape, times,
                                ["plain", "torch"] + (["copy_conv_zero"] if floor else [])))
        print_record(records[-1])


def bench_compile_policy(args, device, records):
    """Each primitive under torch.compile inside a conv block, as its kernel and decomposed."""
    backends = fast_backends(device)
    if not backends:
        return
    fast = backends[0]
    s = 4 if args.smoke else 1
    size = max(56 // s, 8)
    bs, dt, cl = args.op_batch, args.dtype, args.channels_last
    x = randn(bs, 64, size, size, device=device, dtype=dt, channels_last=cl)
    m = patch_mask(bs, size, size, device, dtype=dt)
    w = randn(64, 64, 3, 3, device=device, dtype=dt, seed=1) / 24.0
    b = randn(64, device=device, dtype=dt, seed=2)
    x = torch.where(m > 0, x, torch.zeros((), device=device, dtype=dt))

    from masked_ops import masks as M
    from masked_ops import ops

    keep, scale = M.renorm_masks(m, (3, 3), (1, 1), (1, 1), (1, 1))

    def block(mode):  # one fill-mode (or renorm-mode) masked conv + relu, as in a converted model
        sc = scale if mode == "renorm" else None
        iters = 2 if mode == "fill" else 0
        return lambda: ops.conv_core(x, m, keep, sc, w, b, 1, 1, 1, 1, iters, "relu", zeroed=True)

    plain_c = torch.compile(lambda: F.relu(F.conv2d(x, w, b, 1, 1)))
    for prim, mode in (("conv_epilogue", "renorm"), ("neighbor_fill", "fill")):
        saved = dict(B.UNDER_COMPILE)
        contenders = {"plain_compiled": plain_c}
        for how in ("kernel", "decompose"):
            torch._dynamo.reset()
            B.UNDER_COMPILE[prim] = how
            fn = torch.compile(block(mode))
            with torch.no_grad(), backend(fast):
                fn()  # compile now, with this policy
            contenders[how] = on(fast, fn)
        B.UNDER_COMPILE.clear()
        B.UNDER_COMPILE.update(saved)
        with torch.no_grad():
            times = H.interleaved(contenders, args.op_rounds, device, warmup=1, budget_s=args.section_budget_s)
        records.append(H.record(f"compile/{prim}[{mode} conv 3x3 64-64@{size} + relu]", device, dt, bs, x.shape,
                                times, ["plain_compiled", "kernel"], backend=fast, primitive=prim))
        print_record(records[-1])


# ----------------------------------------------------------------------------- main
def print_record(r):
    if "skipped" in r:
        print(f"{r['name']}: skipped ({r['skipped']})", flush=True)
        return
    parts = [f"{k} {v['median']:.2f} ms" for k, v in r["ms"].items()]
    print(f"{r['name']} b{r['batch']}: " + ", ".join(parts), flush=True)
    for k, ratios in r["ratio"].items():
        if ratios:
            print("    " + k + ": " + ", ".join(f"{v:.3f}x {b}" for b, v in ratios.items()), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", choices=["models", "ops", "compile", "soft"], default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per model")
    p.add_argument("--models", nargs="*", default=None, help="NAME:BATCH pairs (default per device)")
    p.add_argument("--channels-last", action="store_true",
                   help="models in channels_last (default: on GPU only; the CLI uses it on CPU too)")
    # --threads (default 2 on CPU, the CI machine), --out, --device, --clock, --smoke (tiny shapes, two rounds)
    a = H.script_args(p, argv, threads=2, device="cpu", clock=True, smoke={})
    gpu = a.device.startswith("cuda")
    a.dtype = torch.bfloat16 if gpu else torch.float32
    a.channels_last = gpu or a.channels_last
    a.compile_mode = None
    a.modes = ["fill", "renorm"] if gpu else ["fill"]
    a.pixels, a.op_batch, a.warmup = 224, (64 if gpu else 8), 2
    a.rounds = a.rounds or (20 if gpu else 7)
    a.op_rounds = 20 if gpu else 11
    a.section_budget_s = 150.0 if gpu else 600.0
    if a.models is None:
        a.models = [("resnet50", 256), ("resnet50", 64)] if gpu else [("resnet50", 8), ("efficientnet-lite0", 32)]
    else:
        a.models = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in a.models]
    if a.smoke:
        a.models = [("resnet18", 2)]
        a.modes, a.pixels, a.op_batch, a.rounds, a.op_rounds, a.warmup = ["fill"], 32, 2, 2, 2, 1
    return a


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = H.results_path(args, "", "gpu" if device.type == "cuda" else "cpu")  # cpu-<date>.json, gpu-<date>.json
    meta = H.environment(device, smoke=args.smoke, backends=fast_backends(device),
                         under_compile=dict(B.UNDER_COMPILE))
    print(f"masked_ops benchmark: {meta}", flush=True)
    records = []
    sections = args.only or ["ops", "compile", "models", "soft"]
    signal.signal(signal.SIGTERM, _stop)  # a timeout's SIGTERM still writes what finished
    try:
        if "ops" in sections:
            bench_ops(args, device, records)
        if "compile" in sections:
            bench_compile_policy(args, device, records)
        if "models" in sections:
            bench_models(args, device, records)
        if "soft" in sections:
            bench_soft(args, device, records)
    finally:  # whatever finished is written, also after an error or Ctrl-C
        H.write_results(out, meta, records)
        print(f"wrote {out} ({len(records)} records)")
    return out


if __name__ == "__main__":
    main()
