"""Helpers every layer of the application may use (they import nothing else of masked_ops).

- ``io``: atomic files (temporary file, fsync, rename; ordinary permissions), JSON, writable-path checks;
- ``progress``: the one progress-bar policy (tqdm when installed, silent otherwise) and lines above a bar;
- ``fingerprint``: short content hashes of tensors and models (which model and data a result belongs to).
"""
