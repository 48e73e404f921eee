"""Atomic file writes with ordinary permissions: nothing half-written is ever left under a final name.

    with atomic_write("out.png") as f:      # binary file object of a temporary file beside out.png
        fig.savefig(f, format="png")
    # on success the temporary file is flushed to disk (fsync) and renamed over out.png;
    # on any exception it is removed

    with atomic_path("out.h5") as tmp:      # for writers that want a path (h5py): same guarantees
        h5py.File(tmp, "w") ...

The temporary file is created with mode 0666 filtered by the process umask (0644 under the usual
umask 022), as ``open()`` would create the final file: ``tempfile.mkstemp`` would give 0600, and
``os.replace`` keeps the temporary file's mode. Its name starts with ``.<final name>.`` and ends with
``.tmp`` (``is_temp_of`` recognises the leftovers of a killed process).

This is the one atomic writer of the project: PNGs, .npz explanations, experiment checkpoints and
results, DiffMask checkpoints (``atomic_torch_save``), HDF5 files and the dataset runner's JSON all
go through it.
"""
from __future__ import annotations

import contextlib
import json
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


def is_temp_of(name: str, final_name: str) -> bool:
    """Whether the file name ``name`` is a temporary file of ``atomic_path`` for ``final_name``."""
    return name.startswith(f".{final_name}.") and name.endswith(".tmp")


def _fsync(path: str) -> None:
    # the data must be on disk before the rename makes it the final file: after a machine crash a
    # renamed but unsynced file can be empty, and resumable runs would trust it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """The path of a new temporary file beside ``path``; synced and renamed over ``path`` on success."""
    final = os.fspath(path)
    tmp = _create_temp(final)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file object writing to a temporary file beside ``path``, renamed over it on success.

    ``mode`` is "wb" (default) or "w" (text, UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f


def write_json(path: PathLike, obj) -> None:
    """``obj`` as indented, key-sorted JSON, atomically (the parent folder is created if missing)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def read_json(path: PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_torch_save(obj, path: PathLike) -> None:
    """torch.save through ``atomic_write`` (checkpoints: never a half-written file)."""
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


def check_writable(path: str, flag: str, example: str = "cat.png") -> None:
    """A file ``path`` can be written (not a folder, in an existing writable folder), else ValueError.

    ``flag`` names the argument in the message (``--out``, ``out``); ``example`` is a file name to suggest.
    """
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file name (e.g. {os.path.join(path, example)})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag}: the folder {folder!r} is not writable")
