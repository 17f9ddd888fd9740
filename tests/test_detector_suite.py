"""Detector suite: every score checked against an independent computation done here
(naive loops, torch autograd, explicit numpy), never against the package's own output.

DESIGN.md sections 5-6 give the formulas; references below follow them literally.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodens.archs import create_model
from oodens.data import get_benchmark, get_preset
from oodens.detectors import DETECTORS
from oodens.detectors.shaping import dice_mask
from oodens.detectors.subspace import vim_default_dim
from oodens.ensemble.evaluate import subsets
from oodens.errors import OodensError
from oodens.modes.checkpoints import load_weights, read_state_dict
from evaluation import evaluate_named, row
from oodens.ensemble.strategies import ensemble_scores
from oodens.metrics.ood import OOD_METRICS, ood_metrics
from oodens.views.kinds import odin_view, rankfeat_view, remove_rank1
from oodens.views.types import Views

REPO = Path(__file__).resolve().parents[1]
DICE_FIXTURE = REPO.parent / "shared" / "fixtures" / "dice-densenet-bc100-cifar10"


# --------------------------------------------------------------------------- helpers (independent references)


def lse_row(row) -> float:
    """logsumexp of one row by hand (max shift, python sum)."""
    m = max(float(v) for v in row)
    return m + math.log(sum(math.exp(float(v) - m) for v in row))


def energy_loop(z) -> np.ndarray:
    return np.array([lse_row(r) for r in np.asarray(z, dtype=np.float64)])


def softmax_row(row, T: float = 1.0) -> list[float]:
    vals = [float(v) / T for v in row]
    m = max(vals)
    e = [math.exp(v - m) for v in vals]
    s = sum(e)
    return [x / s for x in e]


def entropy_row(p) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def relclose(a, b, rtol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


# --------------------------------------------------------------------------- 1. gradnorm


def _gradnorm_autograd_single(h: np.ndarray, W: np.ndarray, b: np.ndarray, T: float) -> np.ndarray:
    """Reference: batch size 1, float64, L = sum_c -log_softmax(z/T)_c, score = sum |dL/dW|."""
    out = []
    for i in range(len(h)):
        Wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
        bt = torch.tensor(b, dtype=torch.float64)
        hi = torch.tensor(h[i : i + 1], dtype=torch.float64)
        z = hi @ Wt.T + bt
        loss = (-F.log_softmax(z / T, dim=1)).sum()
        (g,) = torch.autograd.grad(loss, Wt)
        out.append(float(g.abs().sum()))
    return np.array(out)


def _gradnorm_data(seed, n=12, D=20, C=7, scale=2.0):
    rng = np.random.default_rng(seed)
    h = np.abs(rng.normal(size=(n, D)))
    W = rng.normal(size=(C, D)) * scale / math.sqrt(D)
    b = rng.normal(size=C)
    return h, W, b


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gradnorm_matches_autograd_batch_size_one(T):
    h, W, b = _gradnorm_data(0)
    z = h @ W.T + b
    ref = _gradnorm_autograd_single(h, W, b, T)
    got = DETECTORS["gradnorm"](temperature=T).score(Views(logits=z, features=h))
    relclose(got, ref, 1e-5)


def test_gradnorm_default_temperature_is_one():
    h, W, b = _gradnorm_data(1)
    ref = _gradnorm_autograd_single(h, W, b, 1.0)
    relclose(DETECTORS["gradnorm"]().score(Views(logits=h @ W.T + b, features=h)), ref, 1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gradnorm_ensemble_mean_logits_matches_autograd(T):
    """L on z_bar = mean_n (W_n h_n + b_n); score = mean_n sum |dL/dW_n| (per sample)."""
    n_members, n, D, C = 3, 10, 16, 5
    data = [_gradnorm_data(10 + k, n=n, D=D, C=C) for k in range(n_members)]
    ref = []
    for i in range(n):
        Ws = [torch.tensor(W, dtype=torch.float64, requires_grad=True) for _, W, _ in data]
        zs = [torch.tensor(h[i : i + 1]) @ Wt.T + torch.tensor(b) for (h, _, b), Wt in zip(data, Ws)]
        z_bar = torch.stack(zs).mean(dim=0)
        loss = (-F.log_softmax(z_bar / T, dim=1)).sum()
        grads = torch.autograd.grad(loss, Ws)
        ref.append(float(np.mean([float(g.abs().sum()) for g in grads])))
    ref = np.array(ref)

    member_views = [Views(logits=h @ W.T + b, features=h) for h, W, b in data]

    def make():
        return DETECTORS["gradnorm"](temperature=T)

    fitted = [make().fit(v) for v in member_views]
    got = ensemble_scores("mean-logits", make, fitted, member_views, {"x": member_views})["x"]
    relclose(got, ref, 1e-5)


# --------------------------------------------------------------------------- 2. odin


def _member(seed: int):
    torch.manual_seed(seed)
    return create_model("cnn", 6).eval()


SHIPPED = REPO / "checkpoints" / "Digits" / "CNN"


def _shipped(name: str, fallback_seed: int):
    """A shipped trained digits mode when present (realistic logits and stage maps), else a seeded random one."""
    ckpt = SHIPPED / name / "checkpoint.pth.tar"
    if not ckpt.is_file():
        return _member(fallback_seed)
    return load_weights(create_model("cnn", 6), ckpt, "cnn").eval()


@pytest.fixture(scope="module")
def digits_preset():
    return get_preset("digits")


@pytest.fixture(scope="module")
def letters_pixels():
    x = get_benchmark("digits").ood["letters"].arrays[0][:16]
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _odin_reference(model, x_pix: torch.Tensor, preset, T: float, eps: float) -> torch.Tensor:
    """One sample at a time; the PIXEL tensor is the leaf and the perturbation is taken in [0, 1] space."""
    out = []
    for i in range(len(x_pix)):
        xp = x_pix[i : i + 1].detach().clone().requires_grad_(True)
        z = model(preset.normalize(xp))
        loss = F.cross_entropy(z / T, z.argmax(1))
        (g,) = torch.autograd.grad(loss, xp)
        x_hat = (xp - eps * torch.sign(g)).detach()
        with torch.no_grad():
            out.append(model(preset.normalize(x_hat)))
    return torch.cat(out)


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("T,eps", [(1000.0, 0.0014), (1.0, 0.01)])
def test_odin_view_matches_per_sample_pixel_space_reference(digits_preset, letters_pixels, T, eps, trained):
    model = _shipped("seed-1000", 0) if trained else _member(0)
    x = digits_preset.normalize(letters_pixels)
    ref = _odin_reference(model, letters_pixels, digits_preset, T, eps)
    got = odin_view(model, x, digits_preset, temperature=T, eps=eps)["logits"]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # the perturbation changed something (the test would be vacuous otherwise)
    with torch.no_grad():
        assert (got - model(x)).abs().max() > 1e-4


def test_odin_view_eps_zero_is_plain_logits(digits_preset, letters_pixels):
    model = _member(0)
    x = digits_preset.normalize(letters_pixels)
    with torch.no_grad():
        plain = model(x)
    got = odin_view(model, x, digits_preset, temperature=1000.0, eps=0.0)["logits"]
    assert torch.equal(got, plain)


def test_odin_view_no_parameter_grads_and_no_accumulation_across_members(digits_preset, letters_pixels):
    T, eps = 1000.0, 0.0014
    # trained members: the perturbation moves their logits by ~0.1, far above the tolerance,
    # so an accumulated (or otherwise wrong) gradient sign would show
    m1, m2 = _shipped("seed-1000", 0), _shipped("seed-1100", 1)
    x = digits_preset.normalize(letters_pixels)
    x_before = x.clone()
    # each member alone (fresh models), in the reference's own way
    ref1 = _odin_reference(_shipped("seed-1000", 0), letters_pixels, digits_preset, T, eps)
    ref2 = _odin_reference(_shipped("seed-1100", 1), letters_pixels, digits_preset, T, eps)
    # the two members in sequence, then again in the other order
    a1 = odin_view(m1, x, digits_preset, temperature=T, eps=eps)["logits"]
    a2 = odin_view(m2, x, digits_preset, temperature=T, eps=eps)["logits"]
    b2 = odin_view(m2, x, digits_preset, temperature=T, eps=eps)["logits"]
    b1 = odin_view(m1, x, digits_preset, temperature=T, eps=eps)["logits"]
    for m in (m1, m2):
        assert all(p.grad is None for p in m.parameters())
    assert x.grad is None
    assert torch.equal(x, x_before)
    torch.testing.assert_close(a1, ref1, atol=1e-4, rtol=0)
    torch.testing.assert_close(a2, ref2, atol=1e-4, rtol=0)
    assert torch.equal(a1, b1)
    assert torch.equal(a2, b2)
    # the members really differ, so "no accumulation" is not trivially true
    assert (a1 - a2).abs().max() > 1e-3


def test_odin_detector_score_is_max_softmax_over_T(digits_preset, letters_pixels):
    det = DETECTORS["odin"](temperature=1000, eps=0.0014)
    spec = det.view_specs()[0]
    assert spec.kind == "odin"
    assert dict(spec.params) == {"temperature": 1000.0, "eps": 0.0014, "eps_space": "normalized"}
    model = _shipped("seed-1000", 0)
    logits = odin_view(model, digits_preset.normalize(letters_pixels), digits_preset,
                       temperature=1000.0, eps=0.0014)["logits"].numpy()
    ref = np.array([max(softmax_row(r, 1000.0)) for r in logits])
    got = det.score(Views(extra={spec.id: logits}))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- 3. rankfeat


def remove_rank1_np(a: np.ndarray) -> np.ndarray:
    """Per sample: M (C, HW) minus s1 u1 v1^T from numpy's SVD."""
    a = np.asarray(a, dtype=np.float64)
    b, c, h, w = a.shape
    out = np.empty_like(a)
    for i in range(b):
        M = a[i].reshape(c, h * w)
        U, S, Vt = np.linalg.svd(M)
        out[i] = (M - S[0] * np.outer(U[:, 0], Vt[0])).reshape(c, h, w)
    return out


@pytest.mark.parametrize("shape", [(5, 8, 3, 4), (3, 6, 2, 2), (2, 4, 5, 5)])
def test_remove_rank1_exact_svd_matches_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(size=shape)
    ref = remove_rank1_np(a)
    got = remove_rank1(torch.tensor(a, dtype=torch.float32), power_iters=0).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    got64 = remove_rank1(torch.tensor(a), power_iters=0).numpy()
    np.testing.assert_allclose(got64, ref, atol=1e-10, rtol=0)


def test_remove_rank1_power_iteration_with_spectral_gap():
    """Dominant rank-1 part (s1 ~ 10-20) plus noise of size ~0.05: s2/s1 << 1, so 50
    power iterations converge to machine precision."""
    rng = np.random.default_rng(3)
    B, C, H, W = 6, 10, 3, 5
    a = np.empty((B, C, H, W))
    for i in range(B):
        u = rng.normal(size=C)
        v = rng.normal(size=H * W)
        u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
        s = rng.uniform(10, 20)
        a[i] = (s * np.outer(u, v) + 0.05 * rng.normal(size=(C, H * W))).reshape(C, H, W)
    ref = remove_rank1_np(a)
    got = remove_rank1(torch.tensor(a, dtype=torch.float32), power_iters=50).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def _trained_or_random_cnn():
    return _shipped("seed-1000", 0)


def test_remove_rank1_power_iteration_on_cnn_stage_maps(digits_preset, letters_pixels):
    """20 power iterations (RankFeat's fast variant) on real stage maps.

    Post-ReLU stage maps are non-negative, so their top singular value is well
    separated from the rest (Perron-Frobenius-like: the mean activation pattern
    dominates); the power-iteration error decays like (s2/s1)^(2*20). Measured on
    these maps (trained and random weights) the error is ~3e-8, i.e. float32 rounding.
    We ask for a relative Frobenius error of the residual map (M minus its rank-1 part)
    below 1e-3: a wide margin for other BLAS / platforms, while a wrong rank-1 part
    (a sign or transpose mistake, too few iterations on a small gap) gives errors of order 1e-1..1."""
    model = _trained_or_random_cnn()
    with torch.no_grad():
        second = model.layer2(model.layer1(digits_preset.normalize(letters_pixels)))
        last = model.layer3(second)
    for stage in (second, last):
        ref = remove_rank1_np(stage.numpy())
        got = remove_rank1(stage, power_iters=20).numpy().astype(np.float64)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < 1e-3, err


@pytest.mark.parametrize("trained", [False, True])
def test_rankfeat_view_and_detector_match_independent_computation(digits_preset, letters_pixels, trained):
    if trained:
        model = _trained_or_random_cnn()
    else:
        model = _member(2)
    x = digits_preset.normalize(letters_pixels)
    Wfc = model.fc.weight.detach().double().numpy()
    bfc = model.fc.bias.detach().double().numpy()
    with torch.no_grad():
        second = model.layer2(model.layer1(x))
        last = model.layer3(second)
        last_r = remove_rank1_np(last.numpy())
        second_r = remove_rank1_np(second.numpy())
        last_from_second = model.layer3(torch.tensor(second_r, dtype=torch.float32)).numpy().astype(np.float64)
    z_last = last_r.mean(axis=(2, 3)) @ Wfc.T + bfc
    z_second = last_from_second.mean(axis=(2, 3)) @ Wfc.T + bfc
    ref = (z_last + z_second) / 2

    got = rankfeat_view(model, x, digits_preset, power_iters=0)["logits"].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    det = DETECTORS["rankfeat"]()
    spec = det.view_specs()[0]
    assert spec.kind == "rankfeat" and dict(spec.params) == {"power_iters": 0}
    score = det.score(Views(extra={spec.id: got}))
    np.testing.assert_allclose(score, energy_loop(got), rtol=1e-9, atol=0)
    np.testing.assert_allclose(score, energy_loop(ref), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- 4. dice


def test_dice_mask_on_real_densenet_fixture():
    if not DICE_FIXTURE.is_dir():
        pytest.skip(f"DICE fixture not present at {DICE_FIXTURE}")
    state = read_state_dict(DICE_FIXTURE / "checkpoint_100.pth.tar")
    W = state["fc.weight"].double().numpy()
    assert W.shape == (10, 342)
    mean = np.load(DICE_FIXTURE / "train_feature_mean.npy")
    contrib = mean[None, :] * W
    threshold = np.percentile(contrib, 90)
    assert abs(threshold - 0.015367) < 5e-7
    mask = contrib > threshold
    assert mask.sum() == 342  # exactly 10% of the 3420 entries
    assert mask.sum(axis=1).tolist() == [39, 32, 36, 40, 38, 38, 31, 29, 26, 33]

    got_mask, got_threshold = dice_mask(mean, W, 90)
    assert np.array_equal(np.asarray(got_mask), mask)
    assert got_threshold == pytest.approx(threshold, rel=1e-12)
    # float32 weights (as stored) give the same mask
    got_mask32, _ = dice_mask(mean, state["fc.weight"].numpy(), 90)
    assert np.array_equal(np.asarray(got_mask32), mask)


@pytest.mark.parametrize("p", [90.0, 70.0])
def test_dice_detector_matches_hand_computation(p):
    rng = np.random.default_rng(4)
    n_train, n, D, C = 80, 25, 30, 6
    train_h = np.abs(rng.normal(size=(n_train, D))) * rng.uniform(0.2, 2.0, size=D)
    h = np.abs(rng.normal(size=(n, D))) * rng.uniform(0.2, 2.0, size=D)
    W = rng.normal(size=(C, D))
    b = rng.normal(size=C)

    mean = train_h.sum(axis=0) / n_train
    contrib = mean[None, :] * W
    M = contrib > np.percentile(contrib, p)
    assert M.sum() == round(C * D * (100 - p) / 100)
    Wm = W * M
    z = np.array([[sum(h[i, d] * Wm[c, d] for d in range(D)) + b[c] for c in range(C)] for i in range(n)])
    ref = energy_loop(z)

    det = DETECTORS["dice"](p=p).fit(Views(features=train_h, weight=W, bias=b))
    got = det.score(Views(features=h, weight=W, bias=b))
    relclose(got, ref, 1e-9)


# --------------------------------------------------------------------------- 5. react, ash, vim


@pytest.mark.parametrize("p", [90.0, 65.0])
def test_react_matches_hand_computation(p):
    rng = np.random.default_rng(5)
    train_h = np.maximum(rng.normal(size=(60, 24)), 0) * 2
    h = np.maximum(rng.normal(size=(20, 24)), 0) * 3
    W = rng.normal(size=(5, 24))
    b = rng.normal(size=5)
    c = np.percentile(train_h.ravel(), p)
    clipped = np.minimum(h, c)
    assert (h > c).any()  # clipping matters
    ref = energy_loop(clipped @ W.T + b)
    det = DETECTORS["react"](p=p).fit(Views(features=train_h, weight=W, bias=b))
    got = det.score(Views(features=h, weight=W, bias=b))
    relclose(got, ref, 1e-9)


def ash_s_loop(h: np.ndarray, p: float) -> np.ndarray:
    out = np.zeros_like(h, dtype=np.float64)
    D = h.shape[1]
    keep = D - int(round(D * p / 100))
    for i in range(len(h)):
        row = [float(v) for v in h[i]]
        order = sorted(range(D), key=lambda j: -row[j])
        s1 = sum(row)
        kept = order[:keep]
        s2 = sum(row[j] for j in kept)
        scale = math.exp(s1 / s2)
        for j in kept:
            out[i, j] = row[j] * scale
    return out


@pytest.mark.parametrize("p,D", [(90.0, 40), (65.0, 40), (90.0, 37), (65.0, 37), (70.0, 23)])
def test_ash_s_matches_loop(p, D):
    rng = np.random.default_rng(int(p) + D)
    n, C = 15, 4
    # scaled down so exp(s1/s2) stays moderate
    h = np.abs(rng.normal(size=(n, D))) * 0.3
    W = rng.normal(size=(C, D)) * 0.1
    b = rng.normal(size=C)
    shaped = ash_s_loop(h, p)
    keep = D - int(round(D * p / 100))
    assert ((shaped != 0).sum(axis=1) == keep).all()
    ref = energy_loop(shaped @ W.T + b)
    got = DETECTORS["ash"](p=p).score(Views(features=h, weight=W, bias=b))
    relclose(got, ref, 1e-9)


def _vim_data(seed=6, n_train=300, n=40, D=40, C=10):
    rng = np.random.default_rng(seed)
    # distinct per-direction scales: a well-separated spectrum (a well-defined principal subspace)
    A = rng.normal(size=(D, D)) * np.geomspace(3.0, 0.05, D)[:, None]
    train_h = np.maximum(rng.normal(size=(n_train, D)) @ A, 0)
    h = np.maximum(rng.normal(size=(n, D)) @ A * 1.3, 0)
    W = rng.normal(size=(C, D)) / math.sqrt(D)
    b = rng.normal(size=C)
    return train_h, h, W, b


def vim_reference(train_h, h, W, b, d):
    u = -np.linalg.pinv(W) @ b
    X = train_h - u
    cov = X.T @ X / len(X)
    eigvals, eigvecs = np.linalg.eig(cov)
    eigvals, eigvecs = np.real(eigvals), np.real(eigvecs)
    order = np.argsort(eigvals)[::-1]
    NS = eigvecs[:, order[d:]]
    train_res = np.linalg.norm(X @ NS, axis=1)
    train_z = train_h @ W.T + b
    alpha = train_z.max(axis=1).mean() / train_res.mean()
    res = np.linalg.norm((h - u) @ NS, axis=1)
    return energy_loop(h @ W.T + b) - alpha * res


@pytest.mark.parametrize("dim", [None, 7, 25])
def test_vim_matches_hand_computation(dim):
    train_h, h, W, b = _vim_data()
    D = train_h.shape[1]
    d = D // 2 if dim is None else dim
    ref = vim_reference(train_h, h, W, b, d)
    det = DETECTORS["vim"](dim=dim).fit(
        Views(logits=train_h @ W.T + b, features=train_h, weight=W, bias=b))
    got = det.score(Views(logits=h @ W.T + b, features=h, weight=W, bias=b))
    relclose(got, ref, 1e-6)


def test_vim_default_dim_rule():
    assert vim_default_dim(40) == 20
    assert vim_default_dim(41) == 20
    assert vim_default_dim(342) == 171
    assert vim_default_dim(767) == 383
    assert vim_default_dim(768) == 512
    assert vim_default_dim(1499) == 512
    assert vim_default_dim(1500) == 1000
    assert vim_default_dim(2048) == 1000
    # the default differs from a neighbouring explicit dim (so the D//2 rule is really used)
    train_h, h, W, b = _vim_data()
    tr = Views(logits=train_h @ W.T + b, features=train_h, weight=W, bias=b)
    ev = Views(logits=h @ W.T + b, features=h, weight=W, bias=b)
    default = DETECTORS["vim"]().fit(tr).score(ev)
    np.testing.assert_allclose(default, DETECTORS["vim"](dim=20).fit(tr).score(ev), rtol=1e-12, atol=0)
    assert not np.allclose(default, DETECTORS["vim"](dim=19).fit(tr).score(ev))


@pytest.mark.parametrize("dim", [40, 41, 0])
def test_vim_dim_out_of_range_raises(dim):
    train_h, _, W, b = _vim_data()
    with pytest.raises(OodensError):
        DETECTORS["vim"](dim=dim).fit(Views(logits=train_h @ W.T + b, features=train_h, weight=W, bias=b))


# --------------------------------------------------------------------------- 6. entropy, pds, mi, eloc


def _member_logits(seed, widths, n=20, scale=3.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, c)) * scale for c in widths]


def test_entropy_detector_loop():
    (z,) = _member_logits(7, [9])
    ref = np.array([-entropy_row(softmax_row(r)) for r in z])
    got = DETECTORS["entropy"]().score(Views(logits=z))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_pds_and_mi_loops():
    zs = _member_logits(8, [6, 6, 6])
    n, C = zs[0].shape
    pds_ref, mi_ref = [], []
    for i in range(n):
        ps = [softmax_row(z[i]) for z in zs]
        pds_ref.append(-sum(max(p[c] for p in ps) for c in range(C)))
        p_bar = [sum(p[c] for p in ps) / len(ps) for c in range(C)]
        mi_ref.append(-(entropy_row(p_bar) - sum(entropy_row(p) for p in ps) / len(ps)))
    views = [Views(logits=z) for z in zs]
    np.testing.assert_allclose(DETECTORS["pds"]().score_ensemble(views), pds_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(DETECTORS["mi"]().score_ensemble(views), mi_ref, rtol=1e-9, atol=1e-12)
    # through the strategy registry too
    for name, ref in (("pds", pds_ref), ("mi", mi_ref)):
        def make(name=name):
            return DETECTORS[name]()
        got = ensemble_scores("ensemble", make, [make() for _ in zs], views, {"x": views})["x"]
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("T", [1000.0, 1.0])
def test_eloc_loop_with_members_of_different_widths(T):
    zs = _member_logits(9, [8, 8, 9])
    ref = []
    for i in range(len(zs[0])):
        total = 0.0
        for z in zs:
            p = softmax_row(z[i], T)
            total += max(p) - entropy_row(p)
        ref.append(total)
    got = DETECTORS["eloc"](temperature=T, eps=0.0).score_ensemble([Views(logits=z) for z in zs])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_eloc_default_temperature_is_1000():
    zs = _member_logits(10, [5, 5])
    ref = [sum(max(p) - entropy_row(p) for p in (softmax_row(z[i], 1000.0) for z in zs)) for i in range(len(zs[0]))]
    np.testing.assert_allclose(DETECTORS["eloc"](eps=0.0).score_ensemble([Views(logits=z) for z in zs]), ref,
                               rtol=1e-9, atol=1e-12)


def test_disagreement_applies_to():
    msg = DETECTORS["eloc"].applies_to([{"name": "a"}, {"name": "b"}])
    assert isinstance(msg, str) and "kept_classes" in msg
    assert DETECTORS["eloc"].applies_to([{"name": "a", "kept_classes": [0, 1, 2]},
                                         {"name": "b", "kept_classes": [1, 2, 3]}]) is None
    for name in ("pds", "mi"):
        single = DETECTORS[name].applies_to([{"name": "a"}])
        assert isinstance(single, str) and single
        assert DETECTORS[name].applies_to([{"name": "a"}, {"name": "b"}]) is None


# --------------------------------------------------------------------------- 7. ensemble-size sweep


def _sweep_data(seed=11, n_members=4, C=5, D=12, n_train=60, n_id=40, n_ood=(35, 30)):
    rng = np.random.default_rng(seed)
    y_train = rng.integers(0, C, size=n_train)
    y_id = rng.integers(0, C, size=n_id)

    def views(n, labels, shift):
        out = []
        for _ in range(n_members):
            h = np.abs(rng.normal(size=(n, D)) + shift)
            z = rng.normal(size=(n, C)) * 2
            if labels is not None:
                z[np.arange(n), labels] += 2.0
            else:
                z -= shift
            out.append(Views(logits=z, features=h, labels=labels if labels is not None else -np.ones(n, int)))
        return out

    train = views(n_train, y_train, 0.0)
    id_test = views(n_id, y_id, 0.0)
    oods = {"ood-a": views(n_ood[0], None, 0.7), "ood-b": views(n_ood[1], None, 0.3)}
    return train, id_test, oods


def _hand_energy(members: list[Views]) -> np.ndarray:
    z_bar = sum(np.asarray(v.logits, dtype=np.float64) for v in members) / len(members)
    return energy_loop(z_bar)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _hand_knn(train: list[Views], query: list[Views], k: int) -> np.ndarray:
    bank = _unit(np.concatenate([_unit(v.features) for v in train], axis=1))
    q = _unit(np.concatenate([_unit(v.features) for v in query], axis=1))
    out = []
    for row in q:
        dists = sorted(float(np.sqrt(((row - t) ** 2).sum())) for t in bank)
        out.append(-dists[k - 1])
    return np.array(out)


@pytest.mark.parametrize("name,params", [("energy", {}), ("knn", {"k": 5})])
def test_ensemble_size_sweep_matches_explicit_subsets(name, params):
    train, id_test, oods = _sweep_data()
    names = ["m0", "m1", "m2", "m3"]
    run = evaluate_named(name, params, None, names, train, id_test, oods,
                            ensemble_sizes=[1, 2, 3, 4], max_subsets=100)
    assert run.strategy == ("mean-logits" if name == "energy" else "concat")
    rec = {(row(r), r["ood"]): r for r in run.records}

    def hand(sub) -> dict[str, np.ndarray]:
        tr = [train[i] for i in sub]
        sets = {"id": [id_test[i] for i in sub], **{o: [v[i] for i in sub] for o, v in oods.items()}}
        if name == "energy":
            return {key: _hand_energy(v) for key, v in sets.items()}
        return {key: _hand_knn(tr, v, params["k"]) for key, v in sets.items()}

    labels = id_test[0].labels
    for k in (1, 2, 3, 4):
        combos = list(itertools.combinations(range(4), k))
        per_subset = []
        accs = []
        for sub in combos:
            s = hand(sub)
            per_subset.append({o: ood_metrics(s["id"], s[o]) for o in oods})
            z_bar = sum(id_test[i].logits for i in sub) / k
            accs.append(float(np.mean(z_bar.argmax(axis=1) == labels)))
        for o in [*oods, "average"]:
            m_rec, s_rec = rec[(f"subsets-{k}-mean", o)], rec[(f"subsets-{k}-std", o)]
            assert m_rec["n_subsets"] == len(combos) == s_rec["n_subsets"]
            assert m_rec["k"] == k and m_rec["role"] == "subsets"
            for metric in OOD_METRICS:
                if o == "average":
                    vals = [np.mean([ps[x][metric] for x in oods]) for ps in per_subset]
                else:
                    vals = [ps[o][metric] for ps in per_subset]
                assert m_rec[metric] == pytest.approx(float(np.mean(vals)), abs=1e-9), (k, o, metric)
                if len(vals) > 1:
                    assert s_rec[metric] == pytest.approx(float(np.std(vals, ddof=1)), abs=1e-9), (k, o, metric)
                else:  # one subset (k = N): the std is undefined, stored as null
                    assert s_rec[metric] is None, (k, o, metric)
            assert m_rec["id_accuracy"] == pytest.approx(float(np.mean(accs)), abs=1e-12)
        if k == 4:
            for o in [*oods, "average"]:
                assert rec[("subsets-4-mean", o)]["n_subsets"] == 1
                for metric in OOD_METRICS:
                    assert rec[("subsets-4-std", o)][metric] is None  # one subset: undefined
                    assert rec[("subsets-4-mean", o)][metric] == pytest.approx(rec[("ensemble", o)][metric],
                                                                                abs=1e-12)
    # the 2-of-4 sweep is not trivially constant (otherwise std checks prove little)
    assert any(rec[("subsets-2-std", o)]["auroc"] > 0 for o in oods)
    # the ensemble row itself equals the hand-built all-member ensemble
    full = hand(tuple(range(4)))
    for o in oods:
        expected = ood_metrics(full["id"], full[o])
        for metric in OOD_METRICS:
            assert rec[("ensemble", o)][metric] == pytest.approx(expected[metric], abs=1e-9)


def test_subsets_sampling():
    a = subsets(10, 5, 20, seed=0)
    assert len(a) == 20
    assert len(set(a)) == 20
    for t in a:
        assert isinstance(t, tuple) and len(t) == 5
        assert list(t) == sorted(set(t))
        assert all(0 <= i < 10 for i in t)
    assert a == subsets(10, 5, 20, seed=0)
    assert subsets(5, 2, 100) == list(itertools.combinations(range(5), 2))
    assert subsets(4, 4, 100) == [(0, 1, 2, 3)]
    # exactly at the boundary comb(n, k) == max_subsets: all of them
    assert subsets(5, 2, 10) == list(itertools.combinations(range(5), 2))
