"""Detectors against direct numpy formulas written here (DESIGN.md section 5).

Scores are higher = more in-distribution.
"""

from __future__ import annotations

import numpy as np
import pytest

import oodens.detectors.feature as feature_mod
from oodens.detectors import DETECTORS, get_detector, parse_detectors
from oodens.ensemble.strategies import STRATEGIES, resolve_strategy
from oodens.errors import OodensError
from oodens.views.types import Views

from reference import ref_knn, ref_mahalanobis

# ----------------------------------------------------------------------------
# reference formulas
# ----------------------------------------------------------------------------


def ref_msp(z):
    z = np.asarray(z, dtype=np.float64)
    out = np.empty(len(z))
    for i, row in enumerate(z):
        e = np.exp(row - row.max())
        out[i] = e.max() / e.sum()
    return out


def ref_maxlogit(z):
    z = np.asarray(z, dtype=np.float64)
    return np.array([max(row) for row in z], dtype=np.float64)


def ref_energy(z, T=1.0):
    z = np.asarray(z, dtype=np.float64)
    out = np.empty(len(z))
    for i, row in enumerate(z):
        m = row.max()
        out[i] = m + T * np.log(np.sum(np.exp((row - m) / T)))
    return out


def make(name, **params):
    return DETECTORS[name](**params)


# ----------------------------------------------------------------------------
# logit detectors
# ----------------------------------------------------------------------------


def _logits(seed=0, n=64, C=10, scale=3.0):
    return np.random.default_rng(seed).normal(0.0, scale, (n, C))


@pytest.mark.parametrize("scale", [0.1, 3.0, 1000.0])
def test_msp(scale):
    z = _logits(1, scale=scale)
    got = make("msp").score(Views(logits=z))
    np.testing.assert_allclose(got, ref_msp(z), rtol=1e-12, atol=1e-15)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("scale", [0.1, 3.0, 1000.0])
def test_maxlogit(scale):
    z = _logits(2, scale=scale)
    got = make("maxlogit").score(Views(logits=z))
    np.testing.assert_array_equal(got, ref_maxlogit(z))


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("scale", [0.1, 3.0, 1000.0])
def test_energy(T, scale):
    z = _logits(3, scale=scale)
    det = make("energy", temperature=T) if T != 1.0 else make("energy")
    got = det.score(Views(logits=z))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref_energy(z, T), rtol=1e-12, atol=1e-12)


def test_energy_default_temperature_is_one():
    assert make("energy").temperature == 1.0


def test_logit_detectors_large_logits_hand_values():
    # z = [1000, 1000, 0]: softmax max = 1/2 (exp(-1000) underflows to 0),
    # maxlogit = 1000, energy(T=1) = 1000 + log 2, energy(T=2.5) = 1000 + 2.5 log 2
    z = np.array([[1000.0, 1000.0, 0.0], [1000.0, -1000.0, 999.0]])
    # row 2: softmax max = 1/(1+e^-1), energy = 1000 + log(1+e^-1)
    msp = make("msp").score(Views(logits=z))
    np.testing.assert_allclose(msp, [0.5, 1 / (1 + np.exp(-1.0))], rtol=1e-12)
    np.testing.assert_array_equal(make("maxlogit").score(Views(logits=z)), [1000.0, 1000.0])
    e1 = make("energy").score(Views(logits=z))
    np.testing.assert_allclose(e1, [1000 + np.log(2.0), 1000 + np.log1p(np.exp(-1.0))], rtol=1e-14)
    e25 = make("energy", temperature=2.5).score(Views(logits=z))
    np.testing.assert_allclose(e25, [1000 + 2.5 * np.log(2.0), 1000 + 2.5 * np.log1p(np.exp(-1 / 2.5))], rtol=1e-14)


def test_logit_detectors_accept_float32():
    z = _logits(4).astype(np.float32)
    z64 = z.astype(np.float64)
    np.testing.assert_allclose(make("msp").score(Views(logits=z)), ref_msp(z64), rtol=1e-12)
    np.testing.assert_allclose(make("energy").score(Views(logits=z)), ref_energy(z64), rtol=1e-12)


# ----------------------------------------------------------------------------
# knn
# ----------------------------------------------------------------------------


def _feat_data(seed=0, n_train=120, n_query=45, D=16, C=4):
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(n_train, D)).astype(np.float32)
    labels = rng.integers(0, C, n_train)
    query = rng.normal(size=(n_query, D)).astype(np.float32)
    return train, labels, query


@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_brute_force(k):
    train, labels, query = _feat_data(10)
    det = make("knn", k=k).fit(Views(features=train, labels=labels))
    got = det.score(Views(features=query))
    assert got.shape == (len(query),)
    np.testing.assert_allclose(got, ref_knn(train, query, k), rtol=1e-4, atol=1e-5)


def test_knn_default_k():
    assert make("knn").k == 50


def test_knn_k_equal_train_size_ok():
    train, labels, query = _feat_data(11, n_train=30)
    det = make("knn", k=30).fit(Views(features=train, labels=labels))
    np.testing.assert_allclose(det.score(Views(features=query)), ref_knn(train, query, 30), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [31, 1000, 0])
def test_knn_k_out_of_range(k):
    train, labels, _ = _feat_data(12, n_train=30)
    with pytest.raises(OodensError):
        make("knn", k=k).fit(Views(features=train, labels=labels))


def test_knn_scale_invariant():
    # the score uses L2-normalised features, so rescaling a query row changes nothing
    train, labels, query = _feat_data(13)
    det = make("knn", k=5).fit(Views(features=train, labels=labels))
    scaled = query * np.linspace(0.5, 20, len(query), dtype=np.float32)[:, None]
    np.testing.assert_allclose(det.score(Views(features=scaled)), ref_knn(train, query, 5), rtol=1e-4, atol=1e-5)


def test_knn_chunking(monkeypatch):
    train, labels, query = _feat_data(14, n_query=100)
    tv = Views(features=train, labels=labels)
    full = make("knn", k=5).fit(tv).score(Views(features=query))
    monkeypatch.setattr(feature_mod, "CHUNK", 7)
    chunked = make("knn", k=5).fit(tv).score(Views(features=query))
    ref = ref_knn(train, query, 5)
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# mahalanobis
# ----------------------------------------------------------------------------


def test_mahalanobis_full_rank():
    train, labels, query = _feat_data(20, n_train=200, D=8, C=5)
    det = make("mahalanobis").fit(Views(features=train, labels=labels))
    got = det.score(Views(features=query))
    np.testing.assert_allclose(got, ref_mahalanobis(train, labels, query), rtol=1e-6)
    assert (got <= 1e-9).all()


def test_mahalanobis_noncontiguous_labels():
    # class ids need not be 0..C-1
    train, labels, query = _feat_data(21, n_train=150, D=6, C=3)
    labels = np.array([2, 7, 11])[labels]
    det = make("mahalanobis").fit(Views(features=train, labels=labels))
    np.testing.assert_allclose(det.score(Views(features=query)), ref_mahalanobis(train, labels, query), rtol=1e-6)


def test_mahalanobis_duplicated_column():
    # a duplicated feature column makes the covariance singular: the pseudo-inverse matters
    rng = np.random.default_rng(22)
    base = rng.normal(size=(150, 6))
    labels = rng.integers(0, 3, 150)
    base += labels[:, None] * 0.7
    train = np.concatenate([base, base[:, :1]], axis=1)
    qb = rng.normal(size=(40, 6))
    query = np.concatenate([qb, qb[:, :1]], axis=1)
    det = make("mahalanobis").fit(Views(features=train, labels=labels))
    np.testing.assert_allclose(det.score(Views(features=query)), ref_mahalanobis(train, labels, query), rtol=1e-6)


def test_mahalanobis_pinv_cut_at_float32_resolution():
    # an affine copy of a feature, rounded to float32 (3.1 x + 1000: float32 spacing ~6e-5 there), leaves the
    # covariance an eigenvalue of pure rounding noise, ~2e-12 x the largest. numpy's pinv cut (1e-15 x the
    # largest) keeps it and weights the queries' rounding noise by ~1e11; the float32 cut (D eps32^2 E||h||^2,
    # the variance float32 rounding of features of that size can add) drops it and gives the score of the non-degenerate reduced problem (Mahalanobis is affine-invariant, so
    # the exact copy adds nothing)
    rng = np.random.default_rng(27)
    n, D, C = 300, 6, 3
    labels = rng.integers(0, C, n)
    base = (rng.normal(size=(n, D)) + labels[:, None] * 0.7).astype(np.float32)
    qbase = (rng.normal(size=(40, D)) * 2.0).astype(np.float32)

    def with_copy(b):
        return np.concatenate([b, (b[:, :1].astype(np.float64) * 3.1 + 1000.0).astype(np.float32)], axis=1)

    train, query = with_copy(base), with_copy(qbase)
    reduced = ref_mahalanobis(base, labels, qbase)
    old_cut = ref_mahalanobis(train, labels, query)  # np.linalg.pinv's default rcond = 1e-15
    assert np.abs(old_cut - reduced).max() > 0.5
    got = make("mahalanobis").fit(Views(features=train, labels=labels)).score(Views(features=query))
    np.testing.assert_allclose(got, reduced, rtol=1e-5, atol=1e-5 * np.abs(reduced).max())
    rmds = make("rmds").fit(Views(features=train, labels=labels)).score(Views(features=query))
    rmds_reduced = make("rmds").fit(Views(features=base, labels=labels)).score(Views(features=qbase))
    np.testing.assert_allclose(rmds, rmds_reduced, rtol=1e-5, atol=1e-5 * np.abs(rmds_reduced).max())


def test_mahalanobis_more_dims_than_samples():
    rng = np.random.default_rng(23)
    n, D = 20, 35
    train = rng.normal(size=(n, D))
    labels = np.arange(n) % 3
    query = rng.normal(size=(15, D))
    det = make("mahalanobis").fit(Views(features=train, labels=labels))
    np.testing.assert_allclose(det.score(Views(features=query)), ref_mahalanobis(train, labels, query), rtol=1e-6)


def test_mahalanobis_class_mean_scores_zero():
    # a query equal to a class mean is at distance 0 from that class (the min)
    train, labels, _ = _feat_data(24, n_train=100, D=5, C=3)
    t64 = train.astype(np.float64)
    means = np.stack([t64[labels == c].mean(axis=0) for c in range(3)])
    det = make("mahalanobis").fit(Views(features=train, labels=labels))
    np.testing.assert_allclose(det.score(Views(features=means)), 0.0, atol=1e-9)


def test_mahalanobis_chunking(monkeypatch):
    train, labels, query = _feat_data(25, n_train=150, n_query=100, D=8, C=4)
    tv = Views(features=train, labels=labels)
    full = make("mahalanobis").fit(tv).score(Views(features=query))
    monkeypatch.setattr(feature_mod, "CHUNK", 7)
    chunked = make("mahalanobis").fit(tv).score(Views(features=query))
    np.testing.assert_allclose(chunked, full, rtol=1e-12)
    np.testing.assert_allclose(chunked, ref_mahalanobis(train, labels, query), rtol=1e-6)


def test_mahalanobis_rejects_unlabelled_train():
    train, labels, _ = _feat_data(26)
    labels = labels.copy()
    labels[3] = -1
    with pytest.raises(OodensError):
        make("mahalanobis").fit(Views(features=train, labels=labels))


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------


def test_expected_detectors_registered():
    for name in ("msp", "maxlogit", "energy", "knn", "mahalanobis"):
        assert name in DETECTORS


@pytest.mark.parametrize("name", list(DETECTORS))
def test_registry_entry(name):
    cls = DETECTORS[name]
    assert cls.name == name
    assert get_detector(name) is cls
    doc = cls.__dict__.get("__doc__") or ""
    # dataclass fills an empty docstring with the signature "Name(...)": require a real one
    assert doc.strip() and not doc.startswith(cls.__name__ + "(")
    assert isinstance(cls.family, str) and cls.family
    assert len(cls.strategies) >= 1
    assert len(set(cls.strategies)) == len(cls.strategies)
    for s in cls.strategies:
        assert s in STRATEGIES
    assert resolve_strategy(cls, None) == cls.strategies[0]
    for s in cls.strategies:
        assert resolve_strategy(cls, s) == s


def test_families_and_defaults_of_known_detectors():
    for name in ("msp", "maxlogit", "energy"):
        assert DETECTORS[name].family == "logit"
        assert DETECTORS[name].strategies[0] == "mean-logits"
    for name in ("knn", "mahalanobis"):
        assert DETECTORS[name].family == "feature"
        assert DETECTORS[name].strategies[0] == "concat"
        assert DETECTORS[name].needs_fit


def test_parse_detectors():
    assert parse_detectors("all") == list(DETECTORS)
    assert parse_detectors("msp") == ["msp"]
    assert parse_detectors(" knn , msp ") == ["knn", "msp"]
    assert parse_detectors("msp,knn,msp") == ["msp", "knn"]


@pytest.mark.parametrize("spec", ["nope", "msp,nope", "", " , ", "MSP", "all,msp"])
def test_parse_detectors_rejects(spec):
    with pytest.raises(OodensError):
        parse_detectors(spec)


def test_get_detector_unknown():
    with pytest.raises(OodensError):
        get_detector("definitely-not-a-detector")


# ----------------------------------------------------------------------------
# higher score = more ID
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_feature_detectors_higher_is_more_id(name):
    rng = np.random.default_rng(30)
    D, C = 12, 3
    centres = rng.normal(size=(C, D)) * 4.0 + 10.0
    labels = rng.integers(0, C, 300)
    train = (centres[labels] + rng.normal(size=(300, D))).astype(np.float32)
    id_lab = rng.integers(0, C, 80)
    id_q = (centres[id_lab] + rng.normal(size=(80, D))).astype(np.float32)
    # OOD: far away and in a different direction (knn normalises, so direction matters)
    ood_q = (-centres[id_lab] * 1.5 + rng.normal(size=(80, D)) * 3.0).astype(np.float32)
    params = {"k": 10} if name == "knn" else {}
    det = make(name, **params).fit(Views(features=train, labels=labels))
    s_id = det.score(Views(features=id_q))
    s_ood = det.score(Views(features=ood_q))
    assert s_id.mean() > s_ood.mean()
    assert np.median(s_id) > np.max(s_ood)


def test_logit_detectors_higher_is_more_confident():
    # a confident (peaked) logit row scores above a flat one for every logit detector
    z = np.array([[10.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    for name in ("msp", "maxlogit", "energy"):
        s = make(name).score(Views(logits=z))
        assert s[0] > s[1], name


def test_mahalanobis_keeps_small_directions_of_real_variance():
    """A direction whose variance is small next to the others' but far above float32 rounding (1e-6 of the
    largest, ~1e8 x the rounding noise of these features) is signal: the score equals the exact inverse's (a
    float64 naive computation), which a cut linear in eps32 (lambda_max * D * eps32 ~ 1e-5 x the largest) lost."""
    rng = np.random.default_rng(5)
    n, D, C = 400, 8, 2
    labels = rng.integers(0, C, n)
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0]
    scales = np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 1e-3])  # variance 1e-6 along the last direction
    train = ((rng.normal(size=(n, D)) * scales) @ basis.T + 0.1 * labels[:, None]).astype(np.float32)
    query = ((rng.normal(size=(50, D)) * scales * 3) @ basis.T).astype(np.float32)
    want = ref_mahalanobis(train, labels, query)  # exact pseudo-inverse in float64 (here: the inverse)
    got = make("mahalanobis").fit(Views(features=train, labels=labels)).score(Views(features=query))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
