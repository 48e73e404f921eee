"""noisy-linear, inpaint-telea/-ns and segment-mean, each against an independent reference:
a scipy ``spsolve`` transcription of road_evaluation's linear system, OpenCV called directly, and
lime's own ``hide_color=None`` fill."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.sparse import csc_matrix, lil_matrix
from scipy.sparse.linalg import spsolve

import masked_ops as mo
from masked_ops import backends
from masked_ops.explain.imputation import (blend, grid_labels, linear_imputation, noisy_linear_imputation,
                                           segment_mean_fill)
from masked_ops.explain.strategies import IMPUTATION_STRATEGIES, STRATEGIES, get_strategy
from masked_ops.images import IMAGENET_MEAN
from op_cases import imputation_case

# road_evaluation (road/imputations.py) and Quantus: (offset, weight) of the 8 neighbours.
NEIGHBOURS = [((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
              ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6)]


def road_linear_reference(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """road_evaluation's NoisyLinearImputer with noise 0, transcribed: img C x H x W, mask H x W (1 = visible).

    One equation per removed pixel i: -(sum of in-image neighbour weights) x_i + sum over removed
    neighbours w x_j = -sum over visible neighbours w v_j, solved by scipy's spsolve.
    """
    c, h, w = img.shape
    flat = img.reshape(c, -1)
    m = mask.reshape(-1)
    idx = np.flatnonzero(m == 0)
    var = np.zeros(h * w, dtype=int)
    var[idx] = np.arange(len(idx))
    a = lil_matrix((len(idx), len(idx)))
    b = np.zeros((len(idx), c))
    total = np.ones(len(idx))
    rows, cols = idx // w, idx % w
    for (dy, dx), wt in NEIGHBOURS:
        rr, cc = rows + dy, cols + dx
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        total[~inside] -= wt
        eq = np.flatnonzero(inside)
        nb = rr[inside] * w + cc[inside]
        vis = m[nb] > 0.5
        b[eq[vis]] -= wt * flat[:, nb[vis]].T
        a[eq[~vis], var[nb[~vis]]] = wt
    a[np.arange(len(idx)), np.arange(len(idx))] = -total
    sol = np.asarray(spsolve(csc_matrix(a), b)).reshape(len(idx), c)
    out = flat.copy()
    out[:, idx] = sol.T
    return out.reshape(c, h, w)


def patch_masks(n, size, patch, frac, seed):
    g = torch.Generator().manual_seed(seed)
    cells = size // patch
    keep = torch.rand(n, 1, cells, cells, generator=g).argsort(-1).argsort(-1)  # not used for values
    removed = torch.zeros(n, cells * cells, dtype=torch.bool)
    for i in range(n):
        removed[i, torch.randperm(cells * cells, generator=g)[:round(frac * cells * cells)]] = True
    del keep
    m = ~removed.view(n, 1, cells, cells)
    return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


# ----------------------------------------------------------------------------- noisy-linear
# The two solvers of the same system: "cpp" = the fused CPU kernel (masked_ops::imputation_solve),
# "torch" = the batched torch solver (what CUDA tensors use).
SOLVERS = ["cpp", "torch"]


@pytest.fixture(params=SOLVERS)
def solver(request):
    if request.param == "cpp" and not backends.available("cpp"):
        pytest.skip(f"cpp backend: {backends.unavailable_reason('cpp')}")
    with mo.set_backend(request.param):
        yield request.param


@pytest.mark.parametrize("frac,size,patch", [(0.5, 64, 8), (0.9, 64, 8), (0.3, 37, 1), (0.97, 48, 4)])
def test_linear_imputation_equals_spsolve_transcription(frac, size, patch, solver):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, size, size, generator=g)
    if patch == 1:
        masks = torch.rand(3, 1, size, size, generator=g) > frac  # scattered pixels, odd size
    else:
        masks = patch_masks(3, size, patch, frac, seed=4)
    ours = linear_imputation(images, masks)
    for i in range(3):
        ref = road_linear_reference(images[i].double().numpy(), masks[i, 0].double().numpy())
        np.testing.assert_allclose(ours[i].double().numpy(), ref, atol=1e-4, rtol=0)
        assert torch.equal(ours[i][:, masks[i, 0]], images[i][:, masks[i, 0]])  # visible pixels untouched


def test_linear_imputation_of_constant_and_linear_images_is_exact():
    # A constant image is reproduced; a ramp is a discrete harmonic function of this stencil in the interior.
    masks = patch_masks(1, 32, 8, 0.5, seed=1)
    const = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(linear_imputation(const, masks), const, atol=1e-5, rtol=0)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).clone()
    inner = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    inner[..., 8:24, 8:24] = False  # a hole away from the border
    torch.testing.assert_close(linear_imputation(ramp, inner), ramp, atol=1e-5, rtol=0)


def test_noisy_linear_noise_is_absolute_gaussian_on_removed_pixels_only():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 48, 48, generator=g)
    masks = patch_masks(2, 48, 8, 0.5, seed=2)
    plain = linear_imputation(images, masks)
    noisy = noisy_linear_imputation(images, masks, noise=0.05, generator=torch.Generator().manual_seed(1))
    diff = (noisy - plain).double()
    removed = ~masks.expand_as(images)
    assert torch.equal(noisy[~removed], images[~removed])
    assert abs(float(diff[removed].std()) - 0.05) < 0.003 and abs(float(diff[removed].mean())) < 0.003
    zero = noisy_linear_imputation(images, masks, noise=0.0)
    assert torch.equal(zero, torch.where(masks, images, plain))


def test_all_removed_image_gets_the_documented_fallback():
    images = torch.rand(2, 3, 16, 16)
    masks = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    masks[0] = False  # image 0: nothing visible; image 1: everything visible
    out = linear_imputation(images, masks)
    torch.testing.assert_close(out[0], torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 16, 16))
    assert torch.equal(out[1], images[1])
    out = linear_imputation(images, masks, fallback=[0.1, 0.2, 0.3])
    assert out[0, :, 5, 5].tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="no visible pixel"):
        linear_imputation(images, masks, fallback=None)


def test_removed_content_never_enters_noisy_linear_and_inpainting():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 32, 32, generator=g)
    masks = patch_masks(2, 32, 8, 0.5, seed=5)
    junk = images.clone()
    junk[~masks.expand_as(images)] = float("nan")
    model = tiny_cnn()
    for name in ("noisy-linear", "inpaint-telea", "inpaint-ns"):
        a = get_strategy(name, model, seed=3)
        b = get_strategy(name, model, seed=3)
        with torch.no_grad():
            ya, yb = a(images, masks), b(junk, masks)
        assert torch.isfinite(ya).all() and torch.equal(ya, yb), name


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 40), (1, 2, 37, 53), (3, 3, 17, 9), (1, 3, 64, 48)])
@pytest.mark.parametrize("kind", ["scattered", "one-removed", "one-visible", "border-blocks"])
def test_fused_and_torch_solvers_agree(shape, kind):
    if not backends.available("cpp"):
        pytest.skip(f"cpp backend: {backends.unavailable_reason('cpp')}")
    images, masks = imputation_case(*shape, kind, seed=sum(shape) + len(kind))  # the op testers' cases
    with mo.set_backend("cpp"):
        fused = linear_imputation(images, masks, tol=1e-10, fallback=[0.5])
    with mo.set_backend("torch"):
        ref = linear_imputation(images, masks, tol=1e-10, fallback=[0.5])
    torch.testing.assert_close(fused, ref, atol=1e-8, rtol=0)
    assert torch.equal(fused.expand_as(images)[masks.expand_as(images)], images[masks.expand_as(images)])
    if shape == (1, 2, 37, 53):  # against road_evaluation's system too (independent of both solvers)
        want = road_linear_reference(images[0].numpy(), masks[0, 0].double().numpy())
        np.testing.assert_allclose(fused[0].numpy(), want, atol=1e-7, rtol=0)


def test_fused_solver_reads_strided_float32_inputs():
    if not backends.available("cpp"):
        pytest.skip(f"cpp backend: {backends.unavailable_reason('cpp')}")
    g = torch.Generator().manual_seed(7)
    big = torch.rand(2, 3, 40, 66, generator=g)
    images = big[:, :, 5:37, ::2].contiguous(memory_format=torch.channels_last)[:, :, :, 1:]  # strided view
    masks = patch_masks(2, 32, 4, 0.5, seed=8)
    with mo.set_backend("cpp"):
        fused = linear_imputation(images, masks)
    with mo.set_backend("torch"):
        ref = linear_imputation(images.contiguous(), masks)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, atol=5e-5, rtol=0)


def test_solvers_say_when_they_do_not_converge(solver):
    images, masks = imputation_case(1, 3, 64, 64, "border-blocks", seed=1)
    with pytest.raises(RuntimeError, match="did not converge in 1 iterations"):
        linear_imputation(images, masks, tol=1e-14, max_iter=1)


def test_linear_imputation_rejects_bad_input():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"mask has the wrong shape: expected \(2, 1, 8, 8\)"):
        linear_imputation(images, torch.ones(2, 1, 8, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        linear_imputation(images.to(torch.uint8), torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must hold values in \[0, 1\]"):
        linear_imputation(images, torch.full((2, 1, 8, 8), 1.5))


def test_opcheck_imputation_solve():
    if not backends.available("cpp"):
        pytest.skip(f"cpp backend: {backends.unavailable_reason('cpp')}")
    images, masks = imputation_case(2, 3, 12, 10, "scattered", seed=2)
    removed = ~masks
    b = torch.rand(images.shape, dtype=torch.float64) * removed
    torch.library.opcheck(torch.ops.masked_ops.imputation_solve.default, (b, removed, 1e-9, 200))


def test_soft_masks_blend_and_gradients_flow(solver):
    g = torch.Generator().manual_seed(4)
    images = torch.rand(1, 3, 24, 24, generator=g, dtype=torch.float64).requires_grad_(True)
    soft = torch.rand(1, 1, 24, 24, generator=g, dtype=torch.float64)
    soft[..., :8, :] = 1.0
    soft[..., 8:16, :8] = 0.0
    soft.requires_grad_(True)
    out = noisy_linear_imputation(images, soft, noise=0.0)
    fill = linear_imputation(images.detach(), soft.detach() > 0.5)
    want = soft * images + (1 - soft) * fill
    torch.testing.assert_close(out, want.detach())
    # d out / d mask = x - fill where the mask is > 0; gradient reaches the visible pixels through the solve
    (gi, gm) = torch.autograd.grad(out.sum(), (images, soft))
    want_gm = torch.where(soft > 0, images - fill, torch.zeros(())).sum(1, keepdim=True).detach()
    torch.testing.assert_close(gm, want_gm)  # a pixel at exactly 0 is never read: no mask gradient
    assert float(gi[..., :8, :].abs().sum()) > 0
    # the solve's gradient is the transpose solve: check against finite differences in one direction
    v = torch.randn(1, 3, 24, 24, generator=g, dtype=torch.float64)
    hard = soft.detach() > 0.5
    f = lambda x: linear_imputation(x, hard, tol=1e-10).sum()
    x0 = images.detach()
    num = (f(x0 + 1e-4 * v) - f(x0 - 1e-4 * v)) / 2e-4
    xg = x0.clone().requires_grad_(True)
    (ana,) = torch.autograd.grad(f(xg), xg)
    assert float((ana * v).sum()) == pytest.approx(float(num), rel=1e-5, abs=1e-8)


def test_blend_is_exact_for_hard_masks():
    x = torch.tensor([[[[1.0, float("nan")]]]])
    fill = torch.tensor([[[[5.0, 6.0]]]])
    assert blend(x, torch.tensor([[[[True, False]]]]), fill).tolist() == [[[[1.0, 6.0]]]]
    assert blend(x, torch.tensor([[[[1.0, 0.0]]]]), fill).tolist() == [[[[1.0, 6.0]]]]
    assert blend(torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[0.25, 0.5]]]]), fill).tolist() == \
        [[[[4.0, 4.0]]]]


# ----------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpainting_equals_opencv(method):
    """OpenCV called directly on each float channel (Telea on the 0-255 scale, NS on [0, 1]), and,
    for Telea, close to OpenCV's usual 8-bit 3-channel call (shap's)."""
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(6)
    images = (torch.rand(3, 3, 40, 40, generator=g) * 255).round() / 255  # exactly 8-bit values
    masks = patch_masks(3, 40, 8, 0.4, seed=7)
    s = get_strategy(f"inpaint-{method}", tiny_cnn(), radius=5, workers=2)
    comp = s.composite(images, masks)
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    scale = 255.0 if method == "telea" else 1.0
    for i in range(3):
        rem = (~masks[i, 0]).numpy().astype(np.uint8)
        img = images[i].numpy()
        for c in range(3):
            ref = cv2.inpaint(np.ascontiguousarray(img[c] * (1 - rem) * scale), rem, 5, flag) / scale
            vis = img[c][rem == 0]
            np.testing.assert_allclose(comp[i, c].numpy(), np.clip(ref, vis.min(), vis.max()), atol=1e-5)
        if method == "telea":
            u8 = np.ascontiguousarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8))
            ref8 = cv2.inpaint(u8, rem, 5, flag).astype(np.float64) / 255
            diff = np.abs(comp[i].permute(1, 2, 0).double().numpy() - ref8)
            assert diff.mean() < 1 / 255 and diff.max() < 6 / 255, (diff.mean(), diff.max())
    # a smooth ramp is continued into the hole (catches cv2's Telea run on [0, 1] floats: noise)
    ramp = torch.linspace(0, 1, 40).view(1, 1, 1, 40).expand(1, 3, 40, 40).contiguous()
    hole = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    hole[..., 14:26, 14:26] = False
    err = (s.composite(ramp, hole) - ramp).abs().max()
    assert float(err) < 0.15, float(err)
    # all removed: the dataset mean; nothing removed: the image
    none = s.composite(images[:1], torch.zeros(1, 1, 40, 40, dtype=torch.bool))
    torch.testing.assert_close(none[0, :, 3, 3], torch.tensor(IMAGENET_MEAN))
    assert torch.equal(s.composite(images[:1], torch.ones(1, 1, 40, 40, dtype=torch.bool)), images[:1])


def test_inpainting_differs_between_methods_and_radii():
    g = torch.Generator().manual_seed(8)
    images = torch.rand(1, 3, 32, 32, generator=g)
    masks = patch_masks(1, 32, 8, 0.5, seed=9)
    m = tiny_cnn()
    a = get_strategy("inpaint-telea", m).composite(images, masks)
    b = get_strategy("inpaint-ns", m).composite(images, masks)
    c = get_strategy("inpaint-telea", m, radius=9).composite(images, masks)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


# ----------------------------------------------------------------------------- segment-mean
def test_segment_mean_equals_lime_hide_color_none():
    pytest.importorskip("lime")
    from lime.lime_image import LimeImageExplainer

    g = torch.Generator().manual_seed(10)
    image = torch.rand(3, 24, 24, generator=g)
    segments = grid_labels((24, 24), 6)
    # lime's explain_instance builds fudged_image: every segment painted with its own mean colour
    captured = {}

    def classifier(batch):
        captured.setdefault("batch", batch.copy())
        return np.tile([[0.5, 0.5]], (len(batch), 1))

    LimeImageExplainer(random_state=0).explain_instance(
        image.permute(1, 2, 0).double().numpy(), classifier, hide_color=None, num_samples=12, batch_size=12,
        segmentation_fn=lambda img: segments.numpy(), random_seed=0)
    fudged = np.stack([image[c].double().numpy() for c in range(3)], -1).copy()
    for k in np.unique(segments.numpy()):
        sel = segments.numpy() == k
        fudged[sel] = fudged[sel].mean(0)
    batch = captured["batch"]  # lime's samples: the first keeps everything
    s = get_strategy("segment-mean", tiny_cnn(), segment_size=6)
    for row in batch[1:4]:
        removed = np.all(np.isclose(row, fudged), axis=-1) & ~np.all(np.isclose(row, image.permute(1, 2, 0).numpy()),
                                                                    axis=-1)
        mask = torch.from_numpy(~removed)[None, None]
        ours = s.composite(image[None].double(), mask)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, row, atol=1e-6)
    fill = segment_mean_fill(image[None], segments)
    torch.testing.assert_close(fill[0].permute(1, 2, 0).double(), torch.from_numpy(fudged), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- registry, bad input
def test_registered_and_options_checked():
    assert set(IMPUTATION_STRATEGIES) <= set(STRATEGIES)
    m = tiny_cnn()
    with pytest.raises(ValueError, match="inpainting radius must be an int >= 1"):
        get_strategy("inpaint-telea", m, radius=0)
    with pytest.raises(ValueError, match="unknown option.*radius.*'noisy-linear'"):
        get_strategy("noisy-linear", m, radius=3)
    with pytest.raises(ValueError, match="unknown option.*noise.*'grey'"):
        get_strategy("grey", m, noise=0.1)
    with pytest.raises(ValueError, match="noise must be"):
        get_strategy("noisy-linear", m, noise=-1)
    with pytest.raises(ValueError, match="segment_size"):
        get_strategy("segment-mean", m, segment_size=0)
    s = get_strategy("segment-mean", m)
    s.segments = torch.zeros(5, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="segments must have shape"):
        s(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="tol"):
        linear_imputation(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8, dtype=torch.bool), tol=0)


def test_strategies_run_batched_with_float_masks_and_one_image_broadcast():
    m = tiny_cnn()
    images = torch.rand(1, 3, 32, 32)
    masks = patch_masks(4, 32, 8, 0.5, seed=11).float()
    for name in IMPUTATION_STRATEGIES:
        with torch.no_grad():
            out = get_strategy(name, m)(images, masks)
        assert out.shape == (4, 3) and torch.isfinite(out).all(), name
