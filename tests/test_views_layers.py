"""Views beyond the penultimate layer (layers, gram), their detectors (mahalanobis-ml, gram), ODIN's eps
space and ELOC's per-member ODIN view.

The references here are independent of oodens' code: forward hooks registered by the test on modules it
names itself, Gram matrices as explicit matrix products, ODIN's step by autograd with the pixel tensor as
the leaf, the detectors as loops over samples and classes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch import nn

from oodens.archs import create_model
from oodens.archs.cnn import DigitsCNN
from oodens.archs.densenet import DenseNetBC
from oodens.archs.resnet import CifarResNet
from oodens.archs.t2t_vit import T2TViT
from oodens.archs.wrn import WideResNet
from oodens.data import get_benchmark, get_preset
from oodens.detectors import DETECTORS
from oodens.modes.discovery import discover_modes
from oodens.views.cache import ViewCache
from oodens.views.extract import extract
from oodens.views.kinds import VIEW_KINDS, gram_features, odin_view
from oodens.views.types import BASE, Views, ViewSpec

from reference import ref_mahalanobis

ORDERS = 3

# --------------------------------------------------------------------------- 1. the views on every architecture

#: tiny instances of every architecture family: (builder, input shape, the stage modules the test hooks
#: itself with, whether the network applies a functional ReLU to that output, whether it is a token matrix)
TINY = {
    "cnn": (lambda: DigitsCNN(6), (1, 8, 8), [("layer1", 0, 0), ("layer2", 0, 0), ("layer3", 0, 0)]),
    "R18": (lambda: CifarResNet((1, 1, 1, 1), 10), (3, 32, 32),
            [("layer1", 0, 0), ("layer2", 0, 0), ("layer3", 0, 0), ("layer4", 0, 0)]),
    "R50": (lambda: create_model("R50", 10), (3, 64, 64),
            [("layer1", 0, 0), ("layer2", 0, 0), ("layer3", 0, 0), ("layer4", 0, 0)]),
    "DNBC100": (lambda: DenseNetBC(10, 10), (3, 32, 32), [("trans1", 0, 0), ("trans2", 0, 0), ("bn1", 1, 0)]),
    "DN121": (lambda: create_model("DN121", 10), (3, 64, 64),
              [("features.transition1", 0, 0), ("features.transition2", 0, 0), ("features.transition3", 0, 0),
               ("features.norm5", 1, 0)]),
    "WRN28X10": (lambda: WideResNet(10, 1, 0.0, 10), (3, 32, 32), [("layer1", 0, 0), ("layer2", 0, 0), ("bn1", 1, 0)]),
    "T2T-ViT-14": (lambda: T2TViT(10, img_size=32, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16),
                   (3, 32, 32), [("blocks.0", 0, 1), ("blocks.1", 0, 1)]),
}


def hooked_maps(model, x, layers):
    """logits of model(x) and the maps of the named modules, captured by the test's own hooks."""
    outs = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: outs.__setitem__(name, o.detach().clone())) for name, _, _ in layers]
    with torch.no_grad():
        z = model(x)
    for h in handles:
        h.remove()
    maps = []
    for name, relu, tokens in layers:
        a = outs[name].transpose(1, 2) if tokens else outs[name]
        maps.append(torch.relu(a) if relu else a)
    return z, maps


def ref_gram(a: torch.Tensor, orders: int) -> np.ndarray:
    """(B, P, C): for each order p, the row sums of F^p F^p^T (explicit matmul), signed p-th root."""
    f = a.double().reshape(a.shape[0], a.shape[1], -1)
    out = []
    for p in range(1, orders + 1):
        fp = f**p
        s = torch.matmul(fp, fp.transpose(1, 2)).sum(dim=2)
        out.append(torch.sign(s) * torch.abs(s) ** (1 / p))
    return torch.stack(out, dim=1).numpy()


@pytest.mark.parametrize("arch", list(TINY))
def test_layer_and_gram_views_match_hooks(arch):
    build, shape, layers = TINY[arch]
    torch.manual_seed(0)
    model = build().eval()
    assert [layer.module for layer in model.feature_layers] == [name for name, _, _ in layers]
    x = torch.randn(2, *shape)
    z, maps = hooked_maps(model, x, layers)
    preset = get_preset("cifar")
    pooled = VIEW_KINDS["layers"](model, x, preset)
    gram = VIEW_KINDS["gram"](model, x, preset, orders=ORDERS)
    assert sorted(pooled) == sorted(gram) == [f"layer{i:02d}" for i in range(len(layers))]
    for i, m in enumerate(maps):
        ref = m.double().reshape(m.shape[0], m.shape[1], -1).mean(dim=2).numpy()
        np.testing.assert_allclose(pooled[f"layer{i:02d}"].double().numpy(), ref, rtol=1e-5, atol=1e-6)
        got = gram[f"layer{i:02d}"].numpy()
        assert got.shape == (2, ORDERS, m.shape[1])
        np.testing.assert_allclose(got, ref_gram(m, ORDERS), rtol=1e-9, atol=1e-12)
    base = VIEW_KINDS["base"](model, x, preset)
    torch.testing.assert_close(base["logits"], z)
    if arch != "T2T-ViT-14":  # a convolutional network's penultimate features pool its last stage map
        torch.testing.assert_close(pooled[f"layer{len(layers) - 1:02d}"], base["features"], rtol=1e-5, atol=1e-6)


def test_gram_features_float64_survive_large_activations():
    a = torch.full((1, 2, 3, 3), 50.0)  # 50^20 overflows float32
    got = gram_features(a, 10).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref_gram(a, 10), rtol=1e-12)


# --------------------------------------------------------------------------- 2. one forward pass, cache keys


def _sources():
    b = get_benchmark("digits")
    return b, [b.id_train, b.id_test, b.ood["letters"]]


def _count_forward(monkeypatch):
    calls = {"n": 0}
    real = DigitsCNN.forward_features

    def counting(self, x):
        calls["n"] += 1
        return real(self, x)

    monkeypatch.setattr(DigitsCNN, "forward_features", counting)
    return calls


LAYERS, GRAM = ViewSpec.of("layers"), ViewSpec.of("gram", orders=ORDERS)


def test_extra_views_add_no_forward_pass_and_match_the_network(two_modes, tmp_path, monkeypatch):
    b, _ = _sources()
    sources = [b.id_test, b.ood["letters"]]
    modes = discover_modes(two_modes)
    n_batches = sum(-(-len(s) // 64) for s in sources) * len(modes)
    calls = _count_forward(monkeypatch)
    base_only = extract(modes, sources, ViewCache(tmp_path / "a"), batch_size=64)
    assert calls["n"] == n_batches and base_only.computed == 2 * len(modes)
    calls["n"] = 0
    ex = extract(modes, sources, ViewCache(tmp_path / "b"), batch_size=64, specs=[LAYERS, GRAM])
    assert calls["n"] == n_batches, "base, layers and gram share one forward pass per batch"
    assert ex.computed == 6 * len(modes)
    calls["n"] = 0  # the base view cached, the layer views missing: still one pass, not two
    again = extract(modes, sources, ViewCache(tmp_path / "a"), batch_size=64, specs=[LAYERS, GRAM])
    assert calls["n"] == n_batches and (again.computed, again.cached) == (4 * len(modes), 2 * len(modes))
    monkeypatch.undo()
    preset = get_preset("digits")
    for m in modes:
        net = m.load()
        x = preset.normalize(torch.from_numpy(np.asarray(b.ood["letters"].arrays[0])))
        z, maps = hooked_maps(net, x, TINY["cnn"][2])
        v = ex.get(m.name, b.ood["letters"])
        np.testing.assert_allclose(v.logits, z.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(v.logits, base_only.get(m.name, b.ood["letters"]).logits)
        assert len(v) == len(x)
        for i, a in enumerate(maps):
            np.testing.assert_allclose(v.extra["layers"][f"layer{i:02d}"], a.mean(dim=(2, 3)).numpy(), rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_allclose(v.extra[GRAM.id][f"layer{i:02d}"], ref_gram(a, ORDERS), rtol=1e-5, atol=1e-6)


def test_cache_keys_differ_by_view_parameters(tmp_path):
    cache = ViewCache(tmp_path)
    ds, pre = {"name": "d", "split": "test"}, {"name": "p"}
    specs = [BASE, LAYERS, GRAM, ViewSpec.of("gram", orders=ORDERS + 1),
             ViewSpec.of("odin", temperature=1000.0, eps=0.0014, eps_space="normalized"),
             ViewSpec.of("odin", temperature=1000.0, eps=0.0014, eps_space="pixel"),
             ViewSpec.of("odin", temperature=1000.0, eps=0.002, eps_space="pixel")]
    paths = [cache.path("a" * 64, ds, pre, s) for s in specs]
    assert len(set(paths)) == len(specs)
    assert DETECTORS["odin"]().view_specs()[0] == specs[4]  # default: normalized
    assert DETECTORS["odin"](eps_space="pixel").view_specs()[0] == specs[5]
    assert DETECTORS["gram"](orders=ORDERS).view_specs() == [GRAM]
    assert DETECTORS["mahalanobis-ml"]().view_specs() == [LAYERS]


def test_fit_views_reach_the_training_split_only_they(two_modes, tmp_path):
    b, sources = _sources()
    modes = discover_modes(two_modes)[:1]
    odin = DETECTORS["odin"]().view_specs()[0]
    ex = extract(modes, sources, ViewCache(tmp_path), batch_size=256, specs=[LAYERS, odin], base_only=[b.id_train])
    train, test = ex.get(modes[0].name, b.id_train), ex.get(modes[0].name, b.id_test)
    assert set(train.extra) == {"layers"} and set(test.extra) == {"layers", odin.id}
    again = extract(modes, sources, ViewCache(tmp_path), batch_size=256, specs=[LAYERS, GRAM, odin],
                    base_only=[b.id_train])
    assert again.computed == 3  # gram on each split; the rest cached
    assert set(again.get(modes[0].name, b.id_train).extra) == {"layers", GRAM.id}


# --------------------------------------------------------------------------- 3. the detectors, re-derived


def _layered(seed, n_train=160, n_test=50, widths=(5, 7), classes=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n_train)
    train = [rng.normal(size=(n_train, w)) + y[:, None] * 0.8 for w in widths]
    test = [rng.normal(size=(n_test, w)) * 1.5 for w in widths]
    return y, train, test


def test_multilayer_mahalanobis_is_the_sum_of_standardised_layer_scores():
    y, train, test = _layered(1)
    det = DETECTORS["mahalanobis-ml"]()

    def as_views(layers, **kw):
        return Views(extra={"layers": {f"layer{i:02d}": a for i, a in enumerate(layers)}}, **kw)

    det.fit(as_views(train, labels=y))
    ref = np.zeros(len(test[0]))
    for tr, te in zip(train, test):
        s_train = ref_mahalanobis(tr, y, tr)
        ref += (ref_mahalanobis(tr, y, te) - s_train.mean()) / s_train.std()
    np.testing.assert_allclose(det.score(as_views(test)), ref, rtol=1e-6)


def ref_gram_detector(train, z_train, test, z_test, holdout=0.1, seed=0):
    """Sastry & Oore's detector, sample by sample: per predicted class min/max of every feature on the
    ID training samples outside a seeded 10% hold-out, deviations / confidence, normalised per layer by
    the mean hold-out deviation (+1e-7)."""
    n = len(z_train)
    perm = np.random.default_rng(seed).permutation(n)
    val, rest = set(perm[: max(1, round(holdout * n))].tolist()), perm[max(1, round(holdout * n)):]
    pred_tr = z_train.argmax(1)

    def bounds(g):
        lo, hi = {}, {}
        for i in rest:
            c = pred_tr[i]
            lo[c] = np.minimum(lo.get(c, np.inf), g[i])
            hi[c] = np.maximum(hi.get(c, -np.inf), g[i])
        return lo, hi

    b = [bounds(g) for g in train]

    def deviations(layers, z, rows):
        out = []
        for i in rows:
            c, q = z[i].argmax(), softmax(z[i]).max()
            row = []
            for g, (lo, hi) in zip(layers, b):
                mn, mx = lo[c], hi[c]
                d = 0.0
                for v, a, bb in zip(g[i].ravel(), mn.ravel(), mx.ravel()):
                    d += max(a - v, 0) / abs(a + 1e-6) + max(v - bb, 0) / abs(bb + 1e-6)
                row.append(d / q)
            out.append(row)
        return np.array(out)

    norm = deviations(train, z_train, sorted(val)).mean(axis=0) + 1e-7
    return -(deviations(test, z_test, range(len(z_test))) / norm).sum(axis=1)


def test_gram_detector_matches_the_paper_by_loops():
    rng = np.random.default_rng(2)
    n, m, C = 120, 30, 3
    z_train, z_test = rng.normal(size=(n, C)) * 3, rng.normal(size=(m, C)) * 3
    train = [np.abs(rng.normal(size=(n, ORDERS, w))) for w in (4, 6)]
    test = [np.abs(rng.normal(size=(m, ORDERS, w))) * 1.3 for w in (4, 6)]

    def views(layers, z):
        return Views(logits=z, extra={GRAM.id: {f"layer{i:02d}": a for i, a in enumerate(layers)}})

    det = DETECTORS["gram"](orders=ORDERS).fit(views(train, z_train))
    np.testing.assert_allclose(det.score(views(test, z_test)), ref_gram_detector(train, z_train, test, z_test),
                               rtol=1e-9)


def test_layer_detectors_reject_other_layers():
    y, train, test = _layered(3)
    det = DETECTORS["mahalanobis-ml"]().fit(Views(labels=y, extra={"layers": {"layer00": train[0]}}))
    with pytest.raises(Exception, match="fitted on feature layers of shapes"):
        det.score(Views(extra={"layers": {"layer00": test[1]}}))


# --------------------------------------------------------------------------- 4. ODIN's eps space against autograd


class Tiny(nn.Module):
    """z = W relu(-conv(x)) + V x: inputs where the ReLU is off have a zero gradient through it unless the
    linear path sees them; the linear path sees channel 0 only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.w = nn.Linear(3 * 4 * 4, 5)
        self.v = nn.Linear(4 * 4, 5)

    def forward(self, x):
        return self.w(torch.relu(-x).flatten(1)) + self.v(x[:, 0].flatten(1))


def ref_odin(net, x_norm, preset, T, eps, space):
    """x_hat = x - eps * s(grad), s = sign with a zero gradient counted as +1, by autograd; in pixel space
    the leaf is the [0, 1] pixel tensor and the step is taken there."""
    mean = torch.tensor(preset.mean).view(1, -1, 1, 1)
    std = torch.tensor(preset.std).view(1, -1, 1, 1)
    leaf = (x_norm * std + mean if space == "pixel" else x_norm).detach().clone().requires_grad_(True)
    xn = (leaf - mean) / std if space == "pixel" else leaf
    z = net(xn)
    (g,) = torch.autograd.grad(F.cross_entropy(z / T, z.argmax(1)), leaf)
    s = torch.sign(g) + (g == 0).float()
    hat = (leaf - eps * s).detach()
    with torch.no_grad():
        return net((hat - mean) / std if space == "pixel" else hat), (g == 0)


@pytest.mark.parametrize("space", ["normalized", "pixel"])
def test_odin_view_matches_autograd_in_both_spaces_with_zero_gradient_as_plus_one(space):
    net, preset, T, eps = Tiny().eval(), get_preset("cifar"), 1000.0, 0.01
    x = -torch.rand(8, 3, 4, 4) - 0.1  # ReLU on: nonzero gradient everywhere...
    x[:, 1:, :2] = 1e-4  # ...but here (channels 1, 2: no linear path): ReLU off, gradient exactly 0
    ref, zero = ref_odin(net, x, preset, T, eps, space)
    assert zero.any() and not zero.all()
    got = odin_view(net, x, preset, temperature=T, eps=eps, eps_space=space)["logits"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the +1 rule is observable: with sign(0) = 0 those inputs would not move, and the logits would differ
    std = torch.tensor(preset.std).view(1, -1, 1, 1) if space == "pixel" else 1.0
    xl = x.clone().requires_grad_(True)
    z = net(xl)
    (g,) = torch.autograd.grad(F.cross_entropy(z / T, z.argmax(1)), xl)
    with torch.no_grad():
        plain_sign = net(x - eps * torch.sign(g) / std)
    assert (got - plain_sign).abs().max() > 1e-4


def test_normalized_eps_is_pixel_eps_times_std():
    preset = get_preset("digits")  # one channel: eps in normalised units = eps * std in pixel units
    torch.manual_seed(0)
    net = DigitsCNN(6).eval()
    x = preset.normalize(torch.from_numpy(np.asarray(get_benchmark("digits").ood["letters"].arrays[0][:16])))
    a = odin_view(net, x, preset, temperature=1000.0, eps=0.01, eps_space="normalized")["logits"]
    b = odin_view(net, x, preset, temperature=1000.0, eps=0.01 * preset.std[0], eps_space="pixel")["logits"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_odin_eps_space_is_validated():
    from oodens.errors import ParameterError

    with pytest.raises(ParameterError, match="eps_space=unit is not a perturbation space"):
        DETECTORS["odin"](eps_space="unit").validate()
    with pytest.raises(ParameterError, match="eps_space"):
        DETECTORS["eloc"](eps_space="unit").validate()


# --------------------------------------------------------------------------- 5. ELOC with its ODIN view


def _eloc_ref(zs, T):
    total = 0.0
    for z in zs:
        p = softmax(np.asarray(z, dtype=np.float64) / T, axis=1)
        total = total + p.max(1) + (p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    return total


def test_eloc_defaults_and_eps_zero_is_todays_unperturbed_score():
    det = DETECTORS["eloc"]()
    assert (det.temperature, det.eps, det.eps_space) == (1000.0, 0.002, "pixel")
    rng = np.random.default_rng(5)
    zs = [rng.normal(size=(20, c)) * 4 for c in (4, 5, 4)]
    plain = DETECTORS["eloc"](eps=0.0)
    assert plain.view_specs() == []
    np.testing.assert_allclose(plain.score_ensemble([Views(logits=z) for z in zs]), _eloc_ref(zs, 1000.0),
                               rtol=1e-12)


def test_eloc_reads_each_members_own_odin_view():
    """Two leave-out members of different widths: each one's perturbed logits come from its own gradient on
    its own outputs (kept classes); eloc scores those."""
    preset, T, eps = get_preset("cifar"), 1000.0, 0.002
    members = []
    for seed, width in ((0, 4), (1, 3)):
        torch.manual_seed(seed)
        members.append(nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, width)).eval())
    x = torch.randn(10, 3, 4, 4)
    det = DETECTORS["eloc"]()
    (spec,) = det.view_specs()
    assert dict(spec.params) == {"temperature": T, "eps": eps, "eps_space": "pixel"}
    views, refs = [], []
    for net in members:
        views.append(Views(logits=net(x).detach().numpy(), extra={
            spec.id: odin_view(net, x, preset, **dict(spec.params))["logits"].numpy()}))
        refs.append(ref_odin(net, x, preset, T, eps, "pixel")[0].numpy())
    got = det.score_ensemble(views)
    np.testing.assert_allclose(got, _eloc_ref(refs, T), rtol=1e-5)
    assert not np.allclose(got, DETECTORS["eloc"](eps=0.0).score_ensemble(views), rtol=1e-9)
