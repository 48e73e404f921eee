"""Layer masking of vision transformers by token dropping (issue 26).

    import masked_ops as mo, timm
    tm = mo.layer_mask(timm.create_model("vit_small_patch16_224").eval())   # a TokenMasked
    logits = tm(x, mask)        # mask N x 1 x H x W, 1 = visible; or tm(x_with_nans)
    tm = mo.vit.token_mask(vit, patch_keep="any", drop="attention")         # the ViT-only options

What a CNN gets from layer masking (every layer reads only visible activations) a transformer gets by
dropping tokens, as in the layer-masking paper's ViT experiments (Balasubramanian & Feizi, ICCV 2023):

1. the pixel mask becomes one keep per patch (``patch_keep``, below);
2. the image, selected to 0 at removed pixels (``masks.select_visible``), is embedded and the position
   embeddings are added to every token *before* any is dropped, so a kept token keeps its position;
3. the removed patch tokens are dropped: no later token attends to them (they are never keys) and the
   average pool ('avg') averages the kept tokens only. The class token and the register tokens are
   always kept. ``drop="gather"`` builds shorter sequences of the kept tokens (per sample, in their
   original order, padded to the batch's largest count with padding keys masked out: a batch of
   equal counts, occlusion's case, runs with no mask at all); ``drop="attention"`` keeps the full
   sequence and masks the removed keys out of every attention (-inf logits). They compute the same
   function (tested to 1e-10 in float64); "gather" is the default because it is faster: with half the
   patches removed (ViT-S/16 and ViT-B/16, 224 px, batch 8, CPU, eager, one thread) it takes 0.47-0.53x
   the plain forward's time, "attention" 0.98-1.03x (bench/bench_vit.py,
   bench/results/cpu-vit-2026-12-07.json). The gather path's sequence length depends on the mask's
   values, so under ``torch.compile`` and ``torch.export`` the wrapper runs the attention path (static
   shapes, no graph break; the same function).

Invariants (tests/test_vit.py): an all-ones mask reproduces the model; NaN or inf at removed pixels
never reach an output or a gradient (the input is selected, never multiplied, and a dropped token's
attention weight and pool weight are selected to exactly 0); a sample whose every token is removed (a
model without prefix tokens) gets the pooled feature 0, as ``masked_mean`` gives a CNN.

Supported: timm's ``VisionTransformer`` itself (ViT, DeiT, with or without a class token, with register
tokens, global_pool 'token' or 'avg', pool_include_prefix, no_embed_class, pos_embed none, dynamic image
size: everything up to the dropping runs the model's own modules and ``_pos_embed``) whose blocks are
timm ``Block``s with timm ``Attention``; torchvision's ``VisionTransformer`` with its patchifying conv.
Everything else that would change the forward (a subclass such as the distilled DeiT, other block or
attention types, attention pooling, a hybrid or conv-stem patch embedding, patch dropout, padding of
odd image sizes) is refused with an error naming it: never a silently different model.
"""
from __future__ import annotations

import fractions
import inspect
import math
import sys
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from . import _checks as C
from . import masks as M

__all__ = ["TokenMasked", "token_mask", "is_vision_transformer", "patch_keeps", "PATCH_KEEPS", "DROPS",
           "DEFAULT_PATCH_KEEP", "DEFAULT_DROP"]

PATCH_KEEPS = ("all", "any")
DEFAULT_PATCH_KEEP = "all"
DROPS = ("gather", "attention")
DEFAULT_DROP = "gather"  # measured: about 2x faster than "attention" at half removed (module docstring)

_TIMM_VIT = "timm.models.vision_transformer"
_TV_VIT = "torchvision.models.vision_transformer"
# normalisations over the last (channel) dimension of a token: per token, so dropping commutes with them
_TOKEN_NORMS = {("torch.nn.modules.normalization", n) for n in ("LayerNorm", "RMSNorm")} | {
    ("timm.layers.norm", n) for n in ("LayerNorm", "LayerNormFp32", "RmsNorm", "RmsNormFp32", "SimpleNorm",
                                      "SimpleNormFp32")}
_TIMM_MLPS = {("timm.layers.mlp", n) for n in ("Mlp", "GluMlp", "SwiGLU")}


# ----------------------------------------------------------------------------- options
def check_patch_keep(patch_keep) -> Union[str, float]:
    """"all", "any" or a float threshold in (0, 1]."""
    if isinstance(patch_keep, str):
        if patch_keep in PATCH_KEEPS:
            return patch_keep
    elif isinstance(patch_keep, (int, float)) and not isinstance(patch_keep, bool):
        t = float(patch_keep)
        if 0.0 < t <= 1.0:
            return t
    raise ValueError(f"patch_keep must be 'all' (a patch is kept when every pixel of it is visible), 'any' (when "
                     f"any pixel is) or a float in (0, 1] (when at least that fraction of its pixels is), "
                     f"got {patch_keep!r}")


def check_drop(drop) -> str:
    if drop not in DROPS:
        raise ValueError(f"drop must be one of {DROPS} ('gather': shorter sequences of the kept tokens; "
                         f"'attention': the full sequence, removed tokens masked out of every attention), "
                         f"got {drop!r}")
    return drop


def keep_rank(patch_keep: Union[str, float], pixels: int) -> int:
    """k such that a patch of ``pixels`` pixels is kept when at least k of them are visible: ``pixels``
    for "all", 1 for "any", the smallest k with k / pixels >= t for a threshold t (exact arithmetic:
    t=0.3 of 10 pixels is 3, not 4 as ceil(0.3 * 10) rounds in floating point)."""
    if patch_keep == "all":
        return pixels
    if patch_keep == "any":
        return 1
    return max(1, math.ceil(fractions.Fraction(patch_keep) * pixels))


def patch_keeps(mask: torch.Tensor, patch: Tuple[int, int], k: int) -> torch.Tensor:
    """N x L keeps of the patches (row-major, the tokens' order) of a float N x 1 x H x W mask: the k-th
    largest mask value in each patch (``keep_rank``).

    At a 0/1 mask this is the hard rule (1 when at least k pixels are visible, else 0). For a soft mask
    it is the fuzzy version of the same rule: "all" is the minimum (fuzzy and), "any" the maximum (fuzzy
    or), a threshold the k-th largest (as the CNN path's majority join): continuous and monotone in
    every pixel, a patch of constant value c keeps c (so for patch-aligned masks, the usual case, the
    keep is the patch's mean), and a patch with a pixel at 0 under "all" is dropped, so no removed
    pixel is ever read.
    """
    n, _, h, w = mask.shape
    ph, pw = patch
    m = mask.reshape(n, h // ph, ph, w // pw, pw)
    pixels = ph * pw
    if k == pixels:
        return m.amin(dim=(2, 4)).reshape(n, -1)
    if k == 1:
        return m.amax(dim=(2, 4)).reshape(n, -1)
    m = m.permute(0, 1, 3, 2, 4).reshape(n, (h // ph) * (w // pw), pixels)
    return m.kthvalue(pixels - k + 1, dim=-1).values  # the k-th largest = the (P - k + 1)-th smallest


def key_bias(keep: torch.Tensor) -> torch.Tensor:
    """log(keep) where keep > 0, -inf where 0 (a dropped key): the additive attention bias that scales
    the attention to each key by its keep. The log reads keep only where it is > 0, so the gradient at
    a dropped token is exactly 0 (no 0 * inf)."""
    pos = keep > 0
    safe = torch.where(pos, keep, torch.ones((), dtype=keep.dtype, device=keep.device))
    return torch.where(pos, torch.log(safe), torch.full((), float("-inf"), dtype=keep.dtype, device=keep.device))


def is_vision_transformer(model) -> bool:
    """True for a timm or torchvision VisionTransformer (or a subclass: refused by TokenMasked with a
    message). Imports neither library: a model of a class that was never imported cannot be one."""
    for name in (_TIMM_VIT, _TV_VIT):
        mod = sys.modules.get(name)
        if mod is not None and isinstance(model, getattr(mod, "VisionTransformer", ())):
            return True
    return False


def refuse_cnn_options(model, where: str, changed, hint: str = "") -> None:
    """ValueError when CNN layer-masking options (``changed``: descriptions of those set away from their
    defaults) are asked of a vision transformer, which token dropping masks without fill modes, padding,
    joins or fill values; ``where``: the call that asked (layer_mask, a strategy); ``hint``: what to do."""
    if changed:
        raise ValueError(f"{', '.join(changed)}: CNN layer-masking options, which apply to CNNs only ({where}); "
                         f"{type(model).__name__} is a vision transformer, masked by dropping the removed patches' "
                         f"tokens. {hint}(masked_ops.vit.token_mask takes its options: patch_keep, drop, soft)")


def _cls(m) -> Tuple[str, str]:
    return type(m).__module__, type(m).__name__


def _refuse(what: str, found, expected: str):
    name = type(found).__name__ if isinstance(found, nn.Module) else repr(found)
    raise ValueError(f"layer_mask (token dropping): unsupported {what}: {name}; expected {expected}. Token dropping "
                     f"reproduces the forward of the supported ViTs only, so this model is refused rather than "
                     f"masked silently wrong")


def _check_token_norm(m, what: str) -> None:
    if not isinstance(m, nn.Identity) and _cls(m) not in _TOKEN_NORMS:
        _refuse(what, m, "nn.Identity or a per-token normalisation (LayerNorm, RmsNorm, SimpleNorm)")


def _check_patchify(conv, patch, what: str) -> None:
    if not (type(conv) is nn.Conv2d and tuple(conv.kernel_size) == tuple(patch) and tuple(conv.stride) == tuple(patch)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"):
        _refuse(what, conv, f"an nn.Conv2d with kernel_size = stride = the patch size {tuple(patch)}, no padding "
                            f"(each token reads its own patch only)")


def _accepts_attn_mask(fn) -> bool:
    try:
        return "attn_mask" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- the wrapper
class TokenMasked(nn.Module):
    """A vision transformer behind layer masking by token dropping; ``forward(x, mask=None)``.

    x: N x 3 x H x W (the model's input, normalised); mask: N x 1 x H x W, bool or 0/1 float, 1 =
    visible (``soft``: float in [0, 1]); ``mask=None``: a pixel with NaN in any channel is removed.
    Returns the logits. The wrapped model is not modified (parameters are shared).

    patch_keep: how a patch's pixels decide whether its token is kept.
      "all" (default): kept only when every pixel of the patch is visible. It is the default because it
      is layer masking's invariant: a removed pixel is never seen by the model (NaN there is inert for
      free); with patch-aligned masks (the usual case: grid and occlusion explainers, patch
      segmentations) "all" and "any" agree.
      "any": kept when any pixel is visible; removed pixels inside a kept patch enter the patch
      embedding as 0 (after normalisation: selected with torch.where, never multiplied, so NaN there
      stays inert).
      a float t in (0, 1]: kept when at least the fraction t of its pixels is visible (zeroing as "any").
    drop: "gather" (default, faster) or "attention"; the same function (module docstring).
    soft: False (hard 0/1 masks), True or a name of masks.SOFT_SEMANTICS (True: "blend"). The mask is then
      a float in [0, 1] and the output is differentiable in it. A patch's keep is the k-th largest of its
      pixels' mask values (``patch_keeps``: the minimum for "all", the maximum for "any"; for
      patch-aligned masks, the patch's mean). Then, per semantics:
      "blend": the attention to each key is scaled by its keep (log(keep) is added to the attention
        logits: weights proportional to keep * exp(score); keep 0 is -inf, dropped) and the 'avg' pool is
        weighted by keep. A key is weighed relative to the others, so on a model without prefix tokens
        a mask scaled uniformly (m and m / 2) gives the same output; with a class token it does not.
      "threshold": the hard model at patch keep >= 1/2; the backward is the blend's gradient at that 0/1
        keep (straight-through, ``masks.straight_through`` on the patch keeps).
      "sample": the hard model at patch keeps drawn with P(kept) = keep (a new draw per forward, from
        torch's global generator); straight-through as "threshold".
      At a 0/1 mask every semantics gives the hard model. A dropped token (keep 0) is never read: its
      mask gradient is 0 (the blend's true derivative there would read the removed patch).
      Soft values below 1e-6 count as removed (``masks.soft_floor``), as on the CNN path. The mask weighs
      tokens, not pixels: a pixel with m > 0 in a kept patch is read as it is ("any", thresholds).
    """

    def __init__(self, model: nn.Module, *, patch_keep: Union[str, float] = DEFAULT_PATCH_KEEP,
                 drop: str = DEFAULT_DROP, soft: Union[bool, str] = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a timm or torchvision VisionTransformer), "
                            f"got {type(model).__name__}")
        self.patch_keep = check_patch_keep(patch_keep)
        self.drop = check_drop(drop)
        self.soft = M.check_soft(soft)
        self.model = model
        module = type(model).__module__
        if module == _TIMM_VIT and type(model).__name__ == "VisionTransformer":
            self.kind = "timm"
            self._check_timm(model)
        elif module == _TV_VIT and type(model).__name__ == "VisionTransformer":
            self.kind = "torchvision"
            self._check_torchvision(model)
        else:
            _refuse("vision transformer class", model,
                    "timm.models.vision_transformer.VisionTransformer or torchvision.models.VisionTransformer "
                    "itself (a subclass changes the forward: e.g. the distilled DeiT's distillation token and "
                    "two heads)")
        self.pixels = self.patch[0] * self.patch[1]
        self.rank = keep_rank(self.patch_keep, self.pixels)

    # -- what is supported
    def _check_timm(self, vit) -> None:
        from timm.layers import Attention, PatchEmbed
        from timm.models.vision_transformer import Block

        pe = vit.patch_embed
        if type(pe) is not PatchEmbed:
            _refuse("patch embedding (patch_embed)", pe, "timm.layers.PatchEmbed (a hybrid embedding runs a CNN over "
                                                         "the whole image, reading removed pixels)")
        self.patch = tuple(int(p) for p in pe.patch_size)
        _check_patchify(pe.proj, self.patch, "patch_embed.proj")
        _check_token_norm(pe.norm, "patch_embed.norm")
        if getattr(pe, "dynamic_img_pad", False):
            _refuse("option dynamic_img_pad", True, "dynamic_img_pad=False (padding to a multiple of the patch "
                                                    "size adds pixels the mask does not cover)")
        self.dynamic = bool(getattr(vit, "dynamic_img_size", False))
        if not self.dynamic and (pe.img_size is None or not (pe.flatten or pe.output_fmt.value == "NLC")):
            _refuse("patch embedding output", pe, "a fixed img_size with flattened (NLC) output, or a model built "
                                                  "with dynamic_img_size=True")
        self.img_size = None if self.dynamic else tuple(int(s) for s in pe.img_size)
        if not isinstance(vit.patch_drop, nn.Identity):
            _refuse("patch_drop", vit.patch_drop, "nn.Identity (patch_drop_rate=0: PatchDropout drops tokens at "
                                                  "random in training)")
        _check_token_norm(vit.norm_pre, "norm_pre")
        _check_token_norm(vit.norm, "norm")
        _check_token_norm(vit.fc_norm, "fc_norm")
        if getattr(vit, "attn_pool", None) is not None or vit.global_pool not in ("token", "avg"):
            _refuse("global_pool", vit.global_pool, "'token' (the class token) or 'avg' (attention pooling, 'max', "
                                                    "'avgmax' and no pooling are not supported)")
        if vit.global_pool == "token" and not vit.has_class_token:
            _refuse("global_pool", "'token' without a class token", "a class token for global_pool='token'")
        self.prefix = int(vit.num_prefix_tokens)
        self.pool = vit.global_pool
        self.pool_prefix = bool(getattr(vit, "pool_include_prefix", False))
        for i, blk in enumerate(vit.blocks):
            if type(blk) is not Block:
                _refuse(f"block blocks.{i}", blk, "timm.models.vision_transformer.Block")
            if type(blk.attn) is not Attention:
                _refuse(f"attention blocks.{i}.attn", blk.attn, "timm.layers.Attention (it takes an attn_mask)")
            if not (_accepts_attn_mask(blk.forward) and _accepts_attn_mask(blk.attn.forward)):
                _refuse(f"block blocks.{i}", blk, "a Block and Attention whose forward takes attn_mask (timm >= 1.0)")
            _check_token_norm(blk.norm1, f"blocks.{i}.norm1")
            _check_token_norm(blk.norm2, f"blocks.{i}.norm2")
            if _cls(blk.mlp) not in _TIMM_MLPS or not isinstance(getattr(blk.mlp, "fc2", None), nn.Linear):
                _refuse(f"MLP blocks.{i}.mlp", blk.mlp, "timm's Mlp, GluMlp or SwiGLU over Linear layers (per token)")

    def _check_torchvision(self, vit) -> None:
        from torchvision.models.vision_transformer import Encoder, EncoderBlock, MLPBlock

        self.patch = (int(vit.patch_size), int(vit.patch_size))
        _check_patchify(vit.conv_proj, self.patch, "conv_proj (a conv stem reads across patches)")
        self.dynamic = False
        self.img_size = (int(vit.image_size), int(vit.image_size))
        if type(vit.encoder) is not Encoder:
            _refuse("encoder", vit.encoder, "torchvision.models.vision_transformer.Encoder")
        _check_token_norm(vit.encoder.ln, "encoder.ln")
        for i, layer in enumerate(vit.encoder.layers):
            where = f"encoder.layers.{i}"
            if type(layer) is not EncoderBlock:
                _refuse(f"block {where}", layer, "torchvision.models.vision_transformer.EncoderBlock")
            att = layer.self_attention
            if not (type(att) is nn.MultiheadAttention and att.batch_first and att.bias_k is None
                    and att.bias_v is None and not att.add_zero_attn and att._qkv_same_embed_dim):
                _refuse(f"attention {where}.self_attention", att, "an nn.MultiheadAttention with batch_first=True, "
                                                                   "no bias_k/bias_v and no add_zero_attn")
            _check_token_norm(layer.ln_1, f"{where}.ln_1")
            _check_token_norm(layer.ln_2, f"{where}.ln_2")
            if type(layer.mlp) is not MLPBlock:
                _refuse(f"MLP {where}.mlp", layer.mlp, "torchvision's MLPBlock")
        self.prefix = 1
        self.pool = "token"
        self.pool_prefix = False

    # -- description
    def summary(self) -> str:
        ph, pw = self.patch
        pk = repr(self.patch_keep) if isinstance(self.patch_keep, str) else \
            f"{self.patch_keep:g} (at least {self.rank} of {self.pixels} pixels visible)"
        size = "any multiple of the patch size" if self.dynamic else f"{self.img_size[0]} x {self.img_size[1]}"
        return (f"TokenMasked: layer masking by token dropping of {self.kind} {type(self.model).__name__} "
                f"(patch {ph} x {pw}, image {size}, {self.prefix} prefix token(s) always kept, pool {self.pool!r}); "
                f"patch_keep={pk}, drop={self.drop!r}, soft={self.soft or False!r}")

    def __repr__(self) -> str:
        return self.summary()

    # -- the forward
    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        ph, pw = self.patch
        if h % ph or w % pw:
            raise ValueError(f"x: the image size {h} x {w} is not a multiple of the patch size {ph} x {pw} of "
                             f"{type(self.model).__name__}; crop or resize it")
        if self.img_size is not None and (h, w) != self.img_size:
            hint = " (or build the timm model with dynamic_img_size=True)" if self.kind == "timm" else ""
            raise ValueError(f"x: the image size {h} x {w} does not fit the model's position embedding, made for "
                             f"{self.img_size[0]} x {self.img_size[1]}; resize the image{hint}")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """N x (prefix + L) x D: the tokens with their position embeddings, before any is dropped."""
        vit = self.model
        if self.kind == "timm":
            t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        else:
            n = x.shape[0]
            t = vit.conv_proj(x).flatten(2).transpose(1, 2)
            t = torch.cat([vit.class_token.expand(n, -1, -1), t], dim=1) + vit.encoder.pos_embedding
            t = vit.encoder.dropout(t)
        return t

    def _blocks(self, t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The transformer blocks and the final norm; ``bias``: N x S additive key bias or None."""
        vit = self.model
        if self.kind == "timm":
            attn_mask = None if bias is None else bias[:, None, None, :]  # N x heads x queries x keys
            for blk in vit.blocks:
                t = blk(t, attn_mask=attn_mask)
            return vit.norm(t)
        for layer in vit.encoder.layers:  # torchvision's EncoderBlock.forward, with the key mask
            y = layer.ln_1(t)
            y, _ = layer.self_attention(y, y, y, need_weights=False, key_padding_mask=bias)
            t = layer.dropout(y) + t
            t = t + layer.mlp(layer.ln_2(t))
        return vit.encoder.ln(t)

    def _head(self, t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Pool (the class token, or the mean weighted by ``weight``, N x S, over the pooled tokens), head."""
        vit = self.model
        if self.pool == "token":
            feat = t[:, 0]
        else:
            if not self.pool_prefix:
                t, weight = t[:, self.prefix:], weight[:, self.prefix:]
            zero = torch.zeros((), dtype=t.dtype, device=t.device)
            pos = weight > 0
            w = torch.where(pos, weight, zero)[..., None]  # a dropped token: weight 0, no gradient
            total = torch.where(pos[..., None], w * t, zero).sum(1)
            count = w.sum(1)
            feat = torch.where(count > 0, total / torch.where(count > 0, count, torch.ones_like(count)), zero)
        if self.kind == "timm":
            return vit.head(vit.head_drop(vit.fc_norm(feat)))
        return vit.heads(feat)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = M.input_mask(x, mask, soft=self.soft is not None)  # checks x and mask; NaN rule when None
        self._check_size(x)
        keep = patch_keeps(m, self.patch, self.rank)  # N x L
        if self.soft in M.STRAIGHT_THROUGH:
            keep = M.straight_through(keep, self.soft)
        t = self._embed(M.select_visible(x, m))
        n, p = t.shape[0], self.prefix
        if t.shape[1] != p + keep.shape[1]:  # the layout the dropping assumes: prefix tokens, then the patches
            raise ValueError(f"{type(self.model).__name__}: expected {p} prefix + {keep.shape[1]} patch tokens, "
                             f"the embedding gave {t.shape[1]}")
        ones = torch.ones(n, p, dtype=keep.dtype, device=keep.device)
        compiling = C.is_compiling()
        if self.drop == "attention" or compiling:
            weight = torch.cat([ones, keep], dim=1)
            bias = self._bias(weight)
        else:
            kept = keep > 0
            counts = kept.sum(1)
            longest = int(counts.max())
            if p == 0:
                longest = max(longest, 1)  # a sequence is never empty (all removed: the pool gives 0)
            order = torch.sort(kept.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :longest]
            patches = t[:, p:].gather(1, order[..., None].expand(-1, -1, t.shape[-1]))
            t = torch.cat([t[:, :p], patches], dim=1)
            weight = torch.cat([ones, keep.gather(1, order)], dim=1)  # padding: keep 0
            padded = int(counts.min()) < longest
            bias = self._bias(weight) if (padded or self.soft is not None) else None
        return self._head(self._blocks(t, bias), weight)

    @staticmethod
    def _bias(weight: torch.Tensor) -> torch.Tensor:
        """N x S key bias (``key_bias``); a sample with no visible key at all (no prefix tokens, every patch
        removed) attends to all of them instead, finite values whose pool weight is 0: no NaN row."""
        bias = key_bias(weight)
        none = ~(weight > 0).any(dim=1, keepdim=True)
        return torch.where(none, torch.zeros((), dtype=bias.dtype, device=bias.device), bias)


def token_mask(model: nn.Module, *, patch_keep: Union[str, float] = DEFAULT_PATCH_KEEP, drop: str = DEFAULT_DROP,
               soft: Union[bool, str] = False) -> TokenMasked:
    """Layer masking of a vision transformer by token dropping, with the ViT-only options (``TokenMasked``;
    ``masked_ops.layer_mask(vit, soft=...)`` returns the same with the defaults)."""
    return TokenMasked(model, patch_keep=patch_keep, drop=drop, soft=soft)
