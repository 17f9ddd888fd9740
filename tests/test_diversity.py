"""SDDE diversity losses: each equals a naive per-sample, per-pair loop, and its gradient reaches every member."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from oodens.archs import create_model
from oodens.train.diversity import DIVERSITIES, adp, gradcam, input_grad, ncl, oe

N, B, C = 3, 5, 4


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def _pairs(n):
    return [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]


def _logits(seed=0, n=N, b=B, c=C):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, generator=g, dtype=torch.float64) for _ in range(n)]


def _labels(b=B, c=C):
    return torch.arange(b) % c


def test_ncl_equals_loop():
    zs, y = _logits(1), _labels()
    p = [F.softmax(z, 1) for z in zs]
    total = 0.0
    for b in range(B):
        pbar = sum(pn[b] for pn in p) / N
        for n in range(N):
            for m in range(N):
                if m != n:
                    total += float((p[n][b] - pbar) @ (p[m][b] - pbar))
    assert float(ncl(zs, y)) == pytest.approx(total / B, rel=1e-10, abs=1e-12)


def test_adp_equals_loop():
    zs, y = _logits(2), _labels()
    p = [F.softmax(z, 1) for z in zs]
    total = 0.0
    for b in range(B):
        pbar = sum(pn[b] for pn in p) / N
        h = -sum(float(pbar[c]) * math.log(float(pbar[c])) for c in range(C))
        rest = []
        for n in range(N):
            v = torch.stack([p[n][b, c] for c in range(C) if c != int(y[b])])
            rest.append(v / v.norm())
        gram = torch.tensor([[float(rest[i] @ rest[j]) for j in range(N)] for i in range(N)], dtype=torch.float64)
        log_det = math.log(float(torch.det(gram + 1e-5 * torch.eye(N, dtype=torch.float64))))
        total += -2.0 * h - 0.5 * log_det
    assert float(adp(zs, y)) == pytest.approx(total / B, rel=1e-8)


def test_oe_equals_loop():
    zs = _logits(3, b=7)
    ref = 0.0
    for z in zs:
        per = [math.log(sum(math.exp(float(v)) for v in row)) - float(row.mean()) for row in z]
        ref += sum(per) / len(per)
    assert float(oe(zs)) == pytest.approx(ref / N, rel=1e-10)


def _standardised(v):
    m = sum(float(t) for t in v) / len(v)
    s = math.sqrt(sum((float(t) - m) ** 2 for t in v) / len(v))
    return torch.tensor([(float(t) - m) / (s + 1e-8) for t in v], dtype=torch.float64)


def test_gradcam_equals_loop():
    g = torch.Generator().manual_seed(4)
    maps = [torch.randn(B, 3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(N)]
    heads = [torch.randn(3 * 30, C, generator=g, dtype=torch.float64) for _ in range(N)]
    zs = [torch.tanh(a).flatten(1) @ w for a, w in zip(maps, heads)]  # any differentiable head
    y = _labels()
    cams = []
    for a, z in zip(maps, zs):
        out = sum(z[b, int(y[b])] for b in range(B))
        (grad,) = torch.autograd.grad(out, a, retain_graph=True)
        per_sample = []
        for b in range(B):
            cam = torch.zeros(5, 6, dtype=torch.float64)
            for k in range(3):
                cam += float(grad[b, k].mean()) * a[b, k].detach()
            cam = torch.clamp(cam, min=0)[1:-1, 1:-1].flatten()
            per_sample.append(_standardised(cam))
        cams.append(per_sample)
    ref = sum(_cos(cams[n][b], cams[m][b]) for b in range(B) for n, m in _pairs(N)) / (B * N * (N - 1))
    assert float(gradcam(maps, zs, y).detach()) == pytest.approx(ref, rel=1e-8, abs=1e-10)


def test_input_grad_equals_loop():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    heads = [torch.randn(18, C, generator=g, dtype=torch.float64) for _ in range(N)]
    zs = [torch.sin(x).flatten(1) @ w for w in heads]
    y = _labels()
    grads = []
    for z in zs:
        (gx,) = torch.autograd.grad(sum(z[b, int(y[b])] for b in range(B)), x, retain_graph=True)
        grads.append(gx.flatten(1))
    ref = sum(_cos(grads[n][b], grads[m][b]) for b in range(B) for n, m in _pairs(N)) / (B * N * (N - 1))
    assert float(input_grad(x, zs, y).detach()) == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("name", sorted(DIVERSITIES))
def test_gradient_reaches_every_member(name):
    """L_div alone (no CE) gives every member's parameters a non-zero gradient."""
    torch.manual_seed(0)
    members = [create_model("cnn", 6).train() for _ in range(3)]
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 6
    div = DIVERSITIES[name]
    x_out = torch.rand(8, 1, 8, 8) if div.uses_outliers else None
    logits, loss = div.loss(members, x, y, x_out)
    assert [z.shape for z in logits] == [(8, 6)] * 3  # the ID batch's logits, for the CE term
    assert torch.isfinite(loss)
    loss.backward()
    for i, m in enumerate(members):
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), f"{name}: member {i} got no gradient"


@pytest.mark.parametrize("name", ["gradcam", "input-grad", "ncl", "adp"])
def test_a_diversity_term_is_its_formula_on_the_members_outputs(name):
    """``loss`` runs the members as the formula needs and hands it their outputs: the same value as the
    formula on outputs computed by hand."""
    torch.manual_seed(1)
    members = [create_model("cnn", 6) for _ in range(2)]
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    logits, term = DIVERSITIES[name].loss(members, x, y)
    if name == "gradcam":
        stages = [m.rankfeat_stages(x) for m in members]
        expected = gradcam([a for a, _ in stages], [m.logits_from_last_stage(last) for m, (_, last) in
                                                    zip(members, stages)], y)
    elif name == "input-grad":
        xg = x.clone().requires_grad_(True)
        expected = input_grad(xg, [m(xg) for m in members], y)
    else:
        expected = {"ncl": ncl, "adp": adp}[name]([m(x) for m in members], y)
    assert all(torch.equal(z, m(x)) for z, m in zip(logits, members))
    assert torch.equal(term, expected)


def test_outlier_exposure_reads_the_outlier_rows_of_one_pass():
    torch.manual_seed(2)
    members = [create_model("cnn", 6) for _ in range(2)]
    x, x_out, y = torch.randn(4, 1, 8, 8), torch.rand(3, 1, 8, 8), torch.arange(4)
    logits, term = DIVERSITIES["oe"].loss(members, x, y, x_out)
    both = [m(torch.cat([x, x_out])) for m in members]
    assert all(torch.equal(z, b[:4]) for z, b in zip(logits, both))
    assert torch.equal(term, oe([b[4:] for b in both]))


def test_default_lambdas():
    assert {n: d.default_lambda for n, d in DIVERSITIES.items()} == {
        "gradcam": 0.005, "input-grad": 0.005, "ncl": 0.1, "adp": 0.1, "oe": 0.5}
