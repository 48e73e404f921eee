"""DiffMask for CNNs: hard-concrete gates, the amortised gate network, fit/resume/checkpoints, errors.

The hard-concrete distribution is checked against a transcription of Vision DiffMask's own
(``RectifiedStreched(BinaryConcrete(0.2, logits), l=-0.2, r=1.0)``, built here from
torch.distributions as that code does). The learning is checked on a task with a known answer:
a CNN that says "red" when any pixel of a red square is visible, so the smallest mask that keeps
its output is one patch touching the square, wherever the square is.
"""
import pytest
import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

from masked_ops.explain.diffmask import (DiffMask, explain_diffmask, hard_concrete_sample, kl_divergence,
                                         open_probability, stage_layers)
from masked_ops.explain.maps import MapExplanation
from masked_ops.explain.strategies import get_strategy

PIXEL = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # strategies on pixel-space models


# ----------------------------------------------------------------------------- hard concrete
def vision_diffmask_distribution(logits):
    """Vision DiffMask's gate distribution: a RelaxedBernoulli(0.2) stretched to (-0.2, 1.0), clamped."""
    base = D.RelaxedBernoulli(temperature=torch.full_like(logits, 0.2), logits=logits)
    return D.TransformedDistribution(base, D.AffineTransform(loc=-0.2, scale=1.2))


def vision_diffmask_log_expected_l0(logits):
    # BinaryConcrete.log_expected_L0 at the pre-image of 0 under the stretch: v = 0.2 / 1.2
    v = torch.tensor(0.2 / 1.2, dtype=logits.dtype)
    return -F.softplus((torch.log(v) - torch.log(1 - v)) * 0.2 - logits)


def test_open_probability_matches_vision_diffmask():
    logits = torch.linspace(-8, 8, 33, dtype=torch.float64)
    torch.testing.assert_close(open_probability(logits), vision_diffmask_log_expected_l0(logits).exp())


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_samples_follow_vision_diffmask_distribution(log_alpha):
    n = 40000
    la = torch.full((n,), log_alpha)
    ours = hard_concrete_sample(la, torch.Generator().manual_seed(0))
    theirs = vision_diffmask_distribution(la).sample().clamp(0, 1)
    assert float(ours.min()) == 0.0  # exact zeros occur (the stretch reaches below 0; r = 1.0 does not reach past 1)
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert abs(float(ours.quantile(q)) - float(theirs.quantile(q))) < 0.02
    assert abs(float((ours > 0).float().mean()) - float(open_probability(torch.tensor(log_alpha)))) < 0.01
    assert abs(float((ours > 0.999).float().mean()) - float((theirs > 0.999).float().mean())) < 0.01


def test_samples_are_differentiable_inside():
    la = torch.zeros(1000, requires_grad=True)
    z = hard_concrete_sample(la, torch.Generator().manual_seed(1))
    z.sum().backward()
    inside = (z > 0) & (z < 1)
    assert bool((la.grad[inside] > 0).all()) and bool((la.grad[~inside] == 0).all())


def test_straight_through_gates_carry_the_open_probabilitys_gradient_to_shut_gates():
    """A clamped gate (z exactly 0) has no gradient of its own; the straight-through gates pass the KL's
    gradient on through P(z != 0), the quantity the L0 term reads, and keep shut gates faintly open."""
    from masked_ops.explain.hard_concrete import straight_through_gates

    la = torch.tensor([-8.0, -1.0, 0.5, 6.0], requires_grad=True)
    z = hard_concrete_sample(la, torch.Generator().manual_seed(0))
    (own,) = torch.autograd.grad(z.sum(), la, allow_unused=True)
    assert own[0] == 0  # the shut gate: no gradient of its own
    st = straight_through_gates(z, la, 0.01)
    assert torch.equal(st.detach(), z.detach().clamp_min(0.01))
    (g,) = torch.autograd.grad(st.sum(), la)
    p = open_probability(la.detach())
    torch.testing.assert_close(g, p * (1 - p))
    assert (g > 0).all()


def test_kl_divergence_matches_torch_distributions():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    want = D.kl_divergence(D.Categorical(logits=a), D.Categorical(logits=b))
    torch.testing.assert_close(kl_divergence(a, b), want)


# ----------------------------------------------------------------------------- a task with a known answer
class RedNet(nn.Module):
    """logits = [10 * max over pixels of redness, 5]: "red" iff some red pixel is visible."""

    def __init__(self):
        super().__init__()
        self.redness = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.redness.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5]]).view(2, 3, 1, 1))
            self.redness.bias.zero_()
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.bias = nn.Parameter(torch.tensor(5.0))

    def forward(self, x):
        r = self.pool(self.act(self.redness(x)))
        red = r[:, 0].amax(dim=(1, 2))
        return torch.stack([10 * red, self.bias.expand_as(red)], dim=1)


def red_images(n, seed, size=32, side=6):
    g = torch.Generator().manual_seed(seed)
    grey = 0.3 + 0.4 * torch.rand(n, 1, size, size, generator=g)
    images = grey.expand(-1, 3, -1, -1).clone()
    where = []
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        images[i, :, y:y + side, x:x + side] = torch.tensor([0.95, 0.1, 0.1]).view(3, 1, 1)
        where.append((y, x))
    return images, where


def make(model=None, **kw):
    model = model or RedNet().eval()
    opts = dict(strategy=get_strategy("black", model, **PIXEL), patch=8, image_size=32, batch_size=8, lr=1e-2,
                hidden=16, lagrange_lr=0.1, damping=0.0, seed=0)  # Vision DiffMask's plain Lagrangian
    opts.update(kw)
    return DiffMask(model, **opts)


def test_stage_layers_picks_the_last_module_at_each_resolution():
    model = RedNet()
    assert stage_layers(model, 32) == ["act", "pool"]
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), shared, nn.Conv2d(4, 4, 3, stride=2, padding=1), shared,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert stage_layers(twice, 16) == ["0", "2"]  # the shared ReLU (called twice) is skipped
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout * 2, 1), nn.ReLU(), nn.ZeroPad2d(1),
                             nn.Conv2d(cout * 2, cout, 3, stride=stride))
    # the outermost modules at each resolution (the stem conv at 16; at 8 the last block; at 4 the whole
    # trunk, whose output is its last block's), never a block's insides or a padding module
    nested = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                           nn.Sequential(block(4, 4, 1), block(4, 8, 2), block(8, 8, 1), block(8, 8, 2)),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert stage_layers(nested, 16) == ["0", "1.2", "1"]
    with pytest.raises(ValueError, match="layers"):
        stage_layers(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 2)


def test_gates_start_open_and_explain_is_one_forward():
    dm = make()
    images, _ = red_images(3, 1)
    calls = []
    dm.model.register_forward_hook(lambda *a: calls.append(1))
    exps = dm.explain(images)
    assert len(calls) == 1  # one forward of the CNN for the whole batch
    assert len(exps) == 3 and all(isinstance(e, MapExplanation) for e in exps)
    e = exps[0]
    assert e.method == "diffmask" and e.weights.shape == (1, 16) and e.segments.shape == (32, 32)
    assert float(e.weights.min()) > 0.99  # every gate starts open
    single = dm.explain(images[0])
    assert isinstance(single, MapExplanation) and torch.equal(single.weights, e.weights)
    assert single.targets == [0]  # the top-1 class: red


def test_fit_learns_to_keep_the_red_patch(tmp_path):
    train, _ = red_images(48, 2)
    val, where = red_images(16, 3)
    dm = make()
    history = dm.fit(train, epochs=25, val_images=val, progress=False)
    assert len(history) == 25 and {"val_kl", "val_kept", "train_kl", "lagrange"} <= set(history[-1])
    last = history[-1]
    assert last["val_kept"] < 0.35, history[-3:]
    assert last["val_kl"] < 0.5, history[-3:]
    calibrated = dm.evaluate(val, calibrate=True)
    # one visible patch touching the square keeps "red": the smallest sufficient top-k is a patch or two
    assert calibrated["calibrated_kl"] <= dm.config["eps"] and calibrated["calibrated_kept"] <= 2 / 16, calibrated
    keep = dm.keep_probability(val)[:, 0]              # 16 x 4 x 4
    hits = 0
    for k, (y, x) in enumerate(where):
        py, px = divmod(int(keep[k].argmax()), 4)
        # the most-kept patch touches the square (6 x 6 at y, x)
        hits += (py * 8 < y + 6 and y < py * 8 + 8) and (px * 8 < x + 6 and x < px * 8 + 8)
    assert hits >= 13, hits


def test_per_image_variant_finds_the_red_patch():
    model = RedNet().eval()
    images, where = red_images(2, 4)
    for k in range(2):
        exp = explain_diffmask(get_strategy("black", model, **PIXEL), images[k], patch=8, steps=150, lr=0.2,
                               progress=False)
        keep = exp.weights[0].view(4, 4)
        py, px = divmod(int(keep.argmax()), 4)
        y, x = where[k]
        assert (py * 8 < y + 6 and y < py * 8 + 8) and (px * 8 < x + 6 and x < px * 8 + 8)
        assert exp.info["kept"] < 0.4 and exp.info["kl"] < 0.5
        assert not exp.info["amortised"]


def test_interrupted_fit_resumes_to_the_same_state(tmp_path):
    train, _ = red_images(20, 5)
    val, _ = red_images(4, 6)
    ref = make()
    ref.fit(train, epochs=2, val_images=val, progress=False)

    ckpt = tmp_path / "dm.pt"

    def stop(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    first = make()
    with pytest.raises(KeyboardInterrupt) as stopped:
        first.fit(train, epochs=2, val_images=val, checkpoint=str(ckpt), checkpoint_every=1, progress=False,
                  callback=stop)
    assert ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] == 4
    # the interrupt says, in one line, where the fit stopped and which file resumes it
    message = str(stopped.value)
    assert "\n" not in message and "at step 4 of 6" in message and str(ckpt) in message and "holds step 4" in message
    assert all(p.requires_grad for p in first.model.parameters())  # the CNN's gradients are given back
    assert [p.name for p in tmp_path.iterdir()] == ["dm.pt"]  # no temporary file left behind
    assert oct(ckpt.stat().st_mode & 0o777) in ("0o644", "0o664", "0o666")
    resumed = make()
    resumed.fit(train, epochs=2, val_images=val, checkpoint=str(ckpt), checkpoint_every=1, progress=False)
    for (k, a), b in zip(ref.gate.state_dict().items(), resumed.gate.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.history == ref.history and resumed.step == ref.step == 6
    # a finished fit started again does nothing more; more epochs continue it
    again = make()
    again.fit(train, epochs=2, checkpoint=str(ckpt), val_images=val, progress=False)
    assert again.step == 6
    again.fit(train, epochs=3, checkpoint=str(ckpt), val_images=val, progress=False)
    assert again.step == 9


def test_interrupt_without_checkpoint_says_nothing_was_saved():
    train, _ = red_images(4, 5)

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="at step 1 of 2; no checkpoint was written"):
        make().fit(train, epochs=2, progress=False, callback=stop)


def test_save_load_roundtrip_and_wrong_checkpoints(tmp_path):
    train, _ = red_images(8, 7)
    dm = make()
    dm.fit(train, epochs=1, progress=False)
    path = tmp_path / "dm.pt"
    dm.save(str(path))
    images, _ = red_images(2, 8)
    back = DiffMask.load(str(path), dm.model, strategy=get_strategy("black", dm.model, **PIXEL))
    assert torch.equal(back.keep_probability(images), dm.keep_probability(images))
    other = RedNet().eval()
    with torch.no_grad():
        other.bias.fill_(4.0)
    with pytest.raises(ValueError, match="made for another model"):
        DiffMask.load(str(path), other, strategy=get_strategy("black", other, **PIXEL))
    with pytest.raises(ValueError, match="made for another model"):
        make(other).fit(train, checkpoint=str(path), progress=False)
    with pytest.raises(ValueError, match="another DiffMask configuration.*hidden"):
        make(dm.model, hidden=8).load_state_dict(torch.load(path, weights_only=True))
    fitted = tmp_path / "fitted.pt"
    make(dm.model).fit(train, checkpoint=str(fitted), progress=False)
    with pytest.raises(ValueError, match="other training data"):
        make(dm.model).fit(red_images(8, 9)[0], checkpoint=str(fitted), progress=False)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a DiffMask checkpoint"):
        DiffMask.load(str(junk), dm.model)
    with pytest.raises(ValueError, match="no such file"):
        DiffMask.load(str(tmp_path / "missing.pt"), dm.model)


def test_dataloader_input():
    train, _ = red_images(16, 10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train, torch.zeros(16)), batch_size=8)
    dm = make()
    dm.fit(loader, epochs=2, progress=False)
    assert dm.step == 4 and len(dm.history) == 2


def test_bad_input(tmp_path):
    model = RedNet().eval()
    dm = make(model)
    with pytest.raises(ValueError, match="empty training set"):
        dm.fit(torch.zeros(0, 3, 32, 32), progress=False)
    with pytest.raises(ValueError, match="empty training set"):
        dm.fit([], progress=False)
    with pytest.raises(ValueError, match="DataLoader is empty"):
        dm.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 3, 32, 32))), progress=False)
    with pytest.raises(ValueError, match="must be 32 x 32"):
        dm.explain(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match="target class 2 is out of range"):
        dm.explain(torch.rand(1, 3, 32, 32), targets=2)
    with pytest.raises(ValueError, match="val_images"):
        dm.fit(torch.rand(2, 3, 32, 32), val_images=torch.rand(2, 3, 16, 16), progress=False)
    with pytest.raises(ValueError, match="multiple of patch"):
        make(model, image_size=30)
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        make(model, eps=0)
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        make(model, damping=-1.0)
    with pytest.raises(ValueError, match="not modules of the model"):
        make(model, layers=["nope"])
    with pytest.raises(ValueError, match="checkpoint: the folder"):
        dm.fit(torch.rand(2, 3, 32, 32), checkpoint=str(tmp_path / "no" / "dm.pt"), progress=False)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        dm.fit(torch.rand(2, 3, 32, 32), epochs=0, progress=False)
    with pytest.raises(ValueError, match="same model"):
        DiffMask(model, strategy=get_strategy("black", RedNet(), **PIXEL), patch=8, image_size=32)
    with pytest.raises(ValueError, match="takes hard 0/1 masks only"):  # layer masking built without soft=True
        explain_diffmask(get_strategy("layer", model), torch.rand(3, 32, 32), patch=8, steps=1)
    with pytest.raises(ValueError, match="multiples of patch"):
        explain_diffmask(get_strategy("black", model, **PIXEL), torch.rand(3, 30, 32), patch=8, steps=1)
    with pytest.raises(ValueError, match=r"budget must be one of \('both', 'samples'\), got 'det'"):
        make(model, budget="det")
    with pytest.raises(ValueError, match="budget must be one of"):
        explain_diffmask(get_strategy("black", model, **PIXEL), torch.rand(3, 32, 32), patch=8, steps=1, budget=None)


def test_budget_both_constrains_the_larger_of_the_samples_mean_and_the_deterministic_gates():
    from masked_ops.explain.diffmask import _budgeted_kl
    from masked_ops.explain.hard_concrete import deterministic_gate
    log_alpha = torch.tensor([[[[3.0, -3.0]]], [[[0.0, 0.5]]]], requires_grad=True)   # 2 images, 2 gates
    z = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]], [[[1.0, 1.0]]], [[[0.0, 0.0]]]])  # 2 samples per image
    seen = []

    def masked_kl(gates):            # a KL that grows with the number of shut gates (independent of the code)
        seen.append(gates.detach().clone())
        return (1 - gates).sum(dim=(1, 2, 3)) * torch.tensor([1.0, 10.0]).repeat(len(gates) // 2)

    samples, none = _budgeted_kl(masked_kl, z, log_alpha, 2, "samples")
    assert none is None
    # sample-major rows: image 0 sees z[0], z[2]; image 1 sees z[1], z[3]
    assert torch.allclose(samples, torch.tensor([(1 + 0) / 2, 10 * (1 + 2) / 2]))
    both, det_kl_out = _budgeted_kl(masked_kl, z, log_alpha, 2, "both")
    det = deterministic_gate(log_alpha).detach().clamp_min(0.01)
    assert torch.equal(seen[-1][4:], det)                      # the deterministic gates ran in the same forward
    det_kl = (1 - det).sum(dim=(1, 2, 3)) * torch.tensor([1.0, 10.0])
    assert torch.allclose(both, torch.maximum(samples, det_kl))
    assert torch.allclose(det_kl_out, det_kl) and not det_kl_out.requires_grad
    assert both[0] > samples[0] and both[1] == samples[1]       # image 0: the deterministic gates bind
    both.sum().backward()                                       # and pass gradient to the logits
    assert log_alpha.grad is not None and bool((log_alpha.grad[0] != 0).all())


# ----------------------------------------------------------------------------- the budget-meeting mask
def test_top_k_gates_keep_the_k_highest_scores():
    from masked_ops.explain.budget_mask import top_k_gates
    scores = torch.tensor([[[[0.5, 2.0], [2.0, -1.0]]], [[[3.0, 1.0], [0.0, 2.0]]]])
    gates = top_k_gates(scores, torch.tensor([1, 3]))
    assert torch.equal(gates, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 1.0]]]]))  # tie: first


@pytest.mark.parametrize("monotone", [True, False])
def test_smallest_sufficient_finds_the_smallest_k_by_bisection(monotone):
    """Against a brute force over every k, with a KL defined here: 0.3 per 'needed' patch left out
    (monotone in k along the ranking), or that plus a bump at some k (not monotone: the k returned must
    still meet the budget)."""
    from masked_ops.explain.budget_mask import smallest_sufficient
    g = torch.Generator().manual_seed(0)
    b, n, eps = 5, 20, 0.5
    scores = torch.randn(b, 1, 4, 5, generator=g)
    needed = torch.rand(b, n, generator=g) < 0.4
    calls = []

    def kl_of(kept_flat, i):
        k = int(kept_flat.sum())
        bump = 2.0 if (not monotone and k == 11) else 0.0
        return 0.3 * float((needed[i] & ~kept_flat).sum()) + bump

    def masked_kl(gates):
        calls.append(1)
        flat = gates.flatten(1) > 0.5
        return torch.tensor([kl_of(flat[i], i) for i in range(len(gates))])

    gates, kept, kl = smallest_sufficient(masked_kl, scores, eps)
    assert len(calls) <= 6  # ceil(log2(21)) bisection steps, and at most one measurement of k = N
    for i in range(b):
        order = sorted(range(n), key=lambda j: (-float(scores[i].flatten()[j]), j))
        def top(k):
            t = torch.zeros(n, dtype=torch.bool)
            t[order[:k]] = True
            return t
        k = round(float(kept[i]) * n)
        assert torch.equal(gates[i].flatten() > 0.5, top(k))
        assert kl_of(top(k), i) <= eps and abs(float(kl[i]) - kl_of(top(k), i)) < 1e-6
        if monotone:
            assert k == min(j for j in range(n + 1) if kl_of(top(j), i) <= eps)


def test_per_image_calibrated_mask_is_one_patch_on_the_square():
    model = RedNet().eval()
    images, where = red_images(2, 4)
    for k in range(2):
        exp = explain_diffmask(get_strategy("black", model, **PIXEL), images[k], patch=8, steps=150, lr=0.2,
                               calibrate=True, progress=False)
        cal = exp.info["calibrated"]
        assert cal["kept"] == 1 / 16 and cal["kl"] <= 0.1 and cal["mask"].shape == (32, 32)
        y, x = where[k]
        assert bool(cal["mask"][y:y + 6, x:x + 6].any())  # the kept patch shows part of the square


def test_per_image_keeps_the_best_iterate_that_met_the_budget():
    """The L0 term alone (lambda stuck near 0) shuts every gate, so the last iterate breaks the budget;
    keep_best returns the sparsest earlier iterate whose deterministic gates met it."""
    model = RedNet().eval()
    image = red_images(1, 7)[0][0]
    opts = dict(patch=8, steps=40, lr=1.0, eps=0.05, lagrange_init=0.0, lagrange_lr=1e-4, progress=False)
    strategy = get_strategy("black", model, **PIXEL)
    last = explain_diffmask(strategy, image, keep_best=False, **opts)
    assert last.info["kl"] > 0.05 and last.info["step"] == 40 and last.info["kl"] == last.info["last_kl"]
    best = explain_diffmask(strategy, image, **opts)
    assert best.info["kl"] <= 0.05 and best.info["step"] < 40 and best.info["last_kl"] == last.info["kl"]
    assert best.info["kept"] < 0.99  # a later iterate than the all-open start
    # The sparsest of all iterates within the budget, against the trajectory replayed here: a run of k steps
    # without keep_best ends at iterate k (the same draws: keep_best's checks draw no random numbers).
    feasible = []
    for k in range(1, 41):
        e = explain_diffmask(strategy, image, keep_best=False, **dict(opts, steps=k))
        if e.info["kl"] <= 0.05:
            feasible.append(e.info["kept"])
    assert feasible and abs(best.info["kept"] - min(feasible)) < 1e-6, (best.info["kept"], feasible)
    from masked_ops.explain.hard_concrete import deterministic_gate, gates_to_mask
    with torch.no_grad():  # the reported KL is the returned gates' own, measured here again
        clean = strategy(image[None], torch.ones(1, 1, 32, 32))
        again = kl_divergence(clean, strategy(image[None], gates_to_mask(
            deterministic_gate(best.info["log_alpha"][None, None]), 8)))
    assert abs(float(again) - best.info["kl"]) < 1e-6
