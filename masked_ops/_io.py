"""Atomic file writes with ordinary permissions: nothing half-written is ever left under a final name.

    with atomic_write("out.png") as f:      # binary file object of a temporary file beside out.png
        fig.savefig(f, format="png")
    # on success the temporary file is renamed over out.png; on any exception it is removed

The temporary file is created with mode 0666 filtered by the process umask (0644 under the usual
umask 022), as ``open()`` would create the final file: ``tempfile.mkstemp`` would give 0600, and
``os.replace`` keeps the temporary file's mode.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _create_temp(final: str) -> str:
    folder, name = os.path.split(os.path.abspath(final))
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file beside {final!r}")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file object writing to a temporary file beside ``path``, renamed over it on success.

    ``mode`` is "wb" (default) or "w" (text, UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    final = os.fspath(path)
    tmp = _create_temp(final)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
