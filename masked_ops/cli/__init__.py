"""The ``masked-ops`` command line (also ``python -m masked_ops.cli``): the only place that knows argparse.

    masked-ops explain IMAGE [options]   explain one image: a file or a bundled sample (chelsea, china, ...)
    masked-ops explain --demo            scikit-image's cat, LIME, layer masking vs grey
    masked-ops explain DIR --out results.h5 ...   every image of a folder into one HDF5 file
    masked-ops experiment NAME ...       the paper's experiments

Modules: ``common`` (parser class, argument types, error reporting), ``explain`` (one image),
``folder`` (a folder of images: masked_ops.dataset), ``experiment`` (masked_ops.experiments). The
libraries below raise ValueError / TypeError naming the argument; this package turns them into one
``masked-ops: error:`` line and exit status 2. Nothing outside this package imports it (the
``python -m masked_ops.experiments`` entry point aside).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional, Sequence

from .common import PREFIX, Parser, report_error, report_interrupt, show_warning


def build_parser() -> Parser:
    from . import experiment, explain

    parser = Parser(prog=PREFIX, description="Layer masking for CNNs: explanations and experiments.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    explain.add_parser(sub)
    experiment.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ModuleNotFoundError:
        pass  # only the figures need it: a command that draws one says what to install (report_error)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .._util.malloc import keep_freed_memory_unless_opted_out

    # Freed activation buffers stay in the process: eager CPU forwards 1.5x-1.7x faster (masked_ops/_util/malloc.py)
    keep_freed_memory_unless_opted_out()
    if getattr(args, "func", None) is None:
        print(f"{PREFIX}: error: give a command: explain or experiment (see: {PREFIX} --help)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt as e:
            report_interrupt(args, e)
            return 130
        except Exception as e:
            if os.environ.get("MASKED_OPS_DEBUG") == "1":
                raise
            return report_error(e)


__all__ = ["main", "build_parser"]
