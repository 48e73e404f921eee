"""Explanations at dataset scale: a whole image folder into one HDF5 file, on torchrun (issue 15).

- ``folder``: the sorted image list of a folder and its ImageFolder labels;
- ``h5``: the HDF5 schema, atomic writes, the merge of shard files, ``write_h5`` for one image;
- ``distributed``: rank, device and shared counters under torchrun (gloo on CPU, NCCL on GPU);
- ``explain``: the per-image loop, checkpoints, resume and the merge (``explain_folder``);
- ``cli``: the folder options of ``masked-ops explain``.

Imports are lazy: ``from masked_ops.dataset.explain import explain_folder``.
"""
