"""The HDF5 file of explanations (one row per image), written atomically, read with plain h5py.

Schema (format "masked_ops.explanations", version 1; N images, E errors, H x W the model's input)::

    /path            (N,)  str     image path relative to the folder, "/"-separated; rows sorted by it
    /label           (N,)  int64   the model class the image's class folder names (-1: none / unknown)
    /label_name      (N,)  str     the class folder ("" without an ImageFolder layout)
    /image_size      (N,2) int32   the image's height and width on disk
    /target          (N,)  int64   the explained class: the model's top-1 on the clean image
    /topk_class      (N,k) int64   the k most probable classes of the clean image, best first
    /topk_prob       (N,k) float32 their softmax probabilities
    /segments        (N,H,W) uint16 the segmentation the attributions are made of (labels 0..K-1)
    /attributions/<strategy> (N,H,W) float32  per pixel, the weight of its segment for ``target``
    /model_classes   (C,)  str     the model's class names (index -> name)
    /errors/path     (E,)  str     images that could not be read, and why
    /errors/message  (E,)  str
    root attributes  format, format_version, the run's settings (method, masking, model, weights (as asked:
                     "default" or the --weights value), model_weights (what was loaded, in words),
                     samples, segments, n_segments, seed, top_k, output, batch_size, input_size,
                     threads_per_process, model_fingerprint), library versions, ``folder`` and
                     ``classes`` (class folder names); ``config_json`` holds the settings and
                     versions as one JSON string (a resumed run must match it)
    /run attributes  what differs between runs of the same settings: world_size, created_utc,
                     images_computed (by the last invocation)

Reading::

    import h5py
    with h5py.File("results.h5") as f:
        paths = f["path"].asstr()[:]
        heat = f["attributions/layer"][0]          # H x W map of the first image
        print(paths[0], f["model_classes"].asstr()[f["target"][0]])

Every file is written to a temporary name in the same folder (".<name>.<random>.tmp", masked_ops._util.io) and renamed
when complete and synced, so a file at the final name is always whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._util.io import atomic_path
from .._util.progress import progress_bar

FORMAT = "masked_ops.explanations"
FORMAT_VERSION = 1
ROW_DATASETS = ("path", "label", "label_name", "image_size", "target", "topk_class", "topk_prob", "segments")
RUN_GROUP = "run"


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ValueError("writing HDF5 needs the h5py package (pip install 'masked_ops[explain]')") from e
    return h5py


@dataclasses.dataclass
class Row:
    """The explanation of one image under every strategy (one row of the file)."""

    path: str
    label: int
    label_name: str
    image_size: Tuple[int, int]
    target: int
    topk_class: np.ndarray  # k int64
    topk_prob: np.ndarray   # k float32
    segments: np.ndarray    # H x W
    attributions: Dict[str, np.ndarray]  # strategy -> H x W float32


@dataclasses.dataclass
class Contents:
    """A whole (small) file in memory: shard files and tests."""

    rows: List[Row]
    errors: List[Tuple[str, str]]
    attrs: dict
    run: dict
    model_classes: List[str]


# ----------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_h5(path: str):
    """Yield an h5py.File open for writing at a temporary name; synced and renamed to ``path`` on success."""
    h5py = _h5py()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:  # h5py truncates the empty temporary file; its permissions stay
            yield f


# ----------------------------------------------------------------------------- writing
def _str_dtype():
    return _h5py().string_dtype("utf-8")


def _set_attrs(obj, attrs: Mapping) -> None:
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            v = np.asarray([str(x) for x in v], dtype=object) if all(isinstance(x, str) for x in v) \
                else np.asarray(v)
            if v.dtype == object:
                obj.attrs.create(k, v, dtype=_str_dtype())
                continue
        if isinstance(v, str):
            v = str(v)  # a str subclass (torch.__version__) would become a fixed-width numpy string
        obj.attrs[k] = v


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_attr_value(x) for x in v.tolist()] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(obj) -> dict:
    return {k: _attr_value(v) for k, v in obj.attrs.items()}


def _create(f, n: int, strategies: Sequence[str], k: int, hw: Tuple[int, int], compress: bool) -> dict:
    """Empty datasets for n rows; returns {name: dataset}."""
    h, w = hw
    s = _str_dtype()
    opts = dict(compression="lzf") if compress and n else {}
    chunk = dict(chunks=(1, h, w)) if n else {}
    ds = {
        "path": f.create_dataset("path", (n,), dtype=s),
        "label": f.create_dataset("label", (n,), dtype="i8"),
        "label_name": f.create_dataset("label_name", (n,), dtype=s),
        "image_size": f.create_dataset("image_size", (n, 2), dtype="i4"),
        "target": f.create_dataset("target", (n,), dtype="i8"),
        "topk_class": f.create_dataset("topk_class", (n, k), dtype="i8"),
        "topk_prob": f.create_dataset("topk_prob", (n, k), dtype="f4"),
        "segments": f.create_dataset("segments", (n, h, w), dtype="u2", **chunk, **opts),
    }
    g = f.create_group("attributions")
    for name in strategies:
        ds[f"attributions/{name}"] = g.create_dataset(name, (n, h, w), dtype="f4", **chunk, **opts)
    return ds


def _write_common(f, errors: Sequence[Tuple[str, str]], attrs: Mapping, run: Mapping,
                  model_classes: Sequence[str]) -> None:
    s = _str_dtype()
    _set_attrs(f, dict(format=FORMAT, format_version=FORMAT_VERSION))
    _set_attrs(f, attrs)
    _set_attrs(f.create_group(RUN_GROUP), run)
    f.create_dataset("model_classes", data=np.asarray(list(model_classes), dtype=object), dtype=s)
    g = f.create_group("errors")
    g.create_dataset("path", data=np.asarray([p for p, _ in errors], dtype=object), dtype=s)
    g.create_dataset("message", data=np.asarray([m for _, m in errors], dtype=object), dtype=s)


def _put(ds: dict, i: int, row: Row) -> None:
    ds["path"][i] = row.path
    ds["label"][i] = row.label
    ds["label_name"][i] = row.label_name
    ds["image_size"][i] = row.image_size
    ds["target"][i] = row.target
    ds["topk_class"][i] = row.topk_class
    ds["topk_prob"][i] = row.topk_prob
    seg = np.asarray(row.segments)
    if seg.size and (seg.min() < 0 or seg.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{row.path}: segment labels must lie in [0, 65535]")
    ds["segments"][i] = seg
    for name, a in row.attributions.items():
        ds[f"attributions/{name}"][i] = a


def _shape_of(rows: Sequence[Row], strategies: Sequence[str]) -> Tuple[int, Tuple[int, int]]:
    k, hw = 0, (0, 0)
    for r in rows:
        if set(r.attributions) != set(strategies):
            raise ValueError(f"{r.path}: attributions for {sorted(r.attributions)}, expected {list(strategies)}")
        shape = tuple(np.shape(r.segments))
        if hw != (0, 0) and (shape != hw or len(r.topk_class) != k):
            raise ValueError(f"{r.path}: map {shape} and top-k {len(r.topk_class)} differ from the other "
                             f"images' {hw} and {k} (every image of a file must have the same map size)")
        k, hw = len(r.topk_class), shape
    return k, hw


def write_file(path: str, rows: Sequence[Row], errors: Sequence[Tuple[str, str]] = (), *,
               strategies: Sequence[str], attrs: Mapping, run: Mapping = None,
               model_classes: Sequence[str] = (), compress: bool = True) -> None:
    """Write rows (sorted by path here) and errors atomically to ``path``."""
    rows = sorted(rows, key=lambda r: r.path)
    k, hw = _shape_of(rows, strategies)
    with atomic_h5(path) as f:
        _write_common(f, sorted(errors), attrs, run or {}, model_classes)
        ds = _create(f, len(rows), strategies, k, hw, compress)
        for i, r in enumerate(rows):
            _put(ds, i, r)


# ----------------------------------------------------------------------------- reading
def read_file(path: str) -> Contents:
    """A whole file in memory (fine for shard files and tests; use h5py directly for big files)."""
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        strategies = list(f["attributions"].keys())
        n = f["path"].shape[0]
        arrays = {name: f[name][:] for name in ROW_DATASETS}
        maps = {s: f[f"attributions/{s}"][:] for s in strategies}
        paths = f["path"].asstr()[:]
        names = f["label_name"].asstr()[:]
        rows = [Row(str(paths[i]), int(arrays["label"][i]), str(names[i]), tuple(int(v) for v in arrays["image_size"][i]),
                    int(arrays["target"][i]), arrays["topk_class"][i], arrays["topk_prob"][i], arrays["segments"][i],
                    {s: maps[s][i] for s in strategies}) for i in range(n)]
        errors = list(zip(f["errors/path"].asstr()[:].tolist(), f["errors/message"].asstr()[:].tolist()))
        return Contents(rows, errors, read_attrs(f), read_attrs(f[RUN_GROUP]),
                        f["model_classes"].asstr()[:].tolist())


def file_config(path: str) -> Optional[dict]:
    """The ``config_json`` of a file (None if it has none)."""
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        text = f.attrs.get("config_json")
    if text is None:
        return None
    return json.loads(text.decode() if isinstance(text, bytes) else text)


def done_paths(path: str) -> Tuple[List[str], List[str]]:
    """(explained image paths, errored image paths) of a file."""
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        return f["path"].asstr()[:].tolist(), f["errors/path"].asstr()[:].tolist()


# ----------------------------------------------------------------------------- merging
def merge(sources: Sequence[str], out: str, *, attrs: Mapping, run: Mapping, strategies: Sequence[str],
          model_classes: Sequence[str], progress: bool = False, block: int = 64) -> Tuple[int, int]:
    """Merge files of the same run into ``out`` (atomically), rows sorted by path, one row per path.

    Every source is sorted by path, so each is read front to back in slices while the output is
    written in blocks of ``block`` rows: memory stays at a few blocks, and only the sources whose
    rows span the current block are open. A path found in several sources (a run stopped between
    the merge and the clean-up) is kept once. Returns (rows, errors).
    """
    h5py = _h5py()
    where: Dict[str, Tuple[int, int]] = {}
    errors: Dict[str, str] = {}
    last: Dict[int, int] = {}
    k, hw = 0, (0, 0)
    for si, src in enumerate(sources):
        with h5py.File(src, "r") as f:
            if sorted(f["attributions"].keys()) != sorted(strategies):
                raise ValueError(f"{src}: strategies {sorted(f['attributions'].keys())} differ from "
                                 f"{sorted(strategies)}")
            for j, p in enumerate(f["path"].asstr()[:].tolist()):
                if p not in where:
                    where[p] = (si, j)
                    last[si] = j
            for p, m in zip(f["errors/path"].asstr()[:].tolist(), f["errors/message"].asstr()[:].tolist()):
                errors.setdefault(p, m)
            if f["path"].shape[0]:
                shape = (f["topk_class"].shape[1], tuple(f["segments"].shape[1:]))
                if hw != (0, 0) and shape != (k, hw):
                    raise ValueError(f"{src}: top-k and map size {shape} differ from {(k, hw)}")
                k, hw = shape
    for p in where:
        errors.pop(p, None)  # explained after all (an error once, readable on a later attempt)
    order = sorted(where)
    names = list(ROW_DATASETS) + [f"attributions/{s}" for s in strategies]
    readers: Dict[int, _Reader] = {}
    bar = progress_bar(len(order), "merge", "image", enabled=progress, leave=True)
    try:
        with atomic_h5(out) as f:
            _write_common(f, sorted(errors.items()), attrs, run, model_classes)
            ds = _create(f, len(order), strategies, k, hw, compress=True)
            for b in range(0, len(order), block):
                cols: Dict[str, list] = {name: [] for name in names}
                for p in order[b:b + block]:
                    si, j = where[p]
                    if si not in readers:
                        readers[si] = _Reader(sources[si], names, block)
                    row = readers[si].row(j)
                    for name in names:
                        cols[name].append(row[name])
                    if j == last[si]:
                        readers.pop(si).close()
                n = len(cols["path"])
                for name in names:
                    if name in ("path", "label_name"):
                        ds[name][b:b + n] = np.asarray(cols[name], dtype=object)
                    else:
                        ds[name][b:b + n] = np.stack(cols[name])
                bar.update(n)
    finally:
        for r in readers.values():
            r.close()
        bar.close()
    return len(order), len(errors)


class _Reader:
    """Rows of one source file, read front to back in slices."""

    def __init__(self, path: str, names: Sequence[str], step: int):
        self.f = _h5py().File(path, "r")
        self.ds = {n: (self.f[n].asstr() if n in ("path", "label_name") else self.f[n]) for n in names}
        self.step = step
        self.lo = self.hi = 0
        self.buf: Dict[str, np.ndarray] = {}

    def row(self, j: int) -> Dict[str, np.ndarray]:
        if not self.lo <= j < self.hi:
            self.lo, self.hi = j, j + self.step
            self.buf = {n: d[self.lo:self.hi] for n, d in self.ds.items()}
        return {n: b[j - self.lo] for n, b in self.buf.items()}

    def close(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------- user-facing
def read_h5(path: str) -> dict:
    """A whole explanations file as plain Python/numpy values (for tests and small files)::

        {"path": [...], "label": int64 array, ..., "attributions": {strategy: N x H x W},
         "errors": [(path, message)], "attrs": {...}, "run": {...}, "model_classes": [...]}
    """
    c = read_file(path)
    out = {"path": [r.path for r in c.rows], "label_name": [r.label_name for r in c.rows]}
    for name in ("label", "target"):
        out[name] = np.asarray([getattr(r, name) for r in c.rows], dtype=np.int64)
    out["image_size"] = np.asarray([r.image_size for r in c.rows], dtype=np.int32).reshape(-1, 2)
    for name in ("topk_class", "topk_prob", "segments"):
        out[name] = np.stack([getattr(r, name) for r in c.rows]) if c.rows else np.zeros((0,))
    strategies = list(c.rows[0].attributions) if c.rows else []
    out["attributions"] = {s: np.stack([r.attributions[s] for r in c.rows]) for s in strategies}
    out.update(errors=c.errors, attrs=c.attrs, run=c.run, model_classes=c.model_classes)
    return out


def versions() -> dict:
    """Library versions recorded in every file (and checked on resume)."""
    import torch

    from .. import __version__

    h5py = _h5py()
    return dict(masked_ops_version=__version__, torch_version=torch.__version__, h5py_version=h5py.__version__,
                numpy_version=np.__version__, python_version=sys.version.split()[0])


def write_h5(path: str, explanations: Iterable, *, image: str, top: Sequence[Tuple[int, str, float]],
             label: int = -1, label_name: str = "", image_size: Optional[Tuple[int, int]] = None,
             settings: Optional[Mapping] = None, model_classes: Sequence[str] = ()) -> None:
    """Save the explanations of ONE image (one ``Explanation`` per strategy, same target) in the
    folder schema above (N = 1), atomically: what ``masked-ops explain IMAGE --save FILE.h5`` writes.

    top: ``masked_ops.models.top_classes(logits, info, k)`` of the clean image; the target is that of
    the explanations (their first target). settings: extra root attributes (method, model, ...).
    """
    explanations = list(explanations)
    if not explanations:
        raise ValueError("write_h5: need at least one explanation")
    if not str(path).endswith((".h5", ".hdf5")):
        raise ValueError(f"write_h5: the file name must end in .h5 or .hdf5, got {path!r}")
    first = explanations[0]
    seg = first.segments.cpu().numpy()
    maps = {}
    for e in explanations:
        if e.targets[0] != first.targets[0]:
            raise ValueError(f"write_h5: explanations explain different classes ({first.targets[0]} and "
                             f"{e.targets[0]}); one file holds one target per image")
        maps[e.strategy] = e.heatmap(0).detach().float().cpu().numpy()
    size = tuple(image_size) if image_size is not None else tuple(seg.shape)
    row = Row(str(image), int(label), str(label_name), (int(size[0]), int(size[1])), int(first.targets[0]),
              np.asarray([t[0] for t in top], dtype=np.int64), np.asarray([t[2] for t in top], dtype=np.float32),
              seg, maps)
    attrs = dict(settings or {})
    attrs.setdefault("method", first.method)
    attrs.setdefault("masking", [e.strategy for e in explanations])
    attrs.update(versions())
    write_file(str(path), [row], strategies=list(maps), attrs=attrs, run=dict(world_size=1),
               model_classes=model_classes)
