"""Detectors with per-class fitted state on class-masked sets (ImageNet-A/R: 200 of ImageNet-1k's classes).

``mask_views`` restricts a set to its kept classes (logits z[:, kept], W[kept], b[kept]) and records them as
``Views.kept``; each detector whose fit learns one entry per class (fitted on the full-width ID train) restricts
that state to the kept classes as its docstring says. Each score here is checked against a naive numpy
re-derivation (loops over samples and classes) of the detector's formula on the restricted model, with the
full-train state restricted as documented; then an Experiment with a class-masked set scores every such
detector instead of skipping it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import oodens
from oodens.data.sources import ArraySource
from oodens.detectors import DETECTORS
from oodens.ensemble.evaluate import mask_views
from oodens.errors import OodensError
from oodens.views.types import Views, ViewSpec

C, D, P = 10, 16, 3
KEPT = np.array([1, 4, 7, 8])
TINY = np.finfo(np.float64).tiny
#: the detectors whose fitted state has one entry per class (neco only with maxlogit: its logits' width)
PER_CLASS = ["tempscale", "klm", "openmax", "she", "nnguide", "relation", "gram", "vim", "dice", "react-dice"]


# --------------------------------------------------------------------------- data


def gram_view(h: np.ndarray) -> dict[str, np.ndarray]:
    """Toy gram features (n, P, C_l) of two layers, from the features."""
    g0 = np.stack([np.abs(h[:, : D // 2]) ** (1.0 / (p + 1)) for p in range(P)], axis=1)
    g1 = np.stack([h * (p + 1) for p in range(P)], axis=1)
    return {"layer00": g0, "layer01": g1}


GRAM_ID = ViewSpec.of("gram", orders=P).id


@pytest.fixture(scope="module")
def data():
    """(train, test) views of one member: class clusters seen through a linear head, the test set half ID-like,
    half a broad blob; features float32, logits = h W^T + b (float64)."""
    rng = np.random.default_rng(5)
    centres = rng.gamma(1.0, 1.5, (C, D))
    w = 0.5 * centres + 0.05 * rng.normal(size=(C, D))  # about a nearest-centre head: -||h - centre||^2 / 4
    b = -0.25 * (centres**2).sum(axis=1) + rng.normal(0.0, 0.3, C)

    def views(n, ood_half):
        y = np.arange(n) % C
        h = np.abs(centres[y] + 0.7 * rng.normal(size=(n, D)))
        if ood_half:
            h[n // 2 :] = np.abs(rng.normal(0.0, 2.5, (n - n // 2, D)))
        h = h.astype(np.float32)
        return Views(logits=h.astype(np.float64) @ w.T + b, features=h, labels=y, weight=w, bias=b,
                     extra={GRAM_ID: gram_view(h.astype(np.float64))})

    return views(400, False), views(60, True)


#: hyperparameters for these small data (the others: the detectors' defaults)
PARAMS = {"nnguide": {"k": 10}, "gram": {"orders": P}}


def fitted(name, train, **params):
    det = DETECTORS[name](**{**PARAMS.get(name, {}), **params})
    return det.fit_splits(train, train)


def masked(test):
    return mask_views(test, KEPT, labels_are_positions=False)


def lse(x):
    x = np.asarray(x, dtype=np.float64)
    m = max(x)
    return m + np.log(sum(np.exp(v - m) for v in x))


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - max(x))
    return e / e.sum()


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / (np.linalg.norm(v) + 1e-10)


# --------------------------------------------------------------------------- the masked views


def test_mask_views_records_the_kept_classes_and_composes(data):
    _, test = data
    assert test.kept is None
    m = masked(test)
    np.testing.assert_array_equal(m.kept, KEPT)
    np.testing.assert_array_equal(m.logits, test.logits[:, KEPT])
    np.testing.assert_array_equal(m.weight, test.weight[KEPT])
    twice = mask_views(m, [0, 2], labels_are_positions=False)  # a mask of a masked set: indices into its columns
    np.testing.assert_array_equal(twice.kept, KEPT[[0, 2]])
    np.testing.assert_array_equal(twice.logits, test.logits[:, KEPT[[0, 2]]])
    with pytest.raises(OodensError, match="leave-out members"):
        mask_views(Views(logits=test.logits, classes=np.arange(C)), KEPT)


@pytest.mark.parametrize("name", PER_CLASS)
def test_every_class_kept_scores_as_the_full_head(data, name):
    train, test = data
    det = fitted(name, train)
    all_kept = mask_views(test, np.arange(C), labels_are_positions=False)
    np.testing.assert_allclose(det.score(all_kept), det.score(test), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", PER_CLASS)
def test_kept_classes_outside_the_fitted_head_are_one_error(data, name):
    train, test = data
    det = fitted(name, train)
    bad = masked(test)
    bad.kept = np.array([1, 4, 7, C + 2])
    with pytest.raises(OodensError, match=f"fitted on {C} classes, but these class-masked views keep class {C + 2}"):
        det.score(bad)


# --------------------------------------------------------------------------- naive re-derivations


def test_tempscale_divides_the_kept_logits_by_the_same_temperature(data):
    train, test = data
    det = fitted("tempscale", train)
    t = det.temperature_
    want = [max(softmax([row[c] / t for c in KEPT])) for row in test.logits]
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-12)


def test_klm_scores_against_the_kept_templates_renormalised(data):
    train, test = data
    z = train.logits
    pred = z.argmax(axis=1)
    templates = {}
    for c in range(C):  # the full fit: mean softmax of the ID-train samples predicted as c
        rows = [softmax(z[i]) for i in range(len(z)) if pred[i] == c]
        if rows:
            templates[c] = np.mean(rows, axis=0)
    want = []
    for row in test.logits:
        p = softmax([row[c] for c in KEPT])
        kls = []
        for c in KEPT:
            if c not in templates:
                continue
            d = np.array([max(templates[c][j], TINY) for j in KEPT])
            d = d / d.sum()  # the template conditioned on the kept classes
            kls.append(sum(p[j] * np.log(p[j] / d[j]) for j in range(len(KEPT))))
        want.append(-min(kls))
    np.testing.assert_allclose(fitted("klm", train).score(masked(test)), want, rtol=1e-9)


def test_openmax_revises_the_kept_logits_with_the_kept_classes_mavs_and_weibulls(data):
    train, test = data
    det = fitted("openmax", train)
    z, y = train.logits, train.labels
    for c in range(C):  # the full fit's MAVs: mean logit vector of the correctly classified samples of c
        mav = np.mean([z[i] for i in range(len(z)) if z[i].argmax() == c == y[i]], axis=0)
        np.testing.assert_allclose(det.mavs_[c], mav, rtol=1e-12)
    t_shift = 10000.0
    want = []
    for row in test.logits:
        v = np.array([row[c] for c in KEPT])
        alpha = min(det.alpha, len(KEPT))
        ranked = sorted(range(len(KEPT)), key=lambda j: -v[j])[:alpha]
        revised, unknown = v.copy(), 0.0
        for r, j in enumerate(ranked, start=1):
            cls = KEPT[j]
            mav = np.array([det.mavs_[cls][c] for c in KEPT])
            cos = v @ mav / (np.linalg.norm(v) * np.linalg.norm(mav))
            dist = det.eu_weight * np.linalg.norm(v - mav) + (1 - cos)
            t = (dist - det.tail_min_[cls]) / t_shift + 1.0  # libMR's shifted tail, over T
            w_score = 1 - np.exp(-((t / np.exp(det.log_scale_[cls])) ** det.shape_[cls]))
            new = v[j] * (1 - (alpha + 1 - r) / alpha * w_score)
            unknown += v[j] - new
            revised[j] = new
        want.append(-np.exp(unknown) / (np.exp(unknown) + np.exp(revised).sum()))
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-9, atol=1e-15)


def test_she_reads_the_kept_classes_patterns(data):
    train, test = data
    z, h, y = train.logits, train.features.astype(np.float64), train.labels
    patterns = {c: np.mean([h[i] for i in range(len(h)) if z[i].argmax() == c == y[i]], axis=0) for c in range(C)}
    want = []
    for row, f in zip(test.logits, test.features.astype(np.float64)):
        c = KEPT[int(np.argmax([row[k] for k in KEPT]))]
        want.append(f @ patterns[c])
    np.testing.assert_allclose(fitted("she", train).score(masked(test)), want, rtol=1e-9)


def test_nnguide_reweights_the_bank_with_the_kept_energies(data):
    train, test = data
    k = PARAMS["nnguide"]["k"]
    bank = [unit(f) * lse([row[c] for c in KEPT]) for row, f in zip(train.logits, train.features)]
    want = []
    for row, f in zip(test.logits, test.features):
        sims = sorted((unit(f) @ g for g in bank), reverse=True)[:k]
        want.append(lse([row[c] for c in KEPT]) * np.mean(sims))
    np.testing.assert_allclose(fitted("nnguide", train).score(masked(test)), want, rtol=1e-5)


def test_relation_uses_the_softmax_of_the_kept_logits_on_both_sides(data):
    train, test = data
    det = fitted("relation", train)
    bank = [(unit(f), softmax([row[c] for c in KEPT])) for row, f in zip(train.logits, train.features)]
    want, closest = [], np.inf
    for row, f in zip(test.logits, test.features):
        q, p = unit(f), softmax([row[c] for c in KEPT])
        total = 0.0
        for g, pi in bank:
            r = max(0.0, q @ g) * (p @ pi)
            closest = min(closest, abs(r - det.threshold))
            if r > det.threshold:
                total += r ** det.power
        want.append(total)
    assert closest > 1e-5  # no kernel value near the cut-off: float32 rounding cannot move an edge across it
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-5)


def test_gram_reads_the_kept_predictions_and_their_bounds(data):
    train, test = data
    det = fitted("gram", train)
    layers = [test.extra[GRAM_ID][k] for k in ("layer00", "layer01")]
    want = []
    for i, row in enumerate(test.logits):
        zk = [row[c] for c in KEPT]
        cls, q = KEPT[int(np.argmax(zk))], max(softmax(zk))
        total = 0.0
        for l, g in enumerate(layers):
            mn, mx = det.mins_[l][cls], det.maxs_[l][cls]
            dev = 0.0
            for p in range(g.shape[1]):
                for j in range(g.shape[2]):
                    x = g[i, p, j]
                    dev += max(mn[p, j] - x, 0) / abs(mn[p, j] + 1e-6) + max(x - mx[p, j], 0) / abs(mx[p, j] + 1e-6)
            total += dev / q / det.norm_[l]
        want.append(-total)
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-9)


def test_vim_keeps_the_feature_space_virtual_logit_against_the_kept_energy(data):
    train, test = data
    det = fitted("vim", train)
    np.testing.assert_allclose(det.u_, -np.linalg.pinv(train.weight) @ train.bias, rtol=1e-9)
    want = [lse([row[c] for c in KEPT]) - det.alpha_ * np.linalg.norm((f.astype(np.float64) - det.u_) @ det.ns_)
            for row, f in zip(test.logits, test.features)]
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-9)


@pytest.mark.parametrize("name", ["dice", "react-dice"])
def test_dice_keeps_the_kept_rows_of_the_sparsified_head(data, name):
    train, test = data
    det = fitted(name, train)
    h_tr = train.features.astype(np.float64)
    fbar = h_tr.mean(axis=0)
    contrib = fbar[None, :] * train.weight
    thr = np.percentile(contrib, det.p)  # over all C x D contributions of the full head
    clip = np.percentile(h_tr, det.react_p) if name == "react-dice" else np.inf
    want = []
    for f in test.features.astype(np.float64):
        f = np.minimum(f, clip)
        logits = [sum(f[d] * train.weight[c, d] for d in range(D) if contrib[c, d] > thr) + train.bias[c]
                  for c in KEPT]
        want.append(lse(logits))
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-9)


def test_neco_with_maxlogit_reads_the_kept_logits_max(data):
    train, test = data
    det = fitted("neco", train, maxlogit=True)
    plain = fitted("neco", train).score(test)
    want = [r * max(row[c] for c in KEPT) for r, row in zip(plain, test.logits)]
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-9)


def test_views_of_fewer_classes_that_do_not_say_which_are_still_refused(data):
    train, test = data
    det = fitted("dice", train)
    narrow = masked(test)
    narrow.kept = None
    with pytest.raises(OodensError, match="do not say which"):
        det.score(narrow)


# --------------------------------------------------------------------------- end to end


def test_an_experiment_with_a_class_masked_set_scores_every_per_class_detector(two_modes, tmp_path):
    """A covariate-shift set of the ID test images of classes 1, 3, 4 (labelled 0..2, positions in its kept
    list, as ImageNet-R's): every per-class detector is scored on it, none skipped."""
    kept = [1, 3, 4]
    bench = oodens.get_benchmark("digits", ood=["noise"])
    test = bench.id_test

    def build():
        x, y = test.arrays
        rows = np.isin(y, kept)
        return x[rows], np.searchsorted(kept, y[rows])

    bench.add_ood("digits-134", lambda: ArraySource("digits-134", "test", build), kind="shift")
    exp = oodens.Experiment(two_modes, bench, cache_dir=tmp_path / "cache", class_masks={"digits-134": kept})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # gram with 2 orders: its view costs a pass per order
        res = exp.evaluate([DETECTORS["gram"](orders=2) if n == "gram" else n for n in PER_CLASS],
                           skip_inapplicable=True)
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert not skipped, skipped
    scored = {r["detector"] for r in res.records if r["ood"] == "digits-134" and r["auroc"] is not None}
    assert scored == set(PER_CLASS)
    # the masked set's scores are the detector's on the restricted views (dice: the kept rows of its head)
    run = next(r for r in res.runs if r.settings["detector"] == "dice")
    v = exp.views()["seed-1000"]
    shifted = v.ood["digits-134"]
    assert shifted.weight.shape[0] == 3 and list(shifted.kept) == kept and v.test.weight.shape[0] == 6
    det = DETECTORS["dice"]().fit(v.train)
    w, b = np.asarray(det.weight_)[kept], np.asarray(det.bias_)[kept]
    want = [lse(f @ w.T + b) for f in np.asarray(shifted.features, dtype=np.float64)]
    np.testing.assert_allclose(run.scores["seed-1000"]["digits-134"], want, rtol=1e-9)


def test_nnguide_reweights_a_device_bank_as_an_array_bank(data, monkeypatch):
    """A bank held as a DeviceBank (float32 shards; on the CPU here) gives the masked scores of the array bank."""
    import torch

    import oodens.detectors.geometry as geometry_mod
    from oodens.detectors.feature import DeviceBank, build_bank

    train, test = data
    want = fitted("nnguide", train).score(masked(test))

    def on_devices(n, d, blocks, searched=True):
        if not searched:
            return build_bank(n, d, blocks, searched=False)
        return DeviceBank(n, d, blocks, [torch.device("cpu")] * 3, dtype=torch.float32)  # three shards

    monkeypatch.setattr(geometry_mod, "build_bank", on_devices)
    det = fitted("nnguide", train)
    assert isinstance(det.bank_, DeviceBank)
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-6)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds"])
def test_mahalanobis_seeks_the_nearest_kept_class(data, name):
    """mahalanobis / rmds on a masked set: the minimum over the kept classes' means, the shared covariance (and
    rmds' global Gaussian) as fitted on all classes; naive float64 computation with numpy's pseudo-inverse."""
    train, test = data
    det = fitted(name, train)
    h = np.asarray(train.features, dtype=np.float64)
    y = np.asarray(train.labels)
    means = np.array([h[y == c].mean(axis=0) for c in range(C)])
    cov = sum(np.outer(r, r) for r in h - means[y]) / len(h)
    P = np.linalg.pinv(cov)
    m0 = h.mean(axis=0)
    P0 = np.linalg.pinv(sum(np.outer(r, r) for r in h - m0) / len(h))
    want = []
    for q in np.asarray(test.features, dtype=np.float64):
        md = min(float((q - means[c]) @ P @ (q - means[c])) for c in KEPT)
        want.append(-md if name == "mahalanobis" else float((q - m0) @ P0 @ (q - m0)) - md)
    np.testing.assert_allclose(det.score(masked(test)), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    full = det.score(test)  # the unmasked set: over all classes (at least as near: a score at least as high)
    if name == "mahalanobis":
        assert np.all(full >= np.asarray(want) - 1e-9)


def test_multi_layer_mahalanobis_seeks_the_nearest_kept_class_in_each_layer():
    """mahalanobis-ml on a masked set: per layer the minimum over the kept classes' means (naive pinv, float64),
    standardised with the ID-train mean and std of the full-head layer scores, summed."""
    rng = np.random.default_rng(8)
    n, ncls, kept = 300, 6, [0, 2, 5]
    y = np.arange(n) % ncls
    lid = ViewSpec.of("layers").id

    def views(m, labels):
        f0 = (rng.normal(size=(m, 4)) + labels[:, None] * 0.8).astype(np.float32)
        f1 = (rng.normal(size=(m, 3)) - labels[:, None] * 0.5).astype(np.float32)
        z = rng.normal(size=(m, ncls))
        return Views(logits=z, labels=labels, extra={lid: {"layer00": f0, "layer01": f1}})

    train, test = views(n, y), views(40, np.arange(40) % ncls)
    det = DETECTORS["mahalanobis-ml"]().fit(train)

    def layer_score(f, fq, classes):
        h, q = np.asarray(f, np.float64), np.asarray(fq, np.float64)
        means = np.array([h[y == c].mean(axis=0) for c in range(ncls)])
        P = np.linalg.pinv(sum(np.outer(r, r) for r in h - means[y]) / n)
        return np.array([-min(float((x - means[c]) @ P @ (x - means[c])) for c in classes) for x in q])

    want = 0.0
    for name in ("layer00", "layer01"):
        f = train.extra[lid][name]
        full = layer_score(f, f, range(ncls))  # the ID-train scores the layer is standardised with
        want = want + (layer_score(f, test.extra[lid][name], kept) - full.mean()) / full.std()
    got = det.score(mask_views(test, kept, labels_are_positions=False))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_refit_strategies_carry_the_mask(data):
    """concat and mean-features (mahalanobis' and rmds' ensembles) keep the set's classes: the concatenated
    model's nearest class is a kept one, as each member's is; members with different masks are refused."""
    from oodens.ensemble.strategies import concat, mean_features

    _, test = data
    det = DETECTORS["mahalanobis"]()
    a, b = masked(test), masked(test)
    assert np.array_equal(concat([a, b], det).kept, KEPT) and np.array_equal(mean_features([a, b], det).kept, KEPT)
    assert concat([test, test], det).kept is None
    with pytest.raises(OodensError, match="keep different classes"):
        concat([a, mask_views(test, [0, 1], labels_are_positions=False)], det)
