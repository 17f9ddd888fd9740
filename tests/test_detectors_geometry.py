"""rmds, residual, neco, nci, fdbd, she, nnguide, relation against naive numpy re-derivations of their papers'
formulas written here (loops per sample and class, np.linalg.pinv, sklearn's StandardScaler and PCA), member
by member and as ensembles under every strategy each detector declares.

float64 paths are checked at rtol 1e-9; the float32 banks of nnguide and relation at rtol 1e-5. Where a score
is discontinuous (argmax predictions, relation's edge cut-off) the test data are checked to stay clear of the
discontinuity, so the result does not depend on one CPU's rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import oodens.detectors.feature as feature_mod
import oodens.detectors.geometry as geometry_mod
from oodens.detectors import DETECTORS, ParameterError
from oodens.ensemble.strategies import ensemble_scores
from oodens.errors import OodensError
from oodens.views.types import Views

NEW = ["rmds", "residual", "neco", "nci", "fdbd", "she", "nnguide", "relation"]
C, D = 4, 8


# --------------------------------------------------------------------------- data


def _views(h, y, w, b):
    return Views(logits=h.astype(np.float64) @ w.T + b, features=h, labels=y, weight=w, bias=b)


def members(n_members=3, seed=8, n_train=240, n_test=60):
    """Members (train, test) views of the same samples: a shared latent per sample (class clusters for the
    ID samples, a broad blob for the second half of the test set), seen through a different linear map and
    head per member. Features float32, logits = h W^T + b. Seed 8: no relation kernel value of these data lies
    within 1e-6 of relation's cut-off 0.03 (float32 rounding could move an edge across it; ref_relation checks)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 2.5, (C, D))
    y_tr = np.arange(n_train) % C
    y_te = np.arange(n_test) % C
    lat_tr = centres[y_tr] + rng.normal(size=(n_train, D))
    lat_te = centres[y_te] + rng.normal(size=(n_test, D))
    lat_te[n_test // 2 :] = rng.normal(0.0, 3.0, (n_test - n_test // 2, D))
    out = []
    for _ in range(n_members):
        a = np.eye(D) + 0.2 * rng.normal(size=(D, D))
        w, b = 0.5 * centres @ a + 0.1 * rng.normal(size=(C, D)), rng.normal(0.0, 0.3, C)
        h_tr = (lat_tr @ a + 0.05 * rng.normal(size=lat_tr.shape)).astype(np.float32)
        h_te = (lat_te @ a + 0.05 * rng.normal(size=lat_te.shape)).astype(np.float32)
        out.append((_views(h_tr, y_tr, w, b), _views(h_te, y_te, w, b)))
    return out


def f64(a):
    return np.asarray(a, dtype=np.float64)


def clear_argmax(z, gap=1e-6):
    """The top two logits of every row differ by more than ``gap`` (the prediction does not hang on rounding)."""
    top = np.sort(f64(z), axis=1)[:, -2:]
    assert (top[:, 1] - top[:, 0] > gap).all()


def argmax_loop(row):
    best = 0
    for c in range(1, len(row)):
        if row[c] > row[best]:
            best = c
    return best


def lse(row):
    m = max(row)
    return m + np.log(sum(np.exp(v - m) for v in row))


def softmax_row(row):
    e = np.exp(f64(row) - max(row))
    return e / e.sum()


# --------------------------------------------------------------------------- naive references


def ref_rmds(train, y, query):
    """-min_c [MD_c(h) - MD_0(h)]: class means + shared class-centred covariance; global mean + covariance."""
    h = f64(train)
    classes = sorted(set(y.tolist()))
    means = {c: h[y == c].mean(axis=0) for c in classes}
    cov = sum(np.outer(h[i] - means[y[i]], h[i] - means[y[i]]) for i in range(len(h))) / len(h)
    mu0 = h.mean(axis=0)
    cov0 = sum(np.outer(r - mu0, r - mu0) for r in h) / len(h)
    p, p0 = np.linalg.pinv(cov), np.linalg.pinv(cov0)
    out = []
    for q in f64(query):
        md0 = (q - mu0) @ p0 @ (q - mu0)
        out.append(-min((q - means[c]) @ p @ (q - means[c]) - md0 for c in classes))
    return np.array(out)


def ref_residual(train, w, b, query, d):
    """-||(h - u) projected on the complement of the top-d right singular vectors of (H - u)||, u = -W^+ b."""
    u = -np.linalg.pinv(f64(w)) @ f64(b)
    _, _, vt = np.linalg.svd(f64(train) - u)  # singular values in descending order
    ns = vt[d:]
    return np.array([-np.linalg.norm(ns @ (q - u)) for q in f64(query)])


def ref_neco(train, query, d, logits=None):
    ss = StandardScaler().fit(f64(train))
    pca = PCA(n_components=train.shape[1]).fit(ss.transform(f64(train)))
    z = ss.transform(f64(query))
    red = pca.transform(z)[:, :d]
    out = np.array([np.linalg.norm(red[i]) / np.linalg.norm(z[i]) for i in range(len(z))])
    return out if logits is None else out * np.array([max(r) for r in f64(logits)])


def ref_nci(train, w, b, query, alpha):
    mu = f64(train).mean(axis=0)
    out = []
    for h in f64(query):
        p = argmax_loop(f64(w) @ h + b)
        c = h - mu
        out.append(float(w[p] @ c) / np.linalg.norm(c) + alpha * sum(abs(v) for v in h))
    return np.array(out)


def ref_fdbd(train, w, b, query):
    mu = f64(train).mean(axis=0)
    out = []
    for h in f64(query):
        p = argmax_loop(f64(w) @ h + b)
        dist = [abs((w[p] - w[c]) @ h + b[p] - b[c]) / np.linalg.norm(w[p] - w[c]) for c in range(len(b)) if c != p]
        out.append(np.mean(dist) / np.linalg.norm(h - mu))
    return np.array(out)


def ref_she(train, train_logits, y, query, query_logits):
    h = f64(train)
    patterns = {}
    for c in range(train_logits.shape[1]):
        rows = [i for i in range(len(h)) if y[i] == c and argmax_loop(train_logits[i]) == c]
        patterns[c] = h[rows].mean(axis=0)
    return np.array([float(f64(q) @ patterns[argmax_loop(z)]) for q, z in zip(query, query_logits)])


def ref_nnguide(train, train_logits, query, query_logits, k):
    bank = [f64(h) / np.linalg.norm(f64(h)) * lse(z) for h, z in zip(train, train_logits)]
    out = []
    for q, z in zip(f64(query), query_logits):
        sims = sorted((float(q / np.linalg.norm(q) @ v) for v in bank), reverse=True)
        out.append(lse(z) * np.mean(sims[:k]))
    return np.array(out)


def relation_kernel(train, train_logits, query, query_logits):
    """r[j, i] = max(0, cos(h_j, h_i)) * (p_j . p_i)."""
    r = np.zeros((len(query), len(train)))
    for j, (q, zq) in enumerate(zip(f64(query), query_logits)):
        pq = softmax_row(zq)
        for i, (h, zi) in enumerate(zip(f64(train), train_logits)):
            cos = q @ h / (np.linalg.norm(q) * np.linalg.norm(h))
            r[j, i] = max(0.0, cos) * float(pq @ softmax_row(zi))
    return r


def ref_relation(train, train_logits, query, query_logits, power=1.0, threshold=0.03):
    r = relation_kernel(train, train_logits, query, query_logits)
    if threshold > 0:  # (at 0 an edge's value is 0 either side: no jump)
        assert np.abs(r - threshold).min() > 1e-6  # no edge hangs on the cut-off's rounding
    return np.array([sum(v**power for v in row if v > threshold) for row in r])


def reference(name, train: Views, test: Views, **params):
    """The naive score of ``test`` for detector ``name`` fitted on ``train``."""
    h, q = train.features, test.features
    if name == "rmds":
        return ref_rmds(h, train.labels, q)
    if name == "residual":
        return ref_residual(h, train.weight, train.bias, q, params.get("dim", h.shape[1] // 2))
    if name == "neco":
        d = params.get("dim") or len(set(train.labels.tolist())) - 1
        return ref_neco(h, q, d, test.logits if params.get("maxlogit") else None)
    if name == "nci":
        return ref_nci(h, test.weight, test.bias, q, params.get("alpha", 1e-4))
    if name == "fdbd":
        return ref_fdbd(h, test.weight, test.bias, q)
    if name == "she":
        return ref_she(h, train.logits, train.labels, q, test.logits)
    if name == "nnguide":
        return ref_nnguide(h, train.logits, q, test.logits, params.get("k", 100))
    if name == "relation":
        return ref_relation(h, train.logits, q, test.logits, params.get("power", 1.0), params.get("threshold", 0.03))
    raise AssertionError(name)


#: float32 banks: nnguide, relation
RTOL = {"nnguide": 1e-5, "relation": 1e-5}


def check(name, got, want):
    rtol = RTOL.get(name, 1e-9)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# --------------------------------------------------------------------------- member scores


@pytest.fixture(scope="module")
def data():
    ms = members()
    for train, test in ms:
        clear_argmax(train.logits)
        clear_argmax(test.logits)
    return ms


@pytest.mark.parametrize("name", NEW)
def test_member_scores_match_the_formula(name, data):
    for train, test in data:
        det = DETECTORS[name]().fit(train)
        got = det.score(test)
        assert got.shape == (len(test),) and got.dtype == np.float64
        check(name, got, reference(name, train, test))


@pytest.mark.parametrize("name, params", [
    ("residual", {"dim": 2}),
    ("residual", {"dim": 7}),
    ("neco", {"dim": 5}),
    ("neco", {"dim": 2, "maxlogit": True}),
    ("nci", {"alpha": 0.0}),
    ("nci", {"alpha": 0.1}),
    ("nnguide", {"k": 1}),
    ("nnguide", {"k": 240}),
    ("relation", {"power": 2.0}),
    ("relation", {"threshold": 0.0}),
])
def test_hyperparameters_enter_the_formula(name, params, data):
    train, test = data[0]
    got = DETECTORS[name](**params).fit(train).score(test)
    check(name, got, reference(name, train, test, **params))


def test_defaults():
    assert DETECTORS["nci"]().alpha == 1e-4
    assert (DETECTORS["nnguide"]().k, DETECTORS["nnguide"]().bank_fraction) == (100, 1.0)
    assert (DETECTORS["relation"]().power, DETECTORS["relation"]().threshold) == (1.0, 0.03)
    assert (DETECTORS["neco"]().dim, DETECTORS["neco"]().maxlogit) == (None, False)
    assert DETECTORS["residual"]().dim is None


def test_learned_state(data):
    train, _ = data[0]
    assert DETECTORS["residual"]().fit(train).dim_ == D // 2
    neco = DETECTORS["neco"]().fit(train)
    assert neco.dim_ == C - 1 and neco.components_.shape == (D, C - 1)
    nng = DETECTORS["nnguide"]().fit(train)
    assert nng.bank_.dtype == np.float32 and nng.bank_.shape == (len(train), D)
    rel = DETECTORS["relation"]().fit(train)
    assert rel.bank_.dtype == np.float32 and rel.probs_.dtype == np.float32


def test_residual_is_vims_virtual_logit_term(data):
    """vim = logsumexp(z) - alpha ||(h - u)_perp|| with the same principal subspace: residual = (vim - lse) / alpha."""
    from scipy.special import logsumexp

    train, test = data[0]
    vim = DETECTORS["vim"]().fit(train)
    res = DETECTORS["residual"]().fit(train).score(test)
    want = (vim.score(test) - logsumexp(test.logits, axis=1)) / vim.alpha_
    np.testing.assert_allclose(res, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())


def test_rmds_is_mahalanobis_plus_background(data):
    train, test = data[0]
    maha = DETECTORS["mahalanobis"]().fit(train).score(test)
    h, mu0 = f64(train.features), f64(train.features).mean(axis=0)
    p0 = np.linalg.pinv((h - mu0).T @ (h - mu0) / len(h))
    md0 = np.array([(q - mu0) @ p0 @ (q - mu0) for q in f64(test.features)])
    np.testing.assert_allclose(DETECTORS["rmds"]().fit(train).score(test), maha + md0, rtol=1e-9,
                               atol=1e-9 * np.abs(md0).max())


def test_neco_ratio_in_unit_interval_and_scale_free(data):
    train, test = data[0]
    det = DETECTORS["neco"]().fit(train)
    s = det.score(test)
    assert ((s >= 0) & (s <= 1 + 1e-12)).all()


def test_nnguide_bank_fraction(data):
    """A bank fraction keeps a seeded random subset of ceil(n f) training samples: the score equals the formula
    on exactly those rows."""
    train, test = data[0]
    det = DETECTORS["nnguide"](k=10, bank_fraction=0.25).fit(train)
    assert det.n_samples_fit_ == 60
    rows = np.sort(np.random.default_rng(0).choice(len(train), 60, replace=False))
    sub = Views(logits=train.logits[rows], features=train.features[rows], labels=train.labels[rows])
    check("nnguide", det.score(test), reference("nnguide", sub, test, k=10))


def test_she_leave_out_member_compares_dataset_classes(data):
    """A leave-out member's logit columns are its kept classes (Views.classes): a prediction is correct when
    the dataset class of its argmax column is the label."""
    train, test = data[0]
    kept = np.array([0, 2, 3])
    lo_train = Views(logits=train.logits[:, kept], features=train.features, labels=train.labels, classes=kept)
    lo_test = Views(logits=test.logits[:, kept], features=test.features, labels=test.labels, classes=kept)
    det = DETECTORS["she"]().fit(lo_train)
    h, z, y = f64(train.features), train.logits[:, kept], train.labels
    patterns = []
    for j, c in enumerate(kept):
        rows = [i for i in range(len(h)) if y[i] == c and argmax_loop(z[i]) == j]
        patterns.append(h[rows].mean(axis=0))
    want = np.array([float(f64(q) @ patterns[argmax_loop(r)]) for q, r in zip(test.features, lo_test.logits)])
    check("she", det.score(lo_test), want)


def test_fdbd_identical_class_weights_count_zero(data):
    """Two classes with the same weights and bias have no boundary between them: that term counts 0."""
    train, test = data[0]
    w, b = train.weight.copy(), train.bias.copy()
    w[3], b[3] = w[2], b[2]
    tr, te = _views(train.features, train.labels, w, b), _views(test.features, test.labels, w, b)
    got = DETECTORS["fdbd"]().fit(tr).score(te)
    mu = f64(tr.features).mean(axis=0)
    want = []
    for h in f64(te.features):
        p = argmax_loop(w @ h + b)
        terms = [0.0 if np.array_equal(w[p], w[c])
                 else abs((w[p] - w[c]) @ h + b[p] - b[c]) / np.linalg.norm(w[p] - w[c])
                 for c in range(C) if c != p]
        want.append(np.mean(terms) / np.linalg.norm(h - mu))
    assert np.isfinite(got).all()
    check("fdbd", got, np.array(want))


@pytest.mark.parametrize("name", NEW)
def test_chunking(name, data, monkeypatch):
    train, test = data[0]
    full = DETECTORS[name]().fit(train).score(test)
    monkeypatch.setattr(geometry_mod, "CHUNK", 7)
    monkeypatch.setattr(geometry_mod, "BANK_CHUNK", 11)
    monkeypatch.setattr(feature_mod, "CHUNK", 7)
    chunked = DETECTORS[name]().fit(train).score(test)
    rtol = RTOL.get(name, 1e-9)
    np.testing.assert_allclose(chunked, full, rtol=rtol, atol=rtol * np.abs(full).max())


# --------------------------------------------------------------------------- ensembles


def hand_ensemble(name, strategy, ms):
    trains, tests = [m[0] for m in ms], [m[1] for m in ms]
    if strategy == "mean-scores":
        return np.mean([reference(name, tr, te) for tr, te in ms], axis=0)
    if strategy == "concat":
        combine = lambda vs: np.concatenate([v.features for v in vs], axis=1)  # noqa: E731
    else:  # mean-features: the members' float32 features averaged
        combine = lambda vs: np.mean([v.features for v in vs], axis=0)  # noqa: E731
    tr = Views(features=combine(trains), labels=trains[0].labels)
    te = Views(features=combine(tests), labels=tests[0].labels)
    return reference(name, tr, te)


ENSEMBLE_CASES = [(n, s) for n in NEW for s in DETECTORS[n].strategies]


@pytest.mark.parametrize("name, strategy", ENSEMBLE_CASES, ids=[f"{n}-{s}" for n, s in ENSEMBLE_CASES])
def test_ensemble_matches_hand_computed(name, strategy, data):
    cls = DETECTORS[name]
    fitted = [cls().fit(tr) for tr, _ in data]
    got = ensemble_scores(strategy, cls, fitted, [tr for tr, _ in data], {"test": [te for _, te in data]})["test"]
    check(name, got, hand_ensemble(name, strategy, data))


def test_strategies_declared():
    for name in ("rmds", "neco"):
        assert DETECTORS[name].strategies == ("concat", "mean-features", "mean-scores")
    for name in ("residual", "nci", "fdbd", "she", "nnguide", "relation"):
        assert DETECTORS[name].strategies == ("mean-scores",)


def test_neco_maxlogit_needs_logits_in_combined_views(data):
    """With maxlogit the concatenated views carry no logits: a named error, not a wrong score."""
    cls = DETECTORS["neco"]
    fitted = [cls(maxlogit=True).fit(tr) for tr, _ in data]
    with pytest.raises(OodensError, match=r"neco reads views\.logits"):
        ensemble_scores("concat", lambda: cls(maxlogit=True), fitted, [tr for tr, _ in data],
                        {"test": [te for _, te in data]})


# --------------------------------------------------------------------------- parameter errors


@pytest.mark.parametrize("name, params, message", [
    ("residual", {"dim": 0}, r"^dim=0 is out of range: expected an integer >= 1$"),
    ("residual", {"dim": 2.5}, r"^dim=2.5 is out of range: expected an integer >= 1$"),
    ("neco", {"dim": -1}, r"^dim=-1 is out of range: expected an integer >= 1$"),
    ("neco", {"maxlogit": "yes"}, r"^maxlogit=yes is not a boolean: expected True or False$"),
    ("nci", {"alpha": -0.5}, r"^alpha=-0.5 is out of range: expected a finite number >= 0$"),
    ("nci", {"alpha": float("inf")}, r"^alpha=inf is out of range"),
    ("nnguide", {"k": 0}, r"^k=0 is out of range: expected an integer >= 1$"),
    ("nnguide", {"bank_fraction": 0.0}, r"^bank_fraction=0 is out of range: expected a fraction in \(0, 1\]$"),
    ("nnguide", {"bank_fraction": 1.5}, r"^bank_fraction=1.5 is out of range"),
    ("relation", {"power": 0}, r"^power=0 is out of range: expected a finite number > 0$"),
    ("relation", {"threshold": -0.1}, r"^threshold=-0.1 is out of range: expected a finite number >= 0$"),
])
def test_validate_errors(name, params, message):
    with pytest.raises(ParameterError, match=message) as info:
        DETECTORS[name](**params).validate()
    assert (info.value.owner, info.value.param) == (name, next(iter(params)))


def test_data_dependent_errors(data):
    train, test = data[0]
    with pytest.raises(ParameterError, match=rf"^dim={D} is out of range for {D}-d features: expected 1\.\.{D - 1}$"):
        DETECTORS["residual"](dim=D).fit(train)
    with pytest.raises(ParameterError, match=rf"^dim={D} is out of range for {D}-d features"):
        DETECTORS["neco"](dim=D).fit(train)
    one_class = Views(features=train.features, labels=np.zeros(len(train), dtype=int))
    with pytest.raises(ParameterError, match=r"^dim=None gives d = C - 1 = 0 for 1 classes"):
        DETECTORS["neco"]().fit(one_class)
    with pytest.raises(ParameterError, match=r"^k=241 exceeds the 240 bank samples") as info:
        DETECTORS["nnguide"](k=241).fit(train)
    assert (info.value.owner, info.value.param) == ("nnguide", "k")
    with pytest.raises(ParameterError, match=r"^k=100 exceeds the 24 bank samples"):
        DETECTORS["nnguide"](bank_fraction=0.1).fit(train)
    assert DETECTORS["nnguide"]().validate_training_size(100) is not None
    with pytest.raises(ParameterError):
        DETECTORS["nnguide"]().validate_training_size(99)
    det = DETECTORS["nnguide"](k=5).fit(train)
    det.k = 241  # k is read at query time
    with pytest.raises(ParameterError, match="exceeds the 240 bank samples"):
        det.score(test)


def test_unfit_inputs_are_named(data):
    train, test = data[0]
    unlabelled = Views(features=train.features, labels=np.full(len(train), -1))
    for name in ("rmds", "neco"):
        with pytest.raises(OodensError, match="labelled ID training features"):
            DETECTORS[name]().fit(unlabelled)
    # a class the network never classifies correctly has no stored pattern
    b = train.bias.copy()
    b[1] = -1e6  # class 1 is never predicted
    bad = _views(train.features, train.labels, train.weight, b)
    with pytest.raises(OodensError, match=r"she stores .* class\(es\) 1 have none"):
        DETECTORS["she"]().fit(bad)
    one = _views(train.features, train.labels, train.weight[:1], train.bias[:1])
    with pytest.raises(OodensError, match="fdbd needs a head with at least 2 classes"):
        DETECTORS["fdbd"]().fit(one).score(one)
