"""Explain every image of a folder into one HDF5 file, on one process or many (torchrun).

    masked-ops explain DIR --method occlusion --masking layer,grey --out results.h5
    torchrun --nproc-per-node 2 -m masked_ops.cli explain DIR ... --out results.h5

Per image: read it (masked_ops.images.load_image), resize it for the model (``info.prepare``),
segment it, take the clean top-k, and explain the top-1 class under every strategy with the same
explainer the single-image command runs (masked_ops.explain.registry.METHODS). The forward batches are the
image's own perturbation samples, so an image's numbers do not depend on which other images share
its shard or checkpoint; with the same threads per process (default 1) a run on any number of
processes gives the same bits.

Work and files (``OUT.parts/`` beside the output; see masked_ops.dataset.h5 for the schema):

1. rank 0 checks the settings against ``OUT.parts/config.json`` (and an existing OUT), lists the
   folder, subtracts what finished files already hold and writes ``plan.json``;
2. every rank takes ``plan[rank::world]`` and writes a checkpoint file per ``--batch-images``
   images (atomically): a killed rank loses at most the batch it was on;
3. rank 0 waits for the others (shared counters, one progress bar with global counts), merges the
   existing OUT and every checkpoint file into a new OUT (written under a temporary name and
   renamed) and removes ``OUT.parts/``.

A run started again with the same settings skips every image already in OUT or in a checkpoint;
with other settings it refuses (``--fresh`` starts over). An image that cannot be read or explained
(corrupt file, unsupported mode, a one-segment image) goes to the errors table and the run goes on.
Across machines, OUT must be on a filesystem every rank sees (checked at the start).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import h5 as H
from .._util.io import check_writable, is_temp_of, read_json, write_json
from .._util.progress import note, progress_bar
from ..runs.config import canonical, check_config, differences
from ..runs.distributed import DEFAULT_THREADS, Dist, env_world, resolve_device, setup
from ..explain.registry import DEFAULT_MASKING, METHODS, get_method, names
from .folder import Folder, Item, label_indices, scan_folder

DEFAULT_BATCH_IMAGES = 8
DEFAULT_TOP_K = 5


@dataclasses.dataclass
class Settings:
    """What an explanation run computes (everything that changes the numbers).

    ``for_method`` fills in the method's defaults from the method table (masked_ops.explain.registry).
    """

    model: str = "efficientnet-lite0"
    method: str = "lime"
    masking: Sequence[str] = DEFAULT_MASKING
    samples: int = METHODS["lime"].default_samples
    segments: str = METHODS["lime"].default_segments
    n_segments: int = METHODS["lime"].default_n_segments
    seed: int = 0
    top_k: int = DEFAULT_TOP_K
    batch_size: Union[None, int, str] = None  # None / "auto": timed once per process and strategy (explain.batching)
    output: str = "prob"
    weights: Optional[str] = None
    incremental: bool = False  # occlusion: each removal's cone only, for the strategies that allow it

    @classmethod
    def for_method(cls, method: str, *, samples: Optional[int] = None, segments: Optional[str] = None,
                   n_segments: Optional[int] = None, **settings) -> "Settings":
        """Settings of ``method`` with its defaults for what is None (ValueError naming a bad value).

        Folder runs explain segments, so only the perturbation methods apply (the mask methods'
        maps are not per segment and their soft strategies are per image).
        """
        m = get_method(method)
        if m.kind != "perturbation":
            raise ValueError(f"method {method!r} cannot explain a folder (one of "
                             f"{', '.join(names('perturbation'))})")
        if settings.get("incremental") and "incremental" not in m.options:
            raise ValueError(f"incremental inference applies to occlusion only, not to method {method!r}")
        return cls(method=method, samples=m.check_samples(samples) if m.samples_keyword else 0,
                   segments=segments or m.default_segments, n_segments=n_segments or m.default_n_segments,
                   **settings)


class ImageExplainer:
    """One rank's model and strategies: ``explain(load(path), item, label) -> Row``."""

    def __init__(self, settings: Settings, device: torch.device):
        from .. import models as M
        from ..explain import get_strategy
        from ..explain.incremental import incremental_strategies
        from ..explain.perturb import resolve_batch_size

        if not isinstance(settings.top_k, int) or settings.top_k < 1:
            raise ValueError(f"--top-k must be an int >= 1, got {settings.top_k!r}")
        self.settings = settings
        self.device = device
        model, info = M.load_model(settings.model, settings.weights)
        model = model.to(device)
        if device.type == "cpu":  # as the single-image command: oneDNN runs depthwise convs faster so
            model = model.to(memory_format=torch.channels_last)
        self.model, self.info = model, info
        self.batch_size = resolve_batch_size(settings.batch_size, device)
        self.method = get_method(settings.method)
        self.strategies = [get_strategy(n, model, mean=info.mean, std=info.std, seed=settings.seed)
                           for n in settings.masking]
        self.incremental = set(incremental_strategies(self.strategies)) if settings.incremental else set()

    def config(self) -> dict:
        """Everything the numbers depend on: checked when a run is resumed, stored in the file."""
        from .._util.fingerprint import model_fingerprint

        s = self.settings
        # weights: what was asked for ("default": the model's usual); model_weights: what was loaded, in words
        cfg = dict(method=s.method, masking=list(s.masking), model=s.model,
                   weights="default" if s.weights is None else str(s.weights), model_weights=self.info.weights,
                   model_fingerprint=model_fingerprint(self.model), model_pretrained=bool(self.info.pretrained),
                   input_size=int(self.info.input_size), samples=int(s.samples), segments=s.segments,
                   n_segments=int(s.n_segments), seed=int(s.seed), top_k=int(s.top_k), output=s.output,
                   # None: timed like "auto" (the runner's models are eager), so one name for both
                   batch_size="auto" if self.batch_size in (None, "auto") else int(self.batch_size),
                   device_type=self.device.type,
                   # only when asked: files written before the option existed resume as they were
                   **({"incremental": sorted(self.incremental)} if self.incremental else {}),
                   threads_per_process=int(torch.get_num_threads()))
        cfg.update(H.versions())
        return cfg

    @staticmethod
    def load(path: str) -> torch.Tensor:
        """The image as 3 x H x W in [0, 1]; any failure to decode it is a ValueError (listed, not fatal)."""
        from ..images import load_image

        try:
            return load_image(path)
        except ValueError:
            raise
        except Exception as e:  # PIL raises SyntaxError, DecompressionBombError, ... on some files
            raise ValueError(f"image {path!r} cannot be read: {type(e).__name__}: {e}") from e

    @torch.inference_mode()
    def explain(self, image: torch.Tensor, item: Item, label: int) -> H.Row:
        """Explain one loaded image (raises ValueError when it cannot be explained, e.g. one segment)."""
        from .. import models as M
        from ..explain.segmentation import segment

        s = self.settings
        size = (int(image.shape[-2]), int(image.shape[-1]))
        x = self.info.prepare(image).to(self.device)[0]
        seg = segment(x.cpu(), s.segments, n_segments=s.n_segments, seed=s.seed)
        first = self.strategies[0]
        logits = first.model(first.normalise(x[None]))[0]
        top = M.top_classes(logits, self.info, k=s.top_k)
        target = top[0][0]
        opts = dict(targets=[target], segments=seg, batch_size=self.batch_size, seed=s.seed, progress=False,
                    output=s.output)
        if self.method.samples_keyword is not None:
            opts = self.method.keywords(s.samples, **opts)
        maps = {}
        for strat in self.strategies:
            if hasattr(strat, "generator"):  # the noise fill: the same stream for every image, whatever
                strat.generator = None       # images this rank explained before (shard-independent)
            exp = self.method.explain(strat, x, **opts, **({"incremental": True} if strat.name in self.incremental
                                                           else {}))
            maps[strat.name] = exp.heatmap(0).float().cpu().numpy()
        return H.Row(item.path, int(label), item.label_name, size, int(target),
                     np.asarray([t[0] for t in top], dtype=np.int64),
                     np.asarray([t[2] for t in top], dtype=np.float32), seg.numpy(), maps)


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Summary:
    out: str
    images: int          # rows in the output
    errors: int          # rows of the errors table
    computed: int        # images this invocation explained or failed on (all ranks)
    skipped: int         # images already finished by an earlier run
    seconds: float


def _parts_dir(out: str) -> str:
    return os.path.abspath(out) + ".parts"


def _batch_files(parts: str) -> List[str]:
    if not os.path.isdir(parts):
        return []
    return sorted(os.path.join(parts, f) for f in os.listdir(parts)
                  if f.startswith("r") and f.endswith(".h5"))


def _prepare(folder: Folder, out: str, config: dict, fresh: bool, token: str) -> Tuple[dict, bool]:
    """Rank 0: check and set up OUT.parts, find what is done, write the plan. Returns (plan, reuse OUT)."""
    parts = _parts_dir(out)
    if fresh:  # start over: a fresh run killed before its merge then resumes without --fresh
        if os.path.isdir(parts):
            shutil.rmtree(parts)
        if os.path.isfile(out):
            os.unlink(out)
    os.makedirs(parts, exist_ok=True)
    cfg_path = os.path.join(parts, "config.json")
    if os.path.exists(cfg_path):
        check_config(read_json(cfg_path), config, f"{parts} holds checkpoints of a run",
                     "use another --out or --fresh to discard them")
    reuse_out = False
    if os.path.exists(out):
        try:
            existing = H.file_config(out)
        except OSError as e:
            raise ValueError(f"--out {out!r} exists and is not a readable HDF5 file ({e}); remove it, use "
                             f"another --out, or --fresh to replace it") from None
        if existing != config:
            what = "no masked_ops settings" if existing is None else \
                f"other settings (differs in: {differences(existing, config)})"
            raise ValueError(f"--out {out!r} exists with {what}; use another --out or --fresh to replace it")
        reuse_out = True
    for name in os.listdir(parts):  # temporary files of a killed run
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(parts, name))
    folder_out, name_out = os.path.split(os.path.abspath(out))
    for name in os.listdir(folder_out):  # a merge that was killed
        if is_temp_of(name, name_out):
            os.unlink(os.path.join(folder_out, name))
    write_json(cfg_path, config)

    done = set()
    sources = ([out] if reuse_out else []) + _batch_files(parts)
    for src in sources:
        try:
            paths, errors = H.done_paths(src)
        except Exception as e:  # a checkpoint damaged by a crash of the machine: redo its images
            print(f"masked-ops: warning: ignoring the unreadable checkpoint {src} ({e}); its images are "
                  f"explained again", file=sys.stderr)
            os.unlink(src)
            continue
        done.update(paths)
        done.update(errors)
    todo = [[it.path, it.label_name] for it in folder.items if it.path not in done]
    plan = dict(token=token, todo=todo, total=len(folder.items), done=len(folder.items) - len(todo),
                classes=folder.classes)
    write_json(os.path.join(parts, "plan.json"), plan)
    return plan, reuse_out


def _read_plan(out: str, token: str) -> dict:
    path = os.path.join(_parts_dir(out), "plan.json")
    if not os.path.exists(path):
        raise ValueError(f"{path} (written by rank 0) is not visible here: --out must be on a filesystem "
                         f"that every rank shares (across machines: a network filesystem)")
    plan = read_json(path)
    if token and plan.get("token") != token:
        raise ValueError(f"{path} belongs to another run: --out must be on a filesystem that every rank "
                         f"shares (across machines: a network filesystem)")
    return plan


def _share_token(dist: Dist) -> str:
    """A token rank 0 draws and every rank learns through the store (checks the shared filesystem)."""
    if not dist.distributed or dist.store is None:
        return uuid.uuid4().hex if dist.is_main else ""
    key = dist._key("plan-token")
    if dist.is_main:
        token = uuid.uuid4().hex
        dist.store.set(key, token)
        return token
    return dist.store.get(key).decode()


def _batch_name(rank: int, first_path: str) -> str:
    # unique: a batch's first image was not finished before, so no earlier checkpoint starts with it
    return f"r{rank:05d}-{hashlib.sha1(first_path.encode('utf-8')).hexdigest()[:16]}.h5"


def explain_folder(folder: str, out: str, settings: Settings, *, device: str = "cpu",
                   batch_images: int = DEFAULT_BATCH_IMAGES, threads: Optional[int] = None, fresh: bool = False,
                   keep_parts: bool = False, progress: bool = True, dist_backend: str = "auto",
                   verbose: bool = True) -> Optional[Summary]:
    """Explain every image under ``folder`` into the HDF5 file ``out`` (see the module docstring).

    Call it on every rank under torchrun (it joins the process group itself); returns the Summary
    on rank 0 and None on the other ranks.
    """
    start = time.time()
    if not isinstance(batch_images, int) or batch_images < 1:
        raise ValueError(f"--batch-images must be an int >= 1, got {batch_images!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be an int >= 1, got {threads!r}")
    _check_out(out)
    _, world, local = env_world()
    dev = resolve_device(device, local, world)
    torch.set_num_threads(threads or DEFAULT_THREADS)
    listing = scan_folder(folder)
    dist = setup(dev, dist_backend)
    try:
        return _run(listing, out, settings, dev, dist, batch_images, fresh, keep_parts, progress, verbose, start)
    finally:
        dist.close()


def _run(listing: Folder, out: str, settings: Settings, dev: torch.device, dist: Dist, batch_images: int,
         fresh: bool, keep_parts: bool, progress: bool, verbose: bool, start: float) -> Optional[Summary]:
    explainer = ImageExplainer(settings, dev)
    config = canonical(explainer.config())
    token = _share_token(dist)
    reuse_out = False
    if dist.is_main:
        plan, reuse_out = _prepare(listing, out, config, fresh, token)
    dist.sync("plan")
    if not dist.is_main:
        plan = _read_plan(out, token)
    labels = label_indices(listing, explainer.info.class_names)
    if dist.is_main and verbose:
        _announce(listing, labels, plan, explainer, dist)

    bar = progress_bar(plan["total"], "explain", "image", initial=plan["done"], leave=True,
                       enabled=progress and dist.is_main)
    parts = _parts_dir(out)

    def refresh():
        # redraw only when the global count moved: rank 0 polls the store while it waits for the others,
        # and every redraw of an unchanged count would print the same final line again in a log
        n = plan["done"] + dist.count("images")
        if n != bar.n:
            bar.n = n
            bar.refresh()

    shard = plan["todo"][dist.rank::dist.world]
    for b in range(0, len(shard), batch_images):
        rows, errors = [], []
        for path, label_name in shard[b:b + batch_images]:
            item = Item(path, label_name)
            try:
                image = explainer.load(listing.full_path(item))
                rows.append(explainer.explain(image, item, labels.get(label_name, -1)))
            except ValueError as e:  # unreadable or unexplainable image: listed, the run goes on
                errors.append((path, str(e)))
                note(f"masked-ops: warning: {path}: {e}", bar, bar_elsewhere=progress and not dist.is_main)
            dist.add("images", 1)
            refresh()
        H.write_file(os.path.join(parts, _batch_name(dist.rank, shard[b][0])), rows, errors,
                     strategies=list(settings.masking), attrs=config, model_classes=())
    dist.all_done(on_poll=refresh)  # (refreshes once more after the last rank finished)
    bar.close()
    if not dist.is_main:
        return None

    sources = ([out] if reuse_out else []) + _batch_files(parts)
    attrs = dict(config, config_json=json.dumps(config, sort_keys=True), folder=os.path.abspath(listing.root),
                 classes=listing.classes or [])
    run = dict(world_size=dist.world, created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               images_computed=len(plan["todo"]))
    if plan["todo"] or not reuse_out or len(sources) > 1:
        n, e = H.merge(sources, out, attrs=attrs, run=run, strategies=list(settings.masking),
                       model_classes=list(explainer.info.class_names), progress=progress and len(plan["todo"]) > 500)
    else:  # nothing new: the existing output stays as it is
        paths, errs = H.done_paths(out)
        n, e = len(paths), len(errs)
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    summary = Summary(out, n, e, len(plan["todo"]), plan["done"], time.time() - start)
    if verbose:
        print(f"{os.path.abspath(out)}: {n} images explained, {e} unreadable (listed in /errors); this run "
              f"processed {summary.computed}, {summary.skipped} were finished before; {summary.seconds:.1f} s")
    return summary


def _announce(listing: Folder, labels: Dict[str, int], plan: dict, explainer: ImageExplainer, dist: Dist) -> None:
    info = explainer.info
    s = explainer.settings
    print(f"{listing.root}: {plan['total']} images, {plan['done']} finished before, {len(plan['todo'])} to do; "
          f"{s.method} with {', '.join(s.masking)} masking on {info.name}"
          f"{'' if info.pretrained else ' (RANDOM weights)'}; {dist.world} process(es) x "
          f"{torch.get_num_threads()} thread(s)"
          + (f", backend {dist.backend}" if dist.backend else ""))
    if listing.classes is not None:
        unknown = [c for c, i in labels.items() if i < 0]
        print(f"labels: {len(listing.classes)} class folders"
              + (f"; {len(unknown)} do not name a class of the model (label -1): {', '.join(unknown[:5])}"
                 + (" ..." if len(unknown) > 5 else "") if unknown else ", all name classes of the model"))


def default_out(folder: str, method: str) -> str:
    """The output file when none is given: <folder name>-<method>.h5 in the current folder."""
    stem = os.path.basename(os.path.normpath(folder)) or "images"
    return f"{stem}-{method}.h5"


def _check_out(out: str) -> None:
    if not isinstance(out, str):
        raise ValueError(f"--out must name an HDF5 file (.h5 or .hdf5) when IMAGE is a folder, got {out!r}")
    check_writable(out, "--out", "results.h5")
    if not out.endswith((".h5", ".hdf5")):
        raise ValueError(f"--out must name an HDF5 file (.h5 or .hdf5) when IMAGE is a folder, got {out!r}")
