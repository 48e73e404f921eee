"""Triton kernels of masked_ops, installed as ``masked_ops.triton_kernels`` (never as a top-level
``triton_kernels``, which is a different package the Triton project publishes).

One module per op; each exposes a launcher taking the same arguments as the matching primitive
of masked_ops/backends/reference.py plus ``wrap`` (``torch.library.wrap_triton`` when called from
a registered op, identity otherwise). masked_ops/backends/triton.py registers them as ops.
"""
