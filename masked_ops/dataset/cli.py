"""The folder options of ``masked-ops explain`` (light: no torch import while the parser is built).

masked_ops/cli.py adds this argument group to ``explain`` and hands a folder IMAGE over to
``masked_ops.dataset.explain.run_folder``.
"""
from __future__ import annotations

from ..cli import positive_int

DEFAULT_BATCH_IMAGES = 8
DEFAULT_TOP_K = 5
BACKENDS = ("auto", "gloo", "nccl")


def add_arguments(parser) -> None:
    """One argument group, used when IMAGE is a folder (and ignored for a single image)."""
    g = parser.add_argument_group(
        "when IMAGE is a folder",
        "every image under it (DIR/<class>/<image> gives labels) into one HDF5 file (--out results.h5, "
        "default DIR-METHOD.h5), resumable, 1 torch thread per process unless --threads; also as "
        "`torchrun --nproc-per-node G -m masked_ops.cli explain DIR ...`")
    g.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K,
                   help=f"clean top-k classes stored per image (default {DEFAULT_TOP_K})")
    g.add_argument("--batch-images", type=positive_int, default=DEFAULT_BATCH_IMAGES,
                   help=f"images per checkpoint file; a killed rank loses at most one (default {DEFAULT_BATCH_IMAGES})")
    g.add_argument("--fresh", action="store_true", help="delete the checkpoints and an existing --out first, start over")
    g.add_argument("--keep-parts", action="store_true", help="keep the checkpoint files (OUT.parts/) after the merge")
    g.add_argument("--dist-backend", choices=BACKENDS, default="auto",
                   help="torch.distributed backend under torchrun (default: nccl with --device cuda, else gloo)")
