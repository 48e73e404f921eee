"""masked_ops: layer masking for CNNs as fast, tested PyTorch ops.

    import masked_ops as mo
    lm = mo.layer_mask(model, mode="fill")   # nn.Module; the original model is untouched
    logits = lm(x, mask)                     # mask: N x 1 x H x W, 1 = visible
"""
from .backends import available, get_backend, set_backend
from .modes import MODES, fill_iters
from .ops import (
    masked_affine_act,
    masked_avg_pool2d,
    masked_batch_norm_act,
    masked_conv2d,
    masked_max_pool2d,
    masked_mean,
    neighbor_fill,
)

from ._util.malloc import keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "available", "get_backend", "set_backend", "MODES", "fill_iters",
    "masked_affine_act", "masked_avg_pool2d", "masked_batch_norm_act", "masked_conv2d",
    "masked_max_pool2d", "masked_mean", "neighbor_fill", "layer_mask", "register_rule", "keep_freed_memory",
]


def __getattr__(name):
    # layer_mask pulls in torch.fx machinery; import it on first use.
    if name in ("layer_mask", "register_rule"):
        from . import convert

        return getattr(convert, name)
    if name == "vit":  # mo.vit.token_mask: the ViT-only options (token dropping)
        import importlib

        return importlib.import_module(".vit", __name__)
    raise AttributeError(f"module 'masked_ops' has no attribute {name!r}")
