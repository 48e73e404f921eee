"""torch.distributed for resumable runs (dataset and experiments): who am I, which device, shared counters and waiting.

``torchrun --nnodes M --nproc-per-node G -m masked_ops.cli ...`` starts M x G processes and gives
each RANK, WORLD_SIZE and LOCAL_RANK; ``setup()`` reads them and joins the process group: gloo for
CPU runs, NCCL for CUDA runs (one GPU per rank, ``cuda:LOCAL_RANK``). Without torchrun (no
WORLD_SIZE, or WORLD_SIZE=1) nothing is initialised and the run is a world of one.

The ranks share little: rank 0 writes the plan (which images are still to do) and every rank
reads it after one barrier; then each rank works alone on ``plan[rank::world]``. The barriers and
the progress counts go through the rendezvous store torchrun already runs (``store.add``): rank 0
shows one bar with global counts while the ranks run at their own pace, and waits for the others
by polling the store (no barrier timeout, however long the slowest shard takes). No collective of
the backend is needed, so gloo / NCCL only have to initialise (a plain ``dist.barrier()`` is the
fallback where the store is not reachable).

``join()`` / ``active()`` / ``leave()``: one process group for a whole process, used by the
experiments (masked_ops.runs.store.Run shards its units over ``active()``).

Threads: ``DEFAULT_THREADS = 1`` torch thread per process, in every run, with or without
torchrun. Results are then bit-identical whatever the number of processes (a CPU kernel's
reduction order can depend on its thread count); scale with processes, or pass ``--threads``.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import time
from typing import Callable, Optional

import torch

# --dist-backend: auto = nccl for CUDA devices, gloo otherwise
BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_THREADS = 1
_PREFIX = "masked_ops"
_SETUPS = itertools.count()


@dataclasses.dataclass
class Dist:
    """This process's place in the run (a world of one without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    store: object = None  # the c10d store of the default process group (None in a world of one)
    namespace: str = "0"  # keys of one setup() (a process may run several jobs on one torchrun store)
    _local: dict = dataclasses.field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _key(self, name: str) -> str:
        # torchrun restarts workers (--max-restarts) inside the same store: one namespace per attempt
        return f"{_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{self.namespace}/{name}"

    def add(self, name: str, amount: int = 1) -> int:
        """Add to a counter shared by all ranks; returns its new global value."""
        if self.store is None:
            self._local[name] = self._local.get(name, 0) + int(amount)
            return self._local[name]
        return int(self.store.add(self._key(name), int(amount)))

    def count(self, name: str) -> int:
        return self.add(name, 0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sync(self, name: str, interval: float = 0.05) -> None:
        """Every rank waits until all have called ``sync(name)`` (a barrier through the store, so no
        backend collective and no timeout however long the wait)."""
        if not self.distributed:
            return
        if self.store is None:
            self.barrier()
            return
        self.add(f"sync/{name}", 1)
        while self.count(f"sync/{name}") < self.world:
            time.sleep(interval)

    def all_done(self, on_poll: Optional[Callable[[], None]] = None, interval: float = 0.2) -> None:
        """Called once by every rank when its shard is finished. Rank 0 returns when all ranks are
        done (calling ``on_poll`` meanwhile, e.g. to refresh the progress bar); the others return at
        once. Without a store it is a plain barrier."""
        if not self.distributed:
            return
        if self.store is None:
            self.barrier()
            return
        self.add("finished", 1)
        if not self.is_main:
            return
        while self.count("finished") < self.world:
            if on_poll is not None:
                on_poll()
            time.sleep(interval)
        if on_poll is not None:
            on_poll()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def env_world() -> tuple:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    def read(name, default):
        text = os.environ.get(name)
        if text is None or text == "":
            return default
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of the run")
    return rank, world, local


def resolve_device(device: str, local_rank: int, world: int) -> torch.device:
    """The device of this rank: ``cuda`` means ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif world > 1:
            raise ValueError(f"--device {device}: under torchrun give --device cuda; rank r then takes "
                             f"cuda:LOCAL_RANK (one GPU per rank)")
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {dev}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    return dev


def setup(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the process group when started by torchrun (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    rank, world, local = env_world()
    if world == 1:
        return Dist(rank, world, local)
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("--dist-backend nccl needs --device cuda (use gloo on CPU)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = dict(device_id=device) if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    store = None
    try:  # private but present since torch 1.8; without it progress falls back to a final barrier
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
    except Exception:
        store = None
    # every rank calls setup() the same number of times, so the n-th call has the same keys everywhere
    return Dist(dist.get_rank(), dist.get_world_size(), local, backend, store, namespace=str(next(_SETUPS)))


_ACTIVE: Optional[Dist] = None


def join(device: Optional[torch.device] = None, backend: str = "auto") -> Dist:
    """Join the process group once for the whole process (the experiments' ``Run`` then shards its
    units over the ranks); a world of one without torchrun."""
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = setup(device or torch.device("cpu"), backend)
    return _ACTIVE


def active() -> Dist:
    """The Dist joined by ``join`` (a world of one if none was)."""
    return _ACTIVE if _ACTIVE is not None else Dist()


def leave() -> None:
    """Leave the process group joined by ``join`` (nothing to do in a world of one)."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.close()
        _ACTIVE = None
