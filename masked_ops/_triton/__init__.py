"""Triton kernels of masked_ops (a private subpackage: ``masked_ops._triton``).

They live inside the package folder so that no build step remaps names: a top-level
``triton_kernels`` would clash with a package the Triton project publishes, and a remapped
subpackage of an editable install can silently come from another checkout.

One module per op; each exposes a launcher taking the same arguments as the matching primitive
of masked_ops/backends/reference.py plus ``wrap`` (``torch.library.wrap_triton`` when called from
a registered op, identity otherwise). masked_ops/backends/triton.py registers them as ops.
"""
