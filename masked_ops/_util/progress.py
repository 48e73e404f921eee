"""The one progress-bar policy of the project.

    with progress_bar(total, "lime (layer)", "sample", enabled=progress, auto_min=256) as bar:
        bar.update(n)

``enabled``: True shows a bar, False hides it, None ("auto") shows it only for long work (``total``
at least ``auto_min``), so tiny calls inside loops and tests stay quiet. Bars of inner loops
(one explanation) vanish when done (``leave=False``); bars of whole runs stay. Without tqdm (an
optional dependency) every bar is silent: progress is never a reason to fail.

``note(message, bar)`` prints a line to stderr above a bar instead of into the middle of it.
"""
from __future__ import annotations

import sys
from typing import Optional


class NoBar:
    """The interface of the tqdm bars used here, doing nothing."""

    n = 0
    disable = True

    def update(self, n=1):
        self.n += n

    def refresh(self):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress_bar(total: int, desc: str, unit: str = "it", *, enabled: Optional[bool] = True, auto_min: int = 0,
                 initial: int = 0, leave: bool = False):
    """A tqdm bar (or a silent NoBar) under the policy of the module docstring."""
    show = (total >= auto_min) if enabled is None else bool(enabled)
    if not show:
        return NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return NoBar()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, smoothing=0.1)


def bars_showing() -> bool:
    """Whether a tqdm bar is on the terminal now (then a message must not be printed into its line)."""
    tqdm = _tqdm_if_imported()
    return tqdm is not None and any(not getattr(b, "disable", True) for b in list(getattr(tqdm, "_instances", ())))


def note(message: str, bar=None, *, bar_elsewhere: bool = False) -> None:
    """``message`` on its own line of stderr, above any progress bar that is showing (``bar`` or another).

    ``bar_elsewhere``: another process draws a bar on the same stderr (rank 0 under torchrun), which this
    process cannot clear: the message starts a new line instead of continuing the bar's.
    """
    tqdm = _tqdm_if_imported()
    if tqdm is not None and (bars_showing() or (bar is not None and not getattr(bar, "disable", True))):
        tqdm.write(message, file=sys.stderr)  # clears the bars, prints the line, redraws them below
    else:
        print(("\n" if bar_elsewhere else "") + message, file=sys.stderr)


def _tqdm_if_imported():
    # a bar can only be showing if tqdm was imported; never import it just to print a line
    module = sys.modules.get("tqdm.auto") or sys.modules.get("tqdm")
    return getattr(module, "tqdm", None)
