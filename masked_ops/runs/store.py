"""Resumable experiment runs: one checkpoint file per unit of work.

An experiment splits its work into independent *units* (e.g. one image under one masking
strategy). ``Run.map`` computes the units that have no checkpoint yet, saves each one as
soon as it is done (atomically: temp file then rename), and loads the others from disk, so
a run that is interrupted and started again with the same configuration carries on where
it stopped instead of starting over.

Layout under ``out_dir/<experiment>/``::

    config.json       the configuration the units were computed with (checked on resume)
    units/<key>.npz   one file per finished unit (numpy arrays)
    results.json      the aggregated numbers, written by the experiment at the end

A run started again with a *different* configuration refuses to mix results: it raises
and names the keys that differ (use another out dir, or ``fresh=True`` to discard them).
With ``out_dir=None`` nothing is written: units live in memory for one call.

Under torchrun (masked_ops.runs.distributed.join() called first, as ``masked-ops experiment``
does) the units are sharded: rank r computes ``keys[r::world]``, every rank waits for the others
(through the rendezvous store) and then loads all units from ``out_dir``, which must be on a
filesystem every rank sees; rank 0 alone writes config.json and results.json. Each unit is computed
the same way whichever rank computes it, so the results do not depend on the number of processes
(at the same threads per process).
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional

import numpy as np

from .._util.io import atomic_write, read_json, write_json
from .._util.progress import progress_bar
from .config import canonical, check_config
from .distributed import Dist, active

_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")
_RUNS = itertools.count()


class Run:
    """Checkpoint store of one experiment run (see the module docstring)."""

    def __init__(self, out_dir, experiment: str, config: Mapping, *, fresh: bool = False,
                 progress: bool = True, dist=None):
        self.experiment = experiment
        self.config = canonical(config)
        self.progress = progress
        self.computed = 0  # units computed (not loaded) by this process: what tests count
        self.computed_all = 0  # ... by all ranks
        self._maps = 0
        self._tag = f"{experiment}.{next(_RUNS)}"  # the ranks build their Runs in the same order
        self._memory: Optional[Dict[str, Dict[str, np.ndarray]]] = None
        # units in memory cannot be shared between processes: every rank then computes everything
        self.dist = (dist if dist is not None else active()) if out_dir is not None else Dist()
        if out_dir is None:
            self.dir = self.units_dir = None
            self._memory = {}
            return
        self.dir = Path(out_dir) / experiment
        self.units_dir = self.dir / "units"
        if not self.dist.is_main:  # rank 0 sets the folder up; the others wait and check they see it
            self.dist.sync(f"{self._tag}/init")
            if not (self.dir / "config.json").exists():
                raise ValueError(f"{self.dir / 'config.json'} (written by rank 0) is not visible here: --out "
                                 f"must be on a filesystem that every rank shares")
            return
        self._setup(fresh)
        self.dist.sync(f"{self._tag}/init")

    def _setup(self, fresh: bool) -> None:
        experiment = self.experiment
        if fresh and self.units_dir.exists():
            shutil.rmtree(self.units_dir)
        cfg_path = self.dir / "config.json"
        if cfg_path.exists() and not fresh:
            check_config(read_json(cfg_path), self.config, f"{self.dir} holds a run of {experiment!r}",
                         "use another --out directory or --fresh to discard it")
        self.units_dir.mkdir(parents=True, exist_ok=True)
        write_json(cfg_path, self.config)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"unit key must match {_KEY.pattern}, got {key!r}")
        return self.units_dir / f"{key}.npz"

    def done(self, key: str) -> bool:
        if self._memory is not None:
            return key in self._memory
        return self._path(key).exists()

    def load(self, key: str) -> Dict[str, np.ndarray]:
        if self._memory is not None:
            return self._memory[key]
        with np.load(self._path(key), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        if self._memory is not None:
            self._memory[key] = {k: np.asarray(v) for k, v in arrays.items()}
            return
        with atomic_write(self._path(key)) as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})

    def map(self, keys: Iterable[str], compute: Callable[[str], Mapping[str, np.ndarray]],
            desc: Optional[str] = None) -> Dict[str, Dict[str, np.ndarray]]:
        """{key: arrays} for every key: loaded if checkpointed, else computed, saved, returned."""
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise ValueError("unit keys must be unique")
        for k in keys:
            if not _KEY.match(k):
                raise ValueError(f"unit key must match {_KEY.pattern}, got {k!r}")
        todo = [k for k in keys if not self.done(k)]
        dist, tag = self.dist, f"{self._tag}/map{self._maps}"
        self._maps += 1
        # shard ALL keys (not the ones this rank sees undone: another rank may be saving already)
        mine = todo if not dist.distributed else [k for k in keys[dist.rank::dist.world] if not self.done(k)]
        initial = len(keys) - len(todo)
        bar = progress_bar(len(keys), desc or self.experiment, "unit", initial=initial, leave=True,
                           enabled=self.progress and dist.is_main)
        try:
            for key in mine:
                self.save(key, compute(key))
                self.computed += 1
                if dist.distributed:
                    bar.update(dist.add(tag, 1) + initial - bar.n)  # the global count
                else:
                    bar.update(1)
            if dist.distributed:
                dist.sync(tag)
                self.computed_all += dist.count(tag)
                bar.update(dist.count(tag) + initial - bar.n)
            else:
                self.computed_all = self.computed
        finally:
            bar.close()
        return {k: self.load(k) for k in keys}

    def finish(self, results: dict, config: Mapping, image_names=None, **extra) -> dict:
        """Stamp an experiment's results with its config, images and work done; write and return them."""
        results["config"] = config
        results["image_names"] = list(image_names) if image_names is not None else None
        results.update(extra)
        results["units_computed"] = self.computed_all
        self.write_results(results)
        return results

    def write_results(self, results: Mapping) -> Optional[Path]:
        if self.dir is None or not self.dist.is_main:
            return None
        path = self.dir / "results.json"
        write_json(path, results)
        return path


def annotate_results(out_dir, experiment: str, **fields) -> Optional[Path]:
    """Add ``fields`` to OUT/<experiment>/results.json (e.g. the model's name and weights, which the
    experiment functions, given only an nn.Module, cannot know); None when there is no such file."""
    if out_dir is None:
        return None
    path = Path(out_dir) / experiment / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    results.update(fields)
    write_json(path, results)
    return path
