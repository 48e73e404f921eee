"""The tiny random-weight vision transformers of the ViT tests (32 px, patches of 8: 16 patch tokens)."""
import torch
import torch.nn as nn


def tiny_vit(kind="timm", *, size=32, patch=8, seed=0, dtype=torch.float32, head_std=None, **options):
    """timm's VisionTransformer (``options``: its own, e.g. reg_tokens=2, class_token=False,
    global_pool="avg") or torchvision's (kind="torchvision"), depth 2, width 32, 10 classes, in eval mode.

    The initialisations near 0 are spread so that the tests can see them: torchvision's zero head (std
    ``head_std``, default 0.3), timm's class and register tokens (std 0.5) and, with ``head_std``, timm's head.
    """
    torch.manual_seed(seed)
    if kind == "torchvision":
        import torchvision

        model = torchvision.models.VisionTransformer(image_size=size, patch_size=patch, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10, **options)
        nn.init.normal_(model.heads.head.weight, std=0.3 if head_std is None else head_std)
    else:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                                  **options)
        for p in (model.cls_token, model.reg_token):
            if p is not None:
                nn.init.normal_(p, std=0.5)
        if head_std is not None:
            nn.init.normal_(model.head.weight, std=head_std)
    return model.eval().to(dtype)
