"""Resumable runs: checkpoints, the configuration a run is tied to, and the process group under torchrun.

- ``store``: ``Run``, one checkpoint file per unit of work (the experiments), and the results file;
- ``config``: the run's configuration as canonical JSON and the check that refuses to mix runs;
- ``distributed``: rank, world, device, shared counters and waiting under torchrun (gloo / NCCL).

The dataset runner (masked_ops.dataset.explain) and the experiments both build on it; it imports
nothing above _util.
"""
