"""One tester per op, after torchvision's ``RoIOpTester``: each class checks one op of the backends against
the reference (the "torch" backend, the oracle) on whatever backends and device a runner gives it.

Three runners use the same testers (the configurations come from tests/op_cases.py, the one accuracy rule
is op_cases.assert_accurate):

- tests/test_backend_agreement.py: ``RUNNER = CPU`` (the "cpp" backend on CPU tensors);
- tests/test_gpu.py: ``RUNNER = GPU`` ("cuda" and "triton" on CUDA tensors; ``make test-gpu``);
- tests/test_triton_interpret.py: ``INTERPRET`` ("triton" on CPU tensors under TRITON_INTERPRET=1, in a
  subprocess: ``run_check`` there, one verdict per op and check; smaller inputs, the interpreter is slow).

A runner module subclasses a tester and sets its runner::

    class TestNeighborFill(NeighborFillTester):
        RUNNER = CPU

and pytest collects ``test_<check>`` for every check of ``CHECKS``, parametrised over (backend, case) by
``pytest_generate_tests``: the cases of check ``c`` are ``<c>_cases(runner)`` (id, keyword arguments) and
the check itself is the method ``<c>(target, **case)``. The checks (every tester has the first four):

- ``forward``: the op's primitive cases of op_cases (every dtype and layout of the runner's sweep), and its
  configurations (mask kinds, sizes, parameters) through the public op, against the reference;
- ``backward``: gradients against the reference's autograd under the same rule, and gradcheck in float64
  where the op's backward is its true derivative;
- ``opcheck``: ``torch.library.opcheck`` of the backend's registered ops (schema, fake kernel, autograd);
- ``invariants``: values in the removed region (NaN, inf, huge) change nothing; an all-ones mask is the
  plain op; in-place ops refuse overlapping memory;
- ``in_place`` (fill, epilogue): the in-place variants write exactly where they should.

To add an op: its primitive cases go in op_cases.primitive_cases (under its name in PRIMITIVE_OPS), then a
class here with OP, BACKENDS and the ``<check>_cases`` / ``<check>`` methods it needs (see the existing
ones), added to TESTERS; then one subclass per runner module (the interpreter picks it up from TESTERS).
"""
from __future__ import annotations

import itertools
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import masked_ops as mo
from masked_ops.activations import ACTIVATIONS, apply_activation
from masked_ops.backends import reference as R
from op_cases import (LAYOUTS, MASK_KINDS, MODES, POISONS, PRIMITIVE_OPS, SOLVE_TOL, ConvCase, assert_accurate,
                      assert_primitive_sweep, assert_solved, conv_cases, cycle_product, imputation_case,
                      make_conv_params, make_input, make_mask, poison, pool_cases, primitive_cases, sweep_inputs,
                      with_layout)

ACTS = tuple(ACTIVATIONS)
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# ============================================================================ where the checks run
@dataclass(frozen=True)
class Runner:
    """Where a tester runs: the device, the backends, and how much of each case list."""
    name: str
    device: str
    backends: Tuple[str, ...]
    sweeps: Tuple[Tuple[torch.dtype, str], ...]  # (dtype, layout) of the primitive sweep (forward)
    shape: Tuple[int, int, int, int]              # the sweep's input
    dtypes: Tuple[torch.dtype, ...]               # of the configurations (forward)
    layouts: Tuple[str, ...]                      # of the configurations
    poisons: Tuple[float, ...]                    # values written into the removed region (invariants)
    cycle: int                                    # length of the covering subsets (op_cases.cycle_product)
    small: bool = False                           # the interpreter: smaller inputs, fewer of the slow cases


CPU = Runner("cpu", "cpu", ("cpp",), tuple(itertools.product((F64, F32, F16, BF16), LAYOUTS)), (2, 5, 17, 19),
             (F64, F32), LAYOUTS, POISONS, 12)
GPU = Runner("gpu", "cuda", ("cuda", "triton"), tuple(itertools.product((F32, F16, BF16, F64),
                                                                        ("contiguous", "channels_last"))),
             (2, 5, 17, 19), (F32, F16, BF16, F64), LAYOUTS, (float("nan"), float("inf"), -1e30), 12)
INTERPRET = Runner("interpret", "cpu", ("triton",),
                   ((F32, "contiguous"), (F32, "channels_last"), (F64, "channels_last"), (F16, "contiguous"),
                    (BF16, "channels_last")),
                   (2, 2, 8, 9), (F32,), ("contiguous", "channels_last"),
                   (float("nan"), float("inf"), -1e30), 6, small=True)


@dataclass(frozen=True)
class Target:
    """One backend of one runner."""
    backend: str
    runner: Runner

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def module(self):
        """The backend's module (masked_ops.backends.*); skips the test where the backend cannot run."""
        from masked_ops.backends import _load

        if not mo.available(self.backend):
            pytest.skip(f"backend {self.backend!r} unavailable: {mo.backends.unavailable_reason(self.backend)}")
        return _load(self.backend)

    def op(self, name: str):
        """The backend's registered op ``name`` (masked_ops:: for cpp/cuda, masked_ops_triton:: for triton)."""
        self.module  # noqa: B018 (skips when unavailable; importing registers the ops)
        namespace = torch.ops.masked_ops_triton if self.backend == "triton" else torch.ops.masked_ops
        return getattr(namespace, name).default


# ============================================================================ known issues
# Comparisons that fail today for a reason outside the tests, left to the code's owners: (backend, dtype, a
# part of the case's name) -> why. Checks run them last and expect them to fail (a strict xfail: once one
# passes, the check fails until its entry is removed here); every other comparison still runs.
KNOWN_ISSUES: Dict[Tuple[str, torch.dtype, str], str] = {
    # (backend, dtype, a part of the comparison's name): why it fails. Empty: the last entry, Triton's
    # float64 tanh (a series that stopped at z^9), was fixed in masked_ops/_triton/activations.py.
}


def known_issue(backend: str, dtype: torch.dtype, name: str) -> Optional[str]:
    return next((why for (b, d, part), why in KNOWN_ISSUES.items() if b == backend and d == dtype and part in name),
                None)


class Deferred:
    """Runs a check's comparisons, those with a known issue last, expecting them to fail (see KNOWN_ISSUES)."""

    def __init__(self, backend: str):
        self.backend, self.pending = backend, []

    def __call__(self, dtype: torch.dtype, name: str, fn: Callable[[], object]):
        why = known_issue(self.backend, dtype, name)
        if why is None:
            fn()
        else:
            self.pending.append((why, name, fn))

    def finish(self):
        failed = []
        for why, name, fn in self.pending:
            try:
                fn()
            except AssertionError:
                failed.append(why)
                continue
            raise AssertionError(f"{name} on {self.backend} passes now: remove its entry from op_testers.KNOWN_ISSUES "
                                 f"({why})")
        if failed:
            pytest.xfail(f"known issue: {failed[0]}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================ comparing with the reference
def _run(backend: str, fn: Callable, inputs: Sequence, args, kwargs, grad: bool, grad_mask: bool):
    """fn(*inputs, *args, **kwargs) with ``backend`` selected: (outputs, gradients of the floating inputs).

    Inputs are detached, not copied (a strided view stays strided). With ``grad``, the first output is
    back-propagated with a fixed random cotangent into every floating input but the mask (the second),
    and into the mask too with ``grad_mask``."""
    leaves = [t.detach().requires_grad_(grad and (i != 1 or grad_mask))
              if isinstance(t, torch.Tensor) and t.is_floating_point() else t for i, t in enumerate(inputs)]
    with mo.set_backend(backend):
        outs = _tuple(fn(*leaves, *args, **kwargs))
    grads = []
    if grad:
        cot = torch.randn(outs[0].shape, generator=_gen(7), dtype=F64).to(outs[0].dtype).to(outs[0].device)
        (outs[0] * cot).sum().backward()
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs], grads


def assert_agrees(backend: str, fn: Callable, inputs: Sequence, *args, dtype: torch.dtype, what: str = "",
                  grad: bool = False, grad_mask: bool = False, **kwargs) -> List[torch.Tensor]:
    """``fn`` (a public op, or a primitive through ``masked_ops.backends.resolve``) on ``backend`` against
    the torch backend, under op_cases.assert_accurate: the truth is the torch backend on the same inputs in
    float64, plain PyTorch the torch backend in ``dtype``. Output masks (every output but the first) must be
    exactly plain PyTorch's; with ``grad``, the gradients follow the same rule. Returns our outputs."""
    as64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    truth, truth_grads = _run("torch", fn, as64, args, kwargs, grad, grad_mask)
    plain, plain_grads = (truth, truth_grads) if dtype == F64 else _run("torch", fn, inputs, args, kwargs, grad,
                                                                         grad_mask)
    ours, grads = _run(backend, fn, inputs, args, kwargs, grad, grad_mask)
    what = f"{what} on {backend} ({_name(dtype)})"
    assert len(ours) == len(plain), f"{what}: {len(ours)} outputs, the reference {len(plain)}"
    for k, (o, p, t) in enumerate(zip(ours, plain, truth)):
        assert o.shape == p.shape and o.dtype == p.dtype, f"{what} output {k}: {o.shape}/{o.dtype} vs {p.shape}/{p.dtype}"
        if k > 0 or o.dtype == torch.bool:
            assert torch.equal(o, p), f"{what}: output mask {k} differs from the reference's"
        else:
            assert_accurate(o, p, t, dtype, f"{what} output")
    assert len(grads) == len(plain_grads)
    for k, (o, p, t) in enumerate(zip(grads, plain_grads, truth_grads)):
        assert o is not None and p is not None, f"{what}: gradient {k} missing"
        assert torch.isfinite(o).all() == torch.isfinite(p).all(), f"{what}: gradient {k} not finite"
        assert_accurate(o, p, t, dtype, f"{what} gradient of input {k}")
    return ours


def on_backend(name: str) -> Callable:
    """A primitive called on the selected backend: ``on_backend("conv_epilogue")(y, keep, ...)``."""
    def call(x, *args, **kwargs):
        from masked_ops.backends import resolve

        return getattr(resolve(x.device), name)(x, *args, **kwargs)
    call.__name__ = name
    return call


def gradcheck(fn: Callable, inputs: Sequence[torch.Tensor], what: str) -> None:
    """torch.autograd.gradcheck in float64 (fast mode): the backward is the derivative of the forward."""
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True), what


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def opcheck(op, args) -> None:
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


# ============================================================================ the testers
class OpTester:
    """One op on the backends of a runner against the reference (subclass per op; see the module docstring)."""
    OP = ""                                 # the op's name (its entry in op_cases.PRIMITIVE_OPS, if any)
    BACKENDS: Tuple[str, ...] = ("cpp", "cuda", "triton")   # the backends that implement it
    CHECKS: Tuple[str, ...] = ("forward", "backward", "opcheck", "invariants")
    WITH_REFERENCE: Tuple[str, ...] = ()    # checks that also run on the "torch" backend (CPU runner)
    RUNNER: Optional[Runner] = None         # set by the runner module's subclass
    # The primitive cases the interpreter's sweep and invariants run (None: all of them): it is slow.
    SMALL_SWEEP: Optional[Tuple[str, ...]] = None
    SMALL_INVARIANTS: Optional[Tuple[str, ...]] = None

    # ------------------------------------------------------------------ what runs where
    def targets(self, check: str, runner: Runner) -> List[Target]:
        names = [b for b in runner.backends if b in self.BACKENDS]
        if check in self.WITH_REFERENCE and runner.name == "cpu":
            names = ["torch"] + names
        return [Target(b, runner) for b in names]

    def params(self, check: str, runner: Runner) -> List[Tuple[Target, str, dict]]:
        cases = getattr(self, f"{check}_cases")(runner)
        return [(t, cid, case) for t in self.targets(check, runner) for cid, case in cases
                if self.applies(check, t, case)]

    def applies(self, check: str, target: Target, case: dict) -> bool:
        """Whether a case runs on a target (opcheck: registered ops only)."""
        return not (check == "opcheck" and target.backend == "torch")

    # ------------------------------------------------------------------ pytest
    def pytest_generate_tests(self, metafunc):
        check = metafunc.function.__name__[len("test_"):]
        params = [pytest.param(t, case, id=f"{t.backend}-{cid}") for t, cid, case in self.params(check, self.RUNNER)]
        if not params:
            params = [pytest.param(None, None, id="none", marks=pytest.mark.skip(
                reason=f"{self.OP}: no {check} check on the {self.RUNNER.name} runner's backends"))]
        metafunc.parametrize("target,case", params)

    def test_forward(self, target, case):
        self.forward(target, **case)

    def test_backward(self, target, case):
        self.backward(target, **case)

    def test_opcheck(self, target, case):
        self.opcheck(target, **case)

    def test_invariants(self, target, case):
        self.invariants(target, **case)

    # ------------------------------------------------------------------ outside pytest (the interpreter)
    @classmethod
    def run_check(cls, check: str, runner: Runner) -> List[str]:
        """Every case of one check, on every backend of the runner; raises with every failure. Returns the known
        issues (KNOWN_ISSUES) that made cases fail as expected."""
        tester, failures, known, params = cls(), [], [], cls().params(check, runner)
        for t, cid, case in params:
            torch.manual_seed(0)
            try:
                getattr(tester, check)(t, **case)
            except pytest.xfail.Exception as exc:  # a known issue, still there: as expected
                known.append(f"[{t.backend}-{cid}] {exc}")
            except (Exception, pytest.skip.Exception):
                failures.append(f"[{t.backend}-{cid}] {traceback.format_exc(limit=-4)}")
        if failures:
            raise AssertionError(f"{cls.OP}.{check}: {len(failures)} of {len(params)} cases failed\n" + "\n".join(failures))
        return known

    # ------------------------------------------------------------------ shared pieces of the checks
    def forward_cases(self, runner: Runner) -> List[Tuple[str, dict]]:
        """The primitive sweep in every (dtype, layout) of the runner, then the op's configurations."""
        sweeps = [(f"sweep-{_name(d)}-{lay}", dict(sweep=(d, lay))) for d, lay in runner.sweeps] \
            if self.OP in PRIMITIVE_OPS else []
        return sweeps + self.configs(runner)

    def configs(self, runner: Runner) -> List[Tuple[str, dict]]:
        return []

    def forward(self, t: Target, sweep=None, **config):
        if sweep is not None:
            dtype, layout = sweep
            check = Deferred(t.backend)
            for name in primitive_cases(self.OP):
                if t.runner.small and self.SMALL_SWEEP is not None and name not in self.SMALL_SWEEP:
                    continue
                check(dtype, name, lambda name=name: assert_primitive_sweep(
                    t.module, dtype, layout, t.device, shape=t.runner.shape, op=self.OP, names=(name,)))
            check.finish()
        else:
            t.module  # noqa: B018 (skips when unavailable)
            self.forward_config(t, **config)

    def forward_config(self, t: Target, **config):
        raise NotImplementedError

    def invariants_cases(self, runner: Runner) -> List[Tuple[str, dict]]:
        layouts = list(dict.fromkeys(lay for _, lay in runner.sweeps))
        return [(layout, dict(layout=layout)) for layout in (layouts[-1:] if runner.small else layouts)]

    def invariants(self, t: Target, layout: str):
        """The op's primitive cases with poison in the removed region give the same bits, then the op's own."""
        B = t.module
        x, m = sweep_inputs(F32, layout, t.device, *t.runner.shape)
        # (the in-place cases zero the removed region themselves: nothing to check there)
        names = self.SMALL_INVARIANTS if t.runner.small and self.SMALL_INVARIANTS else primitive_cases(self.OP)
        cases = {name: f for name, f in primitive_cases(self.OP).items() if "inplace" not in name and name in names}
        clean = {name: _tuple(f(B, x, m)) for name, f in cases.items()}
        for value in t.runner.poisons:
            xp = poison(x, m, value)
            for name, f in cases.items():
                for k, (a, b) in enumerate(zip(clean[name], _tuple(f(B, xp, m)))):
                    assert torch.equal(a, b), f"{t.backend} {name}[{k}] {layout}: {value} in the removed region changed it"
        self.more_invariants(t, B, x, layout)

    def more_invariants(self, t: Target, B, x: torch.Tensor, layout: str):
        pass


def _all_ones_like(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], 1, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)


def _assert_plain_op(ours: torch.Tensor, plain_fn: Callable, x: torch.Tensor, what: str):
    """An all-ones mask gives the plain op (op_cases.assert_accurate against it in float64)."""
    assert_accurate(ours, plain_fn(x), plain_fn(x.double()), x.dtype, what)


def _assert_rejects_overlap(t: Target, fn: Callable):
    """A compiled in-place op refuses an expanded (self-overlapping) tensor."""
    if t.backend not in ("cpp", "cuda"):
        return
    with pytest.raises(RuntimeError, match="overlapping memory"):
        fn()


# ---------------------------------------------------------------------------- neighbor_fill, neighbor_fill_
class NeighborFillTester(OpTester):
    """neighbor_fill (and its in-place variant neighbor_fill_): removed pixels take the mean of their visible
    neighbours, ring by ring. Fill values carry no gradient (as in the paper), so there is no gradcheck: the
    backward is checked against the reference's autograd."""
    OP = "neighbor_fill"
    CHECKS = OpTester.CHECKS + ("in_place",)
    WITH_REFERENCE = ("in_place",)
    SMALL_SWEEP = ("fill0", "fill1", "fill2", "fill6", "fill_inplace0", "fill_inplace2", "padded_fill_inplace")
    SMALL_INVARIANTS = ("fill0", "fill2")

    def _shape(self, runner):
        return (2, 3, 9, 10) if runner.small else (2, 5, 13, 11)

    def _cycle(self, runner, dtypes=None):
        axes = [(0, 1, 2, 3, 4, 6), MASK_KINDS, runner.layouts] + ([dtypes] if dtypes else [])
        return list(cycle_product(*axes, length=runner.cycle))

    def configs(self, runner):
        n, c, h, w = self._shape(runner)
        out = [(f"iters{it}-{kind}-{lay}", dict(shape=(n, c, h, w), iters=it, kind=kind, layout=lay, seed=it))
               for it, kind, lay in self._cycle(runner)]
        out += [("one_pixel_far", dict(shape=(1, 2, 12, 13), iters=4, kind="pixel", layout="contiguous", seed=1)),
                ("several_tiles", dict(shape=(1, 2, 40, 37), iters=2, kind="random", layout="channels_last", seed=2))]
        if not runner.small:  # a paper-sized mask (16x16 patches) on a 64x64 plane, 6 rings: many levels in one plan
            out.append(("large_plane", dict(shape=(2, 3, 64, 64), iters=6, kind="patches16", layout="contiguous",
                                            seed=3, dtypes=(F32,))))
        return out

    def forward_config(self, t, shape, iters, kind, layout, seed, dtypes=None):
        n, c, h, w = shape
        m = make_mask(kind, n, h, w, seed=seed, device=t.device)
        for dtype in dtypes or t.runner.dtypes:
            x = make_input(n, c, h, w, dtype, layout, seed=seed, device=t.device)
            out = assert_agrees(t.backend, mo.neighbor_fill, (x, m), iters, dtype=dtype, what=f"fill {iters} rings")
            if layout == "channels_last":
                assert out[0].is_contiguous(memory_format=torch.channels_last), "layout not kept"

    def backward_cases(self, runner):
        n, c, h, w = self._shape(runner)
        out = [(f"iters{it}-{kind}-{lay}-{_name(d)}", dict(shape=(n, c, h, w), iters=it, kind=kind, layout=lay,
                                                            dtype=d, seed=it))
               for it, kind, lay, d in self._cycle(runner, (F64, F32))[:3 if runner.small else None]]
        if not runner.small:
            out.append(("large_plane", dict(shape=(2, 3, 64, 64), iters=6, kind="patches16", layout="contiguous",
                                            dtype=F32, seed=3)))
        return out

    def backward(self, t, shape, iters, kind, layout, dtype, seed):
        t.module  # noqa: B018
        n, c, h, w = shape
        x = make_input(n, c, h, w, dtype, layout, seed=seed, device=t.device)
        m = make_mask(kind, n, h, w, seed=seed, device=t.device)
        assert_agrees(t.backend, mo.neighbor_fill, (x, m), iters, dtype=dtype, grad=True, what=f"fill {iters} rings")

    def opcheck_cases(self, runner):
        return [(lay, dict(layout=lay)) for lay in ("contiguous", "channels_last")]

    def opcheck(self, t, layout):
        x, m = sweep_inputs(F32, layout, t.device, 1, 2, 6, 7)
        for iters in (0, 2):
            opcheck(t.op("neighbor_fill"), (x.clone().requires_grad_(), m, iters))
            opcheck(t.op("neighbor_fill_"), (x.clone(), m, iters))
        buf = F.pad(x, (1, 1, 2, 0))
        opcheck(t.op("neighbor_fill_"), (buf[:, :, 2:, 1:-1], m, 2))  # the interior of a padded buffer

    def more_invariants(self, t, B, x, layout):
        ones = _all_ones_like(x)
        assert torch.equal(B.neighbor_fill(x, ones, 2), x), "all-ones mask: the fill changed x"
        m = torch.zeros(2, 1, 5, 5, device=t.device)
        m[:, :, 2, 2] = 1
        _assert_rejects_overlap(t, lambda: B.neighbor_fill_(torch.zeros(1, 3, 5, 5, device=t.device).expand(2, -1, -1, -1),
                                                            m, 1))

    def in_place_cases(self, runner):
        cases = cycle_product((0, 1, 2, 4), MASK_KINDS, ("contiguous", "channels_last"), (F64, F32, BF16),
                              (False, True), length=8 if runner.small else 15)
        return [(f"iters{it}-{kind}-{lay}-{_name(d)}{'-view' if v else ''}",
                 dict(iters=it, kind=kind, layout=lay, dtype=d, view=v)) for it, kind, lay, d, v in cases]

    def in_place(self, t, iters, kind, layout, dtype, view):
        """The in-place fill writes exactly the reached removed pixels, with the copying fill's values.

        Independent of the reference's own in-place function: the expectation is built from the backend's
        copying fill (checked against the reference by ``forward``) and the reach of the mask (a max pool by
        2*iters+1): reached removed pixels take its values, bit for bit (the same arithmetic), every other
        element keeps its bits (NaN in the removed region, the border around a view)."""
        B = t.module
        n, c, h, w = self._shape(t.runner)
        m = make_mask(kind, n, h, w, seed=iters + 5, device=t.device).to(dtype)
        x = make_input(n, c, h, w, dtype, layout, seed=iters, device=t.device)
        x = torch.where(m > 0, x, torch.full((), float("nan"), dtype=dtype, device=t.device))  # removed: NaN
        if view:
            buf = F.pad(x, (2, 1, 1, 3), value=7.0)
            target = buf[:, :, 1:1 + h, 2:2 + w]
        else:
            buf = target = x.clone(memory_format=torch.preserve_format)
        before = buf.clone()
        with torch.no_grad():
            returned = B.neighbor_fill_(target, m, iters)
        assert returned is target
        write = F.max_pool2d((m > 0).double(), 2 * iters + 1, 1, iters) > 0
        write = (write & ~(m > 0)).expand(n, c, h, w)
        expected = B.neighbor_fill(torch.where(m > 0, x, 0), m, iters)
        inner = buf[:, :, 1:1 + h, 2:2 + w] if view else buf
        assert torch.equal(inner[~write].isnan(), x[~write].isnan()), "NaN moved"  # stays where it was, nowhere else
        assert torch.equal(inner[~write].nan_to_num(), x[~write].nan_to_num()), "an unreached pixel changed"
        assert torch.equal(inner[write], expected[write]), "reached pixels: not the copying fill's values"
        if view:  # the border is not touched
            assert torch.equal(buf[:, :, 0], before[:, :, 0]) and torch.equal(buf[..., -1], before[..., -1])
        assert buf.stride() == before.stride()

    def test_in_place(self, target, case):
        self.in_place(target, **case)


# ---------------------------------------------------------------------------- conv_epilogue, conv_epilogue_
class ConvEpilogueTester(OpTester):
    """conv_epilogue (and conv_epilogue_): act(y * scale + bias) on kept positions, 0 elsewhere."""
    OP = "conv_epilogue"
    CHECKS = OpTester.CHECKS + ("in_place",)
    WITH_REFERENCE = ("in_place",)

    @staticmethod
    def _inputs(t, dtype, layout, kind, with_scale, with_bias, seed, shape=(2, 6, 7, 9)):
        n, c, h, w = shape
        keep = make_mask(kind, n, h, w, seed=seed, device=t.device).to(dtype)
        y = make_input(n, c, h, w, dtype, layout, seed=seed + 1, device=t.device)
        g = _gen(seed + 2)
        scale = (torch.rand(n, 1, h, w, generator=g, dtype=F64) * 3).to(dtype).to(t.device) if with_scale else None
        bias = torch.randn(c, generator=g, dtype=F64).to(dtype).to(t.device) if with_bias else None
        return y, keep, scale, bias

    def configs(self, runner):
        cases = cycle_product(ACTS, MASK_KINDS, runner.layouts, (True, False), (True, True, False),
                              length=runner.cycle)
        return [(f"{a}-{kind}-{lay}{'-scale' if s else ''}{'-bias' if b else ''}",
                 dict(act=a, kind=kind, layout=lay, with_scale=s, with_bias=b, seed=i))
                for i, (a, kind, lay, s, b) in enumerate(cases)]

    def forward_config(self, t, act, kind, layout, with_scale, with_bias, seed):
        check = Deferred(t.backend)
        for dtype in t.runner.dtypes:
            check(dtype, act, lambda dtype=dtype: self._forward(t, act, kind, layout, with_scale, with_bias, seed, dtype))
        check.finish()

    def _forward(self, t, act, kind, layout, with_scale, with_bias, seed, dtype):
        inputs = self._inputs(t, dtype, layout, kind, with_scale, with_bias, seed)
        out = assert_agrees(t.backend, on_backend("conv_epilogue"), inputs, act, dtype=dtype, what=f"epilogue {act}")
        if layout == "channels_last":
            assert out[0].is_contiguous(memory_format=torch.channels_last), "layout not kept"

    def backward_cases(self, runner):
        out = [(f"{a}-{_name(d)}", dict(act=a, dtype=d, seed=i))
               for i, (a, d) in enumerate(cycle_product(ACTS, (F64, F32)))]
        return out + [(f"gradcheck-{a}", dict(act=a, dtype=F64, seed=0, check=True)) for a in ACTS]

    def backward(self, t, act, dtype, seed, check=False):
        """Gradients to y, scale and bias, with NaN at removed positions of y (it must reach no gradient)."""
        B = t.module
        if check:
            y, keep, scale, bias = self._inputs(t, F64, "contiguous", "random", True, True, seed, shape=(1, 3, 4, 5))
            gradcheck(lambda y, s, b: B.conv_epilogue(y, keep, s, b, act), [v.requires_grad_() for v in (y, scale, bias)],
                      f"epilogue {act}")
            return
        layouts = t.runner.layouts
        y, keep, scale, bias = self._inputs(t, dtype, layouts[seed % len(layouts)], "patches", True, True, seed)
        y = y.masked_fill(keep == 0, float("nan"))
        assert_agrees(t.backend, on_backend("conv_epilogue"), (y, keep, scale, bias), act, dtype=dtype, grad=True,
                      what=f"epilogue {act}")

    def opcheck_cases(self, runner):
        return [(lay, dict(layout=lay)) for lay in ("contiguous", "channels_last")]

    def opcheck(self, t, layout):
        y, keep, scale, bias = self._inputs(t, F32, layout, "random", True, True, 0, shape=(1, 2, 6, 7))
        opcheck(t.op("conv_epilogue"), (y.requires_grad_(), keep, None, None, "relu"))
        opcheck(t.op("conv_epilogue"), (y, keep, scale.requires_grad_(), bias.requires_grad_(), "gelu"))
        opcheck(t.op("conv_epilogue_"), (y.detach().clone(), keep, scale.detach(), bias.detach(), "relu6"))
        opcheck(t.op("conv_epilogue_"), (y.detach().clone()[:, :, ::2], keep[:, :, ::2], None, None, "none"))
        if t.backend == "cpp":  # the fused CPU backward is an op of its own
            grad = torch.randn_like(y)
            opcheck(t.op("conv_epilogue_backward"), (grad, y.detach(), keep, scale.detach(), bias.detach(), "silu",
                                                     True, True))

    def more_invariants(self, t, B, x, layout):
        ones = _all_ones_like(x)
        assert torch.equal(B.conv_epilogue(x, ones, None, None, "relu"), F.relu(x)), "all-ones mask: not relu(y)"
        keep = torch.ones(2, 1, 5, 5, device=t.device)
        _assert_rejects_overlap(t, lambda: B.conv_epilogue_(torch.zeros(1, 3, 5, 5, device=t.device).expand(2, -1, -1, -1),
                                                            keep, None, None, "relu"))

    def in_place_cases(self, runner):
        cases = cycle_product(ACTS, LAYOUTS, (F64, F32, BF16), (False, True), MASK_KINDS, length=12)
        return [(f"{a}-{lay}-{_name(d)}{'-scale' if s else ''}-{kind}", dict(act=a, layout=lay, dtype=d,
                                                                            with_scale=s, kind=kind))
                for a, lay, d, s, kind in cases]

    def in_place(self, t, act, layout, dtype, with_scale, kind):
        """Written over y, the epilogue equals the copying one of the same backend exactly and the reference
        under the accuracy rule; NaN at removed positions is selected away; strided y works (through a dense
        copy) and keeps its strides."""
        B = t.module
        y, keep, scale, bias = self._inputs(t, dtype, layout, kind, with_scale, True, 3)
        clean = y.clone()
        y.masked_fill_(keep == 0, float("nan"))
        expected = B.conv_epilogue(y, keep, scale, bias, act)
        strides = y.stride()
        with torch.no_grad():
            out = B.conv_epilogue_(y, keep, scale, bias, act)
        assert out is y and y.stride() == strides
        assert torch.equal(y, expected)
        assert (y.masked_select((keep == 0).expand_as(y)) == 0).all()  # NaN there selected away to exactly 0
        as64 = lambda v: None if v is None else v.double()  # noqa: E731
        check = Deferred(t.backend)
        check(dtype, act, lambda: assert_accurate(
            expected, R.conv_epilogue(clean, keep, scale, bias, act),
            R.conv_epilogue(clean.double(), keep.double(), as64(scale), as64(bias), act), dtype, act))
        check.finish()

    def test_in_place(self, target, case):
        self.in_place(target, **case)


# ---------------------------------------------------------------------------- masked_affine_act
class MaskedAffineActTester(OpTester):
    """masked_affine_act: an eval BatchNorm folded to a per-channel affine, plus activation, on visible pixels."""
    OP = "masked_affine_act"

    @staticmethod
    def _inputs(t, i, dtype, layout=None, shape=(2, 6, 9, 10)):
        n, c, h, w = shape
        x = make_input(n, c, h, w, dtype, layout or LAYOUTS[i % 3], seed=i, device=t.device) * 3
        m = make_mask(MASK_KINDS[i % len(MASK_KINDS)], n, h, w, seed=i, device=t.device)
        g = _gen(i)
        scale = (torch.rand(c, generator=g, dtype=F64) + 0.5).to(dtype).to(t.device)
        shift = torch.randn(c, generator=g, dtype=F64).to(dtype).to(t.device)
        return x, m, scale, shift

    def configs(self, runner):
        return [(f"{a}-{LAYOUTS[i % 3]}-{MASK_KINDS[i % len(MASK_KINDS)]}", dict(i=i)) for i, a in enumerate(ACTS)]

    def forward_config(self, t, i):
        layout = LAYOUTS[i % 3] if LAYOUTS[i % 3] in t.runner.layouts else "contiguous"
        check = Deferred(t.backend)
        for dtype in t.runner.dtypes:
            check(dtype, ACTS[i], lambda dtype=dtype: self._forward(t, i, dtype, layout))
        check.finish()

    def _forward(self, t, i, dtype, layout):
        out = assert_agrees(t.backend, mo.masked_affine_act, self._inputs(t, i, dtype, layout), activation=ACTS[i],
                            dtype=dtype, what=f"affine {ACTS[i]}")
        if layout == "channels_last":
            assert out[0].is_contiguous(memory_format=torch.channels_last), "layout not kept"

    def backward_cases(self, runner):
        return [(a, dict(i=i)) for i, a in enumerate(ACTS)] + [(f"gradcheck-{a}", dict(i=i, check=True))
                                                                for i, a in enumerate(ACTS)]

    def backward(self, t, i, check=False):
        B = t.module
        if check:
            x, m, scale, shift = self._inputs(t, i, F64, "contiguous", shape=(1, 3, 4, 5))
            gradcheck(lambda x, s, b: B.masked_affine_act(x, m.double(), s, b, ACTS[i]),
                      [v.requires_grad_() for v in (x, scale, shift)], f"affine {ACTS[i]}")
            return
        layout = LAYOUTS[i % 3] if LAYOUTS[i % 3] in t.runner.layouts else "contiguous"
        check = Deferred(t.backend)
        check(F64, ACTS[i], lambda: assert_agrees(t.backend, mo.masked_affine_act, self._inputs(t, i, F64, layout),
                                                  activation=ACTS[i], dtype=F64, grad=True, what=f"affine {ACTS[i]}"))
        check.finish()

    def opcheck_cases(self, runner):
        return [(lay, dict(layout=lay)) for lay in ("contiguous", "channels_last")]

    def opcheck(self, t, layout):
        x, m, scale, shift = self._inputs(t, 1, F32, layout, shape=(1, 2, 6, 7))
        opcheck(t.op("masked_affine_act"), (x.requires_grad_(), m.float(), scale.requires_grad_(),
                                            shift.requires_grad_(), "silu"))
        opcheck(t.op("masked_affine_act"), (x, m.float(), scale, shift, "none"))

    def more_invariants(self, t, B, x, layout):
        s = torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype, device=x.device)
        b = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype, device=x.device)
        _assert_plain_op(B.masked_affine_act(x, _all_ones_like(x), s, b, "gelu"),
                         lambda v: apply_activation(v * s.to(v.dtype).view(1, -1, 1, 1) + b.to(v.dtype).view(1, -1, 1, 1),
                                                    "gelu"), x, "all-ones affine")


# ---------------------------------------------------------------------------- pools
class _PoolTester(OpTester):
    KIND = ""

    def _cases(self, runner):
        return [(i, c) for i, c in enumerate(pool_cases()) if self.KIND == "max" or c.dilation == (1, 1)]

    def _layout_kind(self, runner, i):
        offset = 0 if self.KIND == "max" else 1
        layout = LAYOUTS[(i + offset) % 3]
        return (layout if layout in runner.layouts else "contiguous"), MASK_KINDS[(i + 2 * offset) % len(MASK_KINDS)]

    def _call(self, case):
        if self.KIND == "max":
            return mo.masked_max_pool2d, (case.kernel, case.stride, case.padding, case.dilation), \
                dict(ceil_mode=case.ceil_mode)
        return mo.masked_avg_pool2d, (case.kernel, case.stride, case.padding), \
            dict(ceil_mode=case.ceil_mode, count_include_pad=case.count_include_pad)

    def configs(self, runner):
        return [(c.id, dict(i=i)) for i, c in self._cases(runner)]

    def forward_config(self, t, i):
        case = pool_cases()[i]
        layout, kind = self._layout_kind(t.runner, i)
        fn, args, kwargs = self._call(case)
        m = make_mask(kind, case.n, case.h, case.w, seed=i, device=t.device)
        for dtype in t.runner.dtypes:
            x = make_input(case.n, case.c, case.h, case.w, dtype, layout, seed=i, device=t.device)
            out = assert_agrees(t.backend, fn, (x, m), *args, dtype=dtype, what=f"{self.OP} {case.id}", **kwargs)
            if layout == "channels_last":
                assert out[0].is_contiguous(memory_format=torch.channels_last), "layout not kept"
            if self.KIND == "max" and dtype in (F32, F64):
                self._assert_atens_indices(t, x, m, case)

    def _assert_atens_indices(self, t, x, m, case):
        """The op's indices (for its backward) are ATen's max_pool2d_with_indices on the masked input."""
        m = m.to(x.dtype)
        _, _, idx = t.op("masked_max_pool2d")(x, m, list(case.kernel), list(case.stride), list(case.padding),
                                               list(case.dilation), case.ceil_mode)
        _, expected = F.max_pool2d(torch.where(m > 0, x, 0).contiguous(), case.kernel, case.stride, case.padding,
                                   case.dilation, case.ceil_mode, return_indices=True)
        assert torch.equal(idx, expected), f"max pool indices differ from ATen's ({case.id})"

    def backward_cases(self, runner):
        return [(c.id, dict(i=i)) for i, c in self._cases(runner)] + [("gradcheck", dict(i=0, check=True))]

    def backward(self, t, i, check=False):
        case = pool_cases()[i]
        layout, kind = self._layout_kind(t.runner, i)
        fn, args, kwargs = self._call(case)
        m = make_mask(kind, case.n, case.h, case.w, seed=i, device=t.device)
        x = make_input(case.n, case.c, case.h, case.w, F64, layout, seed=i, device=t.device)
        if check:
            t.module  # noqa: B018
            with mo.set_backend(t.backend):
                gradcheck(lambda x: fn(x, m, *args, **kwargs)[0], [x.requires_grad_()], f"{self.OP} {case.id}")
            return
        t.module  # noqa: B018
        assert_agrees(t.backend, fn, (x, m), *args, dtype=F64, grad=True, what=f"{self.OP} {case.id}", **kwargs)

    def opcheck_cases(self, runner):
        return [(lay, dict(layout=lay)) for lay in ("contiguous", "channels_last")]


class MaskedMaxPool2dTester(_PoolTester):
    """masked_max_pool2d: max pool of the masked input (removed = 0), mask_out = maxpool(mask)."""
    OP, KIND = "masked_max_pool2d", "max"

    def opcheck(self, t, layout):
        x, m = sweep_inputs(F32, layout, t.device, 1, 2, 6, 7)
        opcheck(t.op(self.OP), (x.requires_grad_(), m, [3, 3], [2, 2], [1, 1], [1, 1], True))

    def more_invariants(self, t, B, x, layout):
        y = B.masked_max_pool2d(x, _all_ones_like(x), (3, 3), (2, 2), (1, 1), (1, 1), False)[0]
        assert torch.equal(y, F.max_pool2d(x, 3, 2, 1)), "all-ones mask: not the plain max pool"


class MaskedAvgPool2dTester(_PoolTester):
    """masked_avg_pool2d: avgpool(x * m) where the window holds a visible pixel; mask_out = that indicator."""
    OP, KIND = "masked_avg_pool2d", "avg"

    def opcheck(self, t, layout):
        x, m = sweep_inputs(F32, layout, t.device, 1, 2, 6, 7)
        opcheck(t.op(self.OP), (x.requires_grad_(), m, [3, 3], [2, 2], [1, 1], True, False))

    def more_invariants(self, t, B, x, layout):
        _assert_plain_op(B.masked_avg_pool2d(x, _all_ones_like(x), (3, 3), (2, 2), (1, 1), False, True)[0],
                         lambda v: F.avg_pool2d(v, 3, 2, 1), x, "all-ones avg pool")


# ---------------------------------------------------------------------------- masked_mean
class MaskedMeanTester(OpTester):
    """masked_mean: sum(m x) / sum(m) per channel (0 where nothing is visible), differentiable in a soft mask."""
    OP = "masked_mean"

    def configs(self, runner):
        out = [(f"{kind}-{lay}", dict(shape=(3, 7, 12, 9), kind=kind, layout=lay))
               for kind, lay in cycle_product(MASK_KINDS, runner.layouts)]
        # more channels than one block, more pixels than one chunk
        return out + [("wide", dict(shape=(2, 70, 11, 12), kind="random", layout="channels_last"))]

    def forward_config(self, t, shape, kind, layout):
        m = make_mask(kind, shape[0], shape[2], shape[3], device=t.device)
        for dtype in t.runner.dtypes:
            x = make_input(*shape, dtype, layout, device=t.device)
            assert_agrees(t.backend, mo.masked_mean, (x, m), dtype=dtype, what=f"mean {kind}")

    def backward_cases(self, runner):
        out = [(f"{kind}-{lay}", dict(kind=kind, layout=lay)) for kind, lay in cycle_product(MASK_KINDS, runner.layouts)]
        return out + [("soft_mask", dict(kind="soft", layout="channels_last")), ("gradcheck", dict(kind="soft", check=True))]

    def backward(self, t, kind, layout="contiguous", check=False):
        """Gradients to x, and to a soft mask (with exact zeros: NaN under them must reach nothing)."""
        t.module  # noqa: B018
        n, c, h, w = (2, 3, 4, 5) if check else (3, 7, 12, 9)
        x = make_input(n, c, h, w, F64, layout, device=t.device)
        if kind != "soft":
            m = make_mask(kind, n, h, w, device=t.device)
            assert_agrees(t.backend, mo.masked_mean, (x, m), dtype=F64, grad=True, what=f"mean {kind}")
            return
        m = (torch.rand(n, 1, h, w, generator=_gen(3), dtype=F64) * 0.9 + 0.1).to(t.device)
        if check:
            with mo.set_backend(t.backend):
                gradcheck(lambda x, m: mo.masked_mean(x, m, soft=True), [x.requires_grad_(), m.requires_grad_()],
                          "mean, soft mask")
            return
        m = torch.where(m > 0.4, m, 0)
        x = x.masked_fill(m == 0, float("nan"))
        assert_agrees(t.backend, mo.masked_mean, (x, m), dtype=F64, grad=True, grad_mask=True,
                      what="mean, soft mask", soft=True)

    def opcheck_cases(self, runner):
        return [(lay, dict(layout=lay)) for lay in ("contiguous", "channels_last")]

    def opcheck(self, t, layout):
        x, m = sweep_inputs(F32, layout, t.device, 2, 2, 6, 7)
        opcheck(t.op(self.OP), (x.requires_grad_(), m))
        opcheck(t.op(self.OP), (x, (m * 0.5).requires_grad_()))

    def more_invariants(self, t, B, x, layout):
        _assert_plain_op(B.masked_mean(x, _all_ones_like(x)), lambda v: v.mean(dim=(2, 3)), x, "all-ones mean")


# ---------------------------------------------------------------------------- soft_fill, soft_fill_backward
class SoftFillTester(OpTester):
    """soft_fill (a soft-masked conv's input: every pixel blended with its fill by its mask value) and its
    backward (soft_fill_backward: the gradients to x and to the mask)."""
    OP = "soft_fill"
    SMALL_INVARIANTS = ("soft_fill1", "soft_fill2_padded")
    # (rings, fill_grad, zeros padded around the result)
    SETTINGS = ((0, False, (0, 0, 0, 0)), (1, False, (0, 1, 0, 1)), (3, False, (0, 0, 0, 0)), (3, True, (2, 1, 0, 1)))

    @staticmethod
    def _inputs(t, dtype, layout, seed, shape=(2, 5, 13, 17)):
        """x and a soft mask with exact zeros (NaN in x under them: never read)."""
        n, c, h, w = shape
        g = _gen(seed)
        x = torch.randn(n, c, h, w, generator=g, dtype=F64)
        m = torch.rand(n, 1, h, w, generator=g, dtype=F64) * (torch.rand(n, 1, h, w, generator=g) > 0.4)
        m[0, :, 2, 3] = 1.0  # a fully visible pixel next to partly visible ones
        x[:, :, 0, 0], m[:, :, 0, 0] = float("nan"), 0.0
        return with_layout(x.to(dtype), layout).to(t.device), m.to(dtype).to(t.device)

    def _shape(self, runner):
        return (2, 3, 7, 9) if runner.small else (2, 5, 13, 17)

    # forward: the primitive sweep (soft masks, every dtype and layout); the settings below run in backward,
    # values and gradients together.

    def backward_cases(self, runner):
        cases = list(itertools.product(self.SETTINGS, ("contiguous", "channels_last"), (F64, F32)))
        if runner.small:  # the interpreter: every setting in float32 and float64, each dtype in both layouts
            cases = [c for c in cases if c[1:] != ("channels_last", F32)]
        if "strided" in runner.layouts:
            cases += [(self.SETTINGS[3], "strided", F64), (self.SETTINGS[1], "strided", F32)]
        out = [(f"iters{it}{'-fill_grad' if fg else ''}-pads{''.join(map(str, p))}-{lay}-{_name(d)}",
                dict(iters=it, fill_grad=fg, pads=p, layout=lay, dtype=d, seed=7 + k))
               for k, ((it, fg, p), lay, d) in enumerate(cases)]
        return out + [(f"gradcheck{'-fill_grad' if fg else ''}", dict(iters=2, fill_grad=fg, pads=(1, 0, 0, 1),
                                                                     layout="contiguous", dtype=F64, seed=1, check=True))
                      for fg in (False, True)]

    def backward(self, t, iters, fill_grad, pads, layout, dtype, seed, check=False):
        """The value and its gradients to x and to the mask (exact zeros in the mask, NaN under them) against
        the reference's autograd; gradcheck: to the mask (strictly inside (0, 1]), and to x with fill_grad
        (without it the fill values pass no gradient to x by design)."""
        B = t.module
        if check:
            g = _gen(seed)
            x = torch.randn(1, 2, 5, 6, generator=g, dtype=F64).to(t.device)
            m = (torch.rand(1, 1, 5, 6, generator=g, dtype=F64) * 0.8 + 0.2).to(t.device).requires_grad_()
            if fill_grad:
                gradcheck(lambda x, m: B.soft_fill(x, m, iters, True, pads), [x.requires_grad_(), m], "soft_fill")
            else:
                gradcheck(lambda m: B.soft_fill(x, m, iters, False, pads), [m], "soft_fill")
            return
        x, m = self._inputs(t, dtype, layout, seed, self._shape(t.runner))
        assert_agrees(t.backend, on_backend("soft_fill"), (x, m), iters, fill_grad, pads, dtype=dtype, grad=True,
                      grad_mask=True, what=f"soft_fill {iters} rings fill_grad={fill_grad} pads {pads}")

    def opcheck_cases(self, runner):
        return [(lay, dict(layout=lay)) for lay in ("contiguous", "channels_last")]

    def opcheck(self, t, layout):
        x, m = self._inputs(t, F32, layout, 4, shape=(1, 2, 6, 7))
        x = x.nan_to_num()
        for iters, fill_grad, pads in ((0, False, [0, 0, 0, 0]), (2, False, [0, 1, 0, 1]), (3, True, [2, 0, 1, 0])):
            opcheck(t.op("soft_fill"), (x.clone().requires_grad_(), (m * 0.5).requires_grad_(), iters, fill_grad, pads))
            opcheck(t.op("soft_fill_backward"), (torch.randn_like(x), x, m * 0.5, iters, fill_grad))


# ---------------------------------------------------------------------------- imputation_solve
class ImputationSolveTester(OpTester):
    """imputation_solve: ROAD's noisy-linear system, solved by conjugate gradients (masked_ops.explain.imputation).

    On CPU tensors the fused kernel masked_ops::imputation_solve ("cpp"), against the torch solver (the
    reference); on CUDA tensors (the "cuda" target: there is no CUDA kernel) the torch solver on the GPU,
    against the CPU solve. Both in float64 to a residual of op_cases.SOLVE_TOL (the rule: assert_solved)."""
    OP = "imputation_solve"
    BACKENDS = ("cpp", "cuda")
    CASES = (((1, 1, 1, 1), "scattered"), ((2, 3, 1, 40), "one-removed"), ((1, 2, 37, 53), "scattered"),
             ((3, 3, 17, 9), "one-visible"), ((1, 3, 24, 20), "border-blocks"), ((3, 3, 64, 48), "patches8"))

    def applies(self, check, target, case):
        return not (check == "opcheck" and target.backend != "cpp")  # no CUDA kernel: the torch solver there

    @staticmethod
    def _require(t):
        """The fused kernel needs the cpp backend; on CUDA tensors only the device is needed."""
        if t.backend == "cpp":
            t.module  # noqa: B018
        elif not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")

    @staticmethod
    def _solve(t, images, masks, **kwargs):
        from masked_ops.explain.imputation import linear_imputation

        with mo.set_backend(t.backend):
            ours = linear_imputation(images.to(t.device), masks.to(t.device), tol=SOLVE_TOL, fallback=[0.5], **kwargs)
        with mo.set_backend("torch"):
            truth = linear_imputation(images, masks, tol=SOLVE_TOL, fallback=[0.5], **kwargs)
        return ours, truth

    def forward_cases(self, runner):
        return [(f"{kind}-{'x'.join(map(str, shape))}", dict(shape=shape, kind=kind, seed=k))
                for k, (shape, kind) in enumerate(self.CASES)]

    def forward(self, t, shape, kind, seed):
        self._require(t)
        images, masks = imputation_case(*shape, kind, seed=seed)
        ours, truth = self._solve(t, images, masks)
        assert ours.device.type == t.device
        assert_solved(ours, truth, f"linear imputation {kind} {shape}")
        visible = masks.expand_as(images)
        assert torch.equal(ours.cpu()[visible], images[visible]), "visible pixels changed"
        if t.backend == "cpp":  # the op itself: its residual, and its solution against the torch solver's
            from masked_ops.explain.imputation import _neighbour_sum, _System

            removed = ~masks & masks.flatten(1).any(1).view(-1, 1, 1, 1)
            if removed.any():
                b = _neighbour_sum(torch.where(masks, images, 0)) * removed
                u, resid = t.op("imputation_solve")(b, removed, SOLVE_TOL, 500)
                assert float(resid.max()) <= SOLVE_TOL
                assert_solved(u, _System(removed, F64).solve(b, SOLVE_TOL, 500), "imputation_solve")

    def backward_cases(self, runner):
        return [(f"{kind}-{'x'.join(map(str, shape))}", dict(shape=shape, kind=kind, seed=k))
                for k, (shape, kind) in enumerate(self.CASES[2:5], 2)] + [("gradcheck", dict(shape=(1, 2, 6, 7),
                                                                                            kind="scattered", seed=9,
                                                                                            check=True))]

    def backward(self, t, shape, kind, seed, check=False):
        """The gradient to the images (the solve's backward is one more solve), against the torch solver's."""
        from masked_ops.explain.imputation import linear_imputation

        self._require(t)
        images, masks = imputation_case(*shape, kind, seed=seed)
        if check:
            with mo.set_backend(t.backend):
                gradcheck(lambda x: linear_imputation(x, masks.to(t.device), tol=1e-12),
                          [images.to(t.device).requires_grad_()], "linear imputation")
            return
        w = torch.randn(images.shape, generator=_gen(seed), dtype=F64)
        grads = []
        for backend, device in ((t.backend, t.device), ("torch", "cpu")):
            x = images.to(device).requires_grad_()
            with mo.set_backend(backend):
                (linear_imputation(x, masks.to(device), tol=SOLVE_TOL, fallback=[0.5]) * w.to(device)).sum().backward()
            grads.append(x.grad)
        assert_solved(grads[0], grads[1], f"gradient of linear imputation {kind} {shape}")

    def opcheck_cases(self, runner):
        return [("scattered", dict())]

    def opcheck(self, t):
        images, masks = imputation_case(2, 3, 12, 10, "scattered", seed=2)
        removed = ~masks
        b = torch.rand(images.shape, generator=_gen(1), dtype=F64) * removed
        opcheck(t.op("imputation_solve"), (b, removed, 1e-9, 200))

    def invariants_cases(self, runner):
        return [("scattered", dict(kind="scattered")), ("border-blocks", dict(kind="border-blocks"))]

    def invariants(self, t, kind):
        """The removed pixels' content never enters: NaN, inf or anything there gives the same bits."""
        from masked_ops.explain.imputation import linear_imputation

        self._require(t)
        images, masks = imputation_case(2, 3, 20, 17, kind, seed=4)
        with mo.set_backend(t.backend):
            clean = linear_imputation(images.to(t.device), masks.to(t.device))
            for value in t.runner.poisons:
                dirty = linear_imputation(poison(images, masks, value).to(t.device), masks.to(t.device))
                assert torch.equal(dirty, clean), f"{value} in the removed region changed the imputation"


# ---------------------------------------------------------------------------- masked_conv2d (public, composite)
class MaskedConv2dTester(OpTester):
    """masked_conv2d, the public op: the backend's fill, ATen's conv, the backend's fused epilogue, in the
    three modes, over op_cases.conv_cases (kernels 1 to 7, strides, paddings, dilations, groups). A composite
    of the ops above, so no opcheck of its own."""
    OP = "masked_conv2d"
    CHECKS = ("forward", "backward", "invariants")
    test_opcheck = None

    def _cases(self, runner):
        cases = [(i, case, mode) for i, case in enumerate(conv_cases()) for mode in MODES]
        if runner.small:  # the interpreter: small kernels (few fill rings), one case per mode
            cases = [(i, case, mode) for i, case, mode in cases if (i, mode) in ((0, "zero"), (2, "fill"), (3, "renorm"))]
        return cases

    def _setting(self, runner, i, mode):
        j = i + MODES.index(mode)
        layout = LAYOUTS[j % len(LAYOUTS)]
        return dict(kind=MASK_KINDS[j % len(MASK_KINDS)], layout=layout if layout in runner.layouts else "contiguous",
                    activation=ACTS[j % len(ACTS)], padding_visible=(mode == "renorm" and j % 2 == 0), seed=j)

    def forward_cases(self, runner):
        out = [(f"{mode}-{case.id}", dict(i=i, mode=mode)) for i, case, mode in self._cases(runner)]
        if not runner.small:  # wider: 8 -> 16 channels, 20 x 20, padding 1; and in float16 and bfloat16
            out += [(f"{mode}-wide", dict(i=-1, mode=mode)) for mode in MODES]
            out += [(f"{mode}-low_precision", dict(i=-4, mode=mode)) for mode in ("fill", "renorm")]
        return out

    def _inputs(self, t, i, mode, dtype):
        if i == -1:
            case, s = ConvCase(2, 8, 16, 20, 20, (3, 3), padding=(1, 1)), dict(kind="random", layout="channels_last",
                                                                              activation="relu", padding_visible=False,
                                                                              seed=3)
        elif i == -4:
            case = ConvCase(2, 8, 8, 20, 20, (3, 3), stride=(1, 1) if mode == "fill" else (2, 2), padding=(1, 1))
            s = dict(kind="patches", layout="contiguous", activation="gelu" if mode == "fill" else "none",
                     padding_visible=False, seed=0)
        else:
            case, s = conv_cases()[i], self._setting(t.runner, i, mode)
        x = make_input(case.n, case.c_in, case.h, case.w, dtype, s["layout"], seed=s["seed"], device=t.device)
        m = make_mask(s["kind"], case.n, case.h, case.w, seed=s["seed"], device=t.device)
        weight, bias = make_conv_params(case, dtype, device=t.device)
        inputs = (x, m, weight) if bias is None else (x, m, weight, bias)
        kwargs = dict(case.kwargs(), mode=mode, activation=s["activation"], padding_visible=s["padding_visible"])
        return case, s, inputs, kwargs

    def forward(self, t, i, mode):
        t.module  # noqa: B018
        check = Deferred(t.backend)
        for dtype in ((F16, BF16) if i == -4 else t.runner.dtypes):
            case, s, inputs, kwargs = self._inputs(t, i, mode, dtype)
            check(dtype, s["activation"], lambda dtype=dtype, case=case, s=s, inputs=inputs, kwargs=kwargs: self._forward(
                t, dtype, case, s, inputs, kwargs))
        check.finish()

    def _forward(self, t, dtype, case, s, inputs, kwargs):
        out = assert_agrees(t.backend, mo.masked_conv2d, inputs, dtype=dtype, what=f"conv {kwargs['mode']} {case.id}",
                            **kwargs)
        if s["layout"] == "channels_last":
            assert out[0].is_contiguous(memory_format=torch.channels_last), "layout not kept"

    def backward_cases(self, runner):
        out = [(f"{mode}-{case.id}", dict(i=i, mode=mode)) for i, case, mode in self._cases(runner)]
        if not runner.small:
            out += [(f"{mode}-float_mask", dict(i=-2, mode=mode)) for mode in MODES]
        return out + [(f"gradcheck-{mode}", dict(i=-3, mode=mode)) for mode in MODES]

    def backward(self, t, i, mode):
        """Gradients to x, weight and bias against the torch backend (float64; float32 with a float mask); and
        gradcheck to weight and bias (and to x in the zero and renorm modes: the fill passes none by design)."""
        t.module  # noqa: B018
        if i == -3:
            case = ConvCase(1, 2, 3, 6, 7, (3, 3), padding=(1, 1))
            x = make_input(1, 2, 6, 7, F64, device=t.device)
            m = make_mask("patches", 1, 6, 7, device=t.device)
            w, b = make_conv_params(case, F64, device=t.device)
            with mo.set_backend(t.backend):
                if mode == "fill":
                    gradcheck(lambda w, b: mo.masked_conv2d(x, m, w, b, padding=1, activation="gelu")[0],
                              [w.requires_grad_(), b.requires_grad_()], "conv fill")
                else:
                    gradcheck(lambda x, w, b: mo.masked_conv2d(x, m, w, b, padding=1, mode=mode, activation="tanh")[0],
                              [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()], f"conv {mode}")
            return
        if i == -2:  # float32, channels_last, a float mask
            case = ConvCase(2, 8, 8, 14, 14, (3, 3), padding=(1, 1))
            x = make_input(2, 8, 14, 14, F32, "channels_last", seed=5, device=t.device)
            m = make_mask("patches", 2, 14, 14, seed=5, device=t.device).float()
            weight, bias = make_conv_params(case, F32, device=t.device)
            assert_agrees(t.backend, mo.masked_conv2d, (x, m, weight, bias), padding=1, mode=mode, activation="relu",
                          dtype=F32, grad=True, what=f"conv {mode} float mask")
            return
        case, s, inputs, kwargs = self._inputs(t, i, mode, F64)
        check = Deferred(t.backend)
        check(F64, s["activation"], lambda: assert_agrees(t.backend, mo.masked_conv2d, inputs, dtype=F64, grad=True,
                                                          what=f"conv {mode} {case.id}", **kwargs))
        check.finish()

    def invariants_cases(self, runner):
        out = [(f"{mode}-{case.id}", dict(i=i, mode=mode)) for i, case, mode in self._cases(runner)]
        return out + [(f"no_grad-{mode}", dict(i=-1, mode=mode)) for mode in MODES]

    def invariants(self, t, i, mode):
        """NaN in the removed region gives the same bits; without autograd (the epilogue written over the conv
        output) the result is the one with autograd."""
        t.module  # noqa: B018
        if i == -1:
            case = ConvCase(2, 4, 5, 11, 10, (3, 3), stride=(2, 2), padding=(1, 1))
            x = make_input(2, case.c_in, 11, 10, F32, "channels_last", seed=2, device=t.device)
            m = make_mask("patches", 2, 11, 10, seed=2, device=t.device)
            w, b = make_conv_params(case, F32, device=t.device)
            with mo.set_backend(t.backend):
                with torch.no_grad():
                    fast = mo.masked_conv2d(x, m, w, b, case.stride, case.padding, mode=mode, activation="relu")[0]
                slow = mo.masked_conv2d(x.requires_grad_(), m, w, b, case.stride, case.padding, mode=mode,
                                        activation="relu")[0]
            assert slow.requires_grad and torch.equal(fast, slow.detach())
            return
        case, s, (x, m, *params), kwargs = self._inputs(t, i, mode, F32)
        with mo.set_backend(t.backend):  # NaN here (the ops' own invariants try every poison)
            clean = mo.masked_conv2d(x, m, *params, **kwargs)[0]
            assert torch.equal(mo.masked_conv2d(poison(x, m, float("nan")), m, *params, **kwargs)[0], clean), \
                "NaN in the removed region changed the output"


TESTERS = (NeighborFillTester, ConvEpilogueTester, MaskedAffineActTester, MaskedMaxPool2dTester,
           MaskedAvgPool2dTester, MaskedMeanTester, SoftFillTester, ImputationSolveTester, MaskedConv2dTester)


# ============================================================================ the interpreter's checks
def check_names(runner: Runner = INTERPRET) -> List[str]:
    """'<op>.<check>' for every tester and check with cases on this runner (known without running anything)."""
    return [f"{cls.OP}.{check}" for cls in TESTERS for check in cls.CHECKS if cls().params(check, runner)]


def checks(runner: Runner = INTERPRET) -> Dict[str, Callable[[], List[str]]]:
    """name -> a function running every case of that check (raises with every failure; returns the known issues)."""
    by_op = {cls.OP: cls for cls in TESTERS}
    out = {}
    for name in check_names(runner):
        op, check = name.split(".")
        out[name] = lambda cls=by_op[op], check=check: cls.run_check(check, runner)
    return out
