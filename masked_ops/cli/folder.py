"""``masked-ops explain DIR``: the folder options and the hand-over to masked_ops.dataset.explain.

``masked-ops explain`` adds this argument group; when IMAGE is a folder, ``run_folder`` turns the
arguments into ``Settings`` (the method table's defaults, as for one image) and runs ``explain_folder``
(also under ``torchrun --nproc-per-node G -m masked_ops.cli explain DIR ...``).
"""
from __future__ import annotations

from .common import CliError, positive_int

# what a folder run does not take, and why
_NOT_FOR_FOLDERS = (("target", "--target", "each image explains its own top-1 class"),
                    ("window", "--window", "occlusion of a folder removes segments"),
                    ("save", "--save", "--out names the HDF5 file of a folder"),
                    ("shared_scale", "--shared-scale", "a folder run writes no pictures"))


def add_arguments(parser) -> None:
    """One argument group, used when IMAGE is a folder (and ignored for a single image)."""
    from ..dataset.explain import DEFAULT_BATCH_IMAGES, DEFAULT_TOP_K
    from ..runs.distributed import BACKENDS

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


def settings_from_args(args):
    """Settings from the ``explain`` arguments, with the method table's defaults (as for one image)."""
    from ..dataset.explain import Settings
    from .explain import check_method_options, masking_of

    method = check_method_options(args)
    for dest, flag, why in _NOT_FOR_FOLDERS:
        if getattr(args, dest, None) not in (None, False):
            raise CliError(f"{flag} does not apply to a folder ({why})")
    try:
        if method.samples_keyword is not None:
            method.check_samples(args.samples, "--samples")
        return Settings.for_method(args.method, samples=args.samples, segments=args.segments,
                                   n_segments=args.n_segments, model=args.model,
                                   masking=masking_of(args, method), seed=args.seed, top_k=args.top_k,
                                   batch_size=args.batch_size, output=args.output or "prob", weights=args.weights,
                                   incremental=bool(getattr(args, "incremental", None)))
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None


def run_folder(args) -> int:
    """``masked-ops explain DIR ...``: the hand-over when IMAGE is a directory."""
    from ..dataset.explain import default_out, explain_folder

    settings = settings_from_args(args)
    out = args.out or default_out(args.image, settings.method)
    args.resume_hint = (f"the finished images are kept in {out}.parts/: run the same command again to resume "
                        f"(--fresh starts over)")
    explain_folder(args.image, out, settings, device=args.device, batch_images=args.batch_images,
                   threads=args.threads, fresh=args.fresh, keep_parts=args.keep_parts,
                   progress=not args.no_progress, dist_backend=args.dist_backend)
    return 0
