"""The Triton kernels, run on the CPU under TRITON_INTERPRET=1, against the reference backend.

TRITON_INTERPRET must be set before Triton is first imported, which a full pytest session
cannot promise (other tests import torch and friends first). So the checks run once, in a
fresh interpreter (``python tests/test_triton_interpret.py`` runs this file as a script), and
each pytest test asserts one check's verdict. The checks are the op testers of tests/op_testers.py
(one class per op, shared with the CPU and GPU tests) on their INTERPRET runner: the "triton" backend
on CPU tensors, small shapes (the interpreter is slow); one check = every case of one tester's check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:  # op_testers: when this file is imported from elsewhere
    sys.path.insert(0, HERE)

import op_testers as OT  # noqa: E402 (imports torch and masked_ops, not Triton)

# One check per op tester and check of tests/op_testers.py that has cases for the triton backend (the same
# testers as the CPU and GPU tests, on the INTERPRET runner's smaller inputs), then the backend as a whole.
CHECKS = OT.check_names(OT.INTERPRET) + ["compile_fullgraph", "public_ops_dispatch"]


# ============================================================================ the checks
# (run only in the subprocess, with TRITON_INTERPRET=1 set before anything imports Triton)
def _checks():
    import torch

    import masked_ops as mo
    from masked_ops.backends import reference as R
    from masked_ops.backends import triton as T
    from op_cases import assert_accurate

    torch.manual_seed(0)
    checks = OT.checks(OT.INTERPRET)

    def data(n=2, c=3, h=9, w=10, dtype=torch.float32, p=0.6):
        return torch.randn(n, c, h, w, dtype=dtype), (torch.rand(n, 1, h, w) > p).to(dtype)

    def compile_fullgraph():
        x, m = data(1, 3, 10, 10)
        w = torch.randn(4, 3, 3, 3)
        bias = torch.randn(4)

        def block(x, m, w, bias):
            y, m2 = mo.masked_conv2d(x, m, w, bias, padding=1, mode="fill", activation="relu")
            y, m3 = mo.masked_max_pool2d(y, m2, 2)
            return mo.masked_mean(y, m3)

        with mo.set_backend("triton"):
            eager = block(x, m, w, bias)
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, m, w, bias)
        with mo.set_backend("torch"):
            plain, truth = block(x, m, w, bias), block(x.double(), m.double(), w.double(), bias.double())
        assert_accurate(eager, plain, truth, torch.float32, "eager block")
        assert_accurate(compiled, plain, truth, torch.float32, "compiled block")

    def public_ops_dispatch():
        # The public ops reach these kernels through set_backend("triton").
        assert mo.available("triton"), mo.backends.unavailable_reason("triton")
        x, m = data()
        with mo.set_backend("triton"):
            from masked_ops.backends import resolve
            assert resolve(x.device) is T
            out = mo.neighbor_fill(x, m > 0, 2)
        assert_accurate(out, R.neighbor_fill(x, m, 2), R.neighbor_fill(x.double(), m.double(), 2), torch.float32,
                        "public neighbor_fill")

    checks.update(compile_fullgraph=compile_fullgraph, public_ops_dispatch=public_ops_dispatch)
    assert list(checks) == CHECKS, (list(checks), CHECKS)
    return checks


def _compile_for_hopper() -> dict:
    """Compile every kernel (ahead of time, for sm_90) without a GPU: the interpreter runs the
    kernels as Python, so it cannot catch what only the Triton compiler rejects."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from masked_ops._triton import epilogue as E
    from masked_ops._triton import masked_mean as M
    from masked_ops._triton import neighbor_fill as NF
    from masked_ops._triton import pooling as P
    from masked_ops._triton import soft_fill as S

    target = GPUTarget("cuda", 90, 32)
    results = {}

    def build(kernel, pointers, constexprs):
        params = list(inspect.signature(kernel.fn).parameters)
        sig = {p: "constexpr" if p in constexprs else pointers.get(p, "i32") for p in params}
        src = ASTSource(fn=kernel, signature=sig, constexprs={(params.index(k),): v for k, v in constexprs.items()})
        name = f"{kernel.fn.__name__}{sorted(constexprs.items())}"
        try:
            triton.compile(src, target=target)
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"[:3000]

    i64 = {k: "i64" for k in ("total", "s_n", "s_c", "s_h", "s_w", "s_p")}
    for dt in ("fp32", "bf16", "fp64"):
        p = lambda *names, idx=(): dict(i64, **{n: f"*{dt}" for n in names}, **{n: "*i64" for n in idx})  # noqa: E731
        acc64 = dt == "fp64"
        build(NF.fill_distance_kernel, dict(mask_ptr=f"*{dt}", dist_ptr="*i32"), dict(T=2, BH=16, BW=32))
        for inplace in (False, True):
            build(NF.neighbor_fill_kernel, dict(p("x_ptr", "out_ptr"), dist_ptr="*i32"),
                  dict(T=2, RB=16, BC=8 if dt == "bf16" else 1, ACC64=acc64, INPLACE=inplace))
        for act in (range(10) if dt == "bf16" else (1,)):
            build(E.conv_epilogue_kernel, p("y_ptr", "keep_ptr", "scale_ptr", "bias_ptr", "out_ptr"),
                  dict(HAS_SCALE=True, HAS_BIAS=True, ACT=act, CHANNELS_LAST=dt == "bf16", ACC64=acc64, BLOCK=1024))
        build(E.affine_act_kernel, p("x_ptr", "mask_ptr", "scale_ptr", "shift_ptr", "out_ptr"),
              dict(ACT=1, CHANNELS_LAST=False, ACC64=acc64, BLOCK=1024))
        build(P.max_pool_kernel, p("x_ptr", "mask_ptr", "y_ptr", "mout_ptr", idx=("idx_ptr",)),
              dict(KH=3, KW=3, CHANNELS_LAST=True, ACC64=acc64, BLOCK=256))
        build(P.avg_pool_kernel, p("x_ptr", "mask_ptr", "y_ptr", "mout_ptr"),
              dict(KH=3, KW=3, COUNT_PAD=False, CHANNELS_LAST=False, ACC64=acc64, BLOCK=256))
        build(M.masked_mean_kernel, p("x_ptr", "mask_ptr", "out_ptr"), dict(ACC64=acc64, BP=64, BC=64))
        # soft_fill: values in the input dtype, knownness, counts and adjoints in the accumulation dtype
        acc = {n: "*fp64" if acc64 else "*fp32" for n in ("k_ptr", "k_next_ptr", "c_ptr", "h_ptr", "hf_ptr", "dk_ptr",
                                                          "k_prev_ptr", "carry_ptr", "next_ptr")}
        build(S.select_scale_kernel, p("x_ptr", "m_ptr", "out_ptr"), dict(SCALE=True, ACC64=acc64, BLOCK=256))
        build(S.knownness_step_kernel, dict(i64, **acc), dict(BLOCK=256))
        build(S.ring_forward_kernel, dict(p("v_ptr", "out_ptr"), **acc), dict(ACC64=acc64, BLOCK=256))
        build(S.ring_backward_a_kernel, dict(p("v_ptr", "u_ptr"), **acc), dict(ACC64=acc64, BLOCK=256))
        for fill_grad in (False, True):
            build(S.ring_backward_b_kernel, dict(p("v_ptr", "u_ptr", "gv_ptr"), **acc),
                  dict(FILL_GRAD=fill_grad, BLOCK=256))
        build(S.mask_chain_kernel, dict(i64, **acc), dict(BLOCK=256))
    return results


def _run_all() -> dict:
    results = {}
    for name, fn in _checks().items():
        print(f"{name}...", file=sys.stderr, flush=True)
        try:
            known = fn()
            results[name] = ("xfail " + "\n".join(known)) if known else "ok"
        except Exception:  # report every failure, do not stop at the first
            results[name] = traceback.format_exc(limit=4)
    return results


# ============================================================================ the pytest side
@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MASKED_OPS_BACKEND", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def test_kernels_compile_for_hopper_without_a_gpu():
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 and "GPUTarget" in proc.stderr:
        pytest.skip("this Triton cannot compile ahead of time for a given target")
    assert proc.returncode == 0 and lines, f"compile run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    failed = {k: v for k, v in json.loads(lines[-1][len("RESULTS "):]).items() if v != "ok"}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())


@pytest.mark.parametrize("check", CHECKS)
def test_triton_kernel_under_interpreter(interpreted_results, check):
    verdict = interpreted_results.get(check, "not run")
    if verdict.startswith("xfail "):  # every case passed but those of a known issue (op_testers.KNOWN_ISSUES)
        pytest.xfail(verdict[len("xfail "):])
    assert verdict == "ok", f"{check}:\n{verdict}"


def test_backend_reports_unavailable_without_triton():
    """Without Triton the module still imports and the backend says why it cannot run."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import masked_ops as mo, masked_ops.backends.triton as T\n"
            "assert not T.AVAILABLE and not mo.available('triton')\n"
            "print('REASON', mo.backends.unavailable_reason('triton'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Triton" in proc.stdout


if __name__ == "__main__":
    if "--compile" in sys.argv:
        print("RESULTS " + json.dumps(_compile_for_hopper()))
    else:
        assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (the pytest tests do)"
        print("RESULTS " + json.dumps(_run_all()))
