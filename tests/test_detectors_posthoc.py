"""The post-hoc baselines of oodens.detectors.shaping (ASH-P, ASH-B, SCALE, VRA, ReAct+DICE) and
oodens.detectors.confidence (GEN, KL matching, OpenMax), each against a naive re-derivation of its
paper's formula written here (python loops per sample and per class, never the package's helpers),
for one member and for the ensemble under every strategy the detector declares.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import weibull_min

from oodens.detectors import DETECTORS, ParameterError
from oodens.ensemble.strategies import ensemble_scores, resolve_strategy
from oodens.errors import OodensError
from oodens.views.types import Views

RTOL = 1e-9


def close(got, ref, rtol=RTOL):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=0)


# --------------------------------------------------------------------------- references by hand


def lse_row(row) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def energy_rows(z) -> np.ndarray:
    return np.array([lse_row([float(v) for v in r]) for r in z])


def softmax_row(row) -> list[float]:
    m = max(row)
    e = [math.exp(float(v) - m) for v in row]
    s = sum(e)
    return [x / s for x in e]


def linear_percentile(values, q: float) -> float:
    """numpy's default ('linear') percentile, by hand: interpolate at rank q/100 * (n - 1)."""
    v = sorted(float(x) for x in values)
    pos = q / 100 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def head_rows(h, W, b) -> np.ndarray:
    """logits h W^T + b, one dot product at a time."""
    C, D = W.shape
    return np.array([[sum(float(r[d]) * float(W[c, d]) for d in range(D)) + float(b[c]) for c in range(C)]
                     for r in h])


def kept(row, p: float) -> list[int]:
    """The top D - round(D p / 100) positions of a row, ties to the lower index."""
    D = len(row)
    keep = D - int(round(D * p / 100))
    return sorted(range(D), key=lambda j: -row[j])[:keep]


def ref_ash_p_row(row, p):
    out = [0.0] * len(row)
    for j in kept(row, p):
        out[j] = row[j]
    return out


def ref_ash_b_row(row, p):
    idx = kept(row, p)
    out = [0.0] * len(row)
    for j in idx:
        out[j] = sum(row) / len(idx)
    return out


def ref_scale_row(row, p):
    factor = math.exp(sum(row) / sum(row[j] for j in kept(row, p)))
    return [v * factor for v in row]


PER_SAMPLE = {"ash-p": ref_ash_p_row, "ash-b": ref_ash_b_row, "scale": ref_scale_row}


def ref_vra(train_h, h, p_low, p_high, gamma):
    D = train_h.shape[1]
    lows = [linear_percentile(train_h[:, d], p_low) for d in range(D)]
    highs = [linear_percentile(train_h[:, d], p_high) for d in range(D)]
    out = np.zeros(h.shape)
    for i, row in enumerate(h):
        for d, v in enumerate(row):
            out[i, d] = 0.0 if v < lows[d] else highs[d] if v > highs[d] else v + gamma
    return out


def ref_react_dice_logits(train_h, h, W, b, p, react_p):
    n, D = train_h.shape
    c = linear_percentile(train_h.ravel(), react_p)
    mean = [sum(float(train_h[i, d]) for i in range(n)) / n for d in range(D)]
    contrib = [mean[d] * float(W[k, d]) for k in range(W.shape[0]) for d in range(D)]
    thr = linear_percentile(contrib, p)
    Wm = np.array([[W[k, d] if mean[d] * W[k, d] > thr else 0.0 for d in range(D)] for k in range(W.shape[0])])
    return head_rows(np.minimum(h, c), Wm, b)


def ref_gen(z, gamma, M):
    out = []
    for row in z:
        p = sorted(softmax_row(row), reverse=True)[:min(M, len(row))]
        out.append(-sum(q**gamma * (1 - q) ** gamma for q in p))
    return np.array(out)


def ref_gen_probs(P, gamma, M):
    """GEN on probability rows given directly (the mean-probs ensemble)."""
    return np.array([-sum(q**gamma * (1 - q) ** gamma for q in sorted(row, reverse=True)[:min(M, len(row))])
                     for row in P])


def ref_klm(train_z, z):
    C = train_z.shape[1]
    probs = [softmax_row(r) for r in train_z]
    preds = [max(range(C), key=lambda c: r[c]) for r in train_z]
    templates = []
    for c in range(C):
        members = [pr for pr, k in zip(probs, preds) if k == c]
        if members:
            templates.append([sum(m[j] for m in members) / len(members) for j in range(C)])
    out = []
    for row in z:
        p = softmax_row(row)
        kls = [sum(p[j] * math.log(p[j] / d[j]) for j in range(C) if p[j] > 0) for d in templates]
        out.append(-min(kls))
    return np.array(out)


T_LIBMR = 10000.0


def ref_eucos(v, mu, eu_weight):
    eu = math.sqrt(sum((a - b) ** 2 for a, b in zip(v, mu)))
    cos = sum(a * b for a, b in zip(v, mu)) / (math.sqrt(sum(a * a for a in v)) * math.sqrt(sum(b * b for b in mu)))
    return eu_weight * eu + 1 - cos


def ref_weibull(tail):
    """libMR FitHigh: t_i = x_i - min + 10000, location-0 Weibull MLE of the t_i. The shape k solves
    sum t^k log t / sum t^k - 1/k - mean log t = 0 (by bisection); scale^k = mean t^k. Logs relative to
    T = 10000 (log t_i = log T + log1p((x_i - min) / T)) keep the tail's spread."""
    m = min(tail)
    ell = [math.log1p((x - m) / T_LIBMR) for x in tail]
    top = max(ell)

    def weights(k):
        return [math.exp(k * (e - top)) for e in ell]

    def equation(k):
        w = weights(k)
        return sum(wi * e for wi, e in zip(w, ell)) / sum(w) - 1 / k - sum(ell) / len(ell)

    hi = 1.0
    while equation(hi) < 0:
        hi *= 2
    lo = hi / 2 if hi > 1 else 1e-12
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if equation(mid) < 0 else (lo, mid)
    k = 0.5 * (lo + hi)
    log_scale = top + math.log(sum(weights(k)) / len(ell)) / k  # log(scale / T)
    return m, k, log_scale


def ref_wscore(x, fit):
    m, k, log_scale = fit
    return -math.expm1(-math.exp(k * (math.log1p((x - m) / T_LIBMR) - log_scale)))


def ref_openmax_fit(train_z, labels, tailsize, eu_weight, classes=None):
    C = train_z.shape[1]
    cols = list(range(C)) if classes is None else [int(c) for c in classes]
    mavs, fits = [], []
    for c in range(C):
        rows = [[float(v) for v in r] for r, y in zip(train_z, labels)
                if max(range(C), key=lambda j: r[j]) == c and cols[c] == y]
        mu = [sum(r[j] for r in rows) / len(rows) for j in range(C)]
        dists = sorted(ref_eucos(r, mu, eu_weight) for r in rows)
        mavs.append(mu)
        fits.append(ref_weibull(dists[-tailsize:]))
    return mavs, fits


def ref_openmax(train_z, labels, z, tailsize=20, alpha=10, eu_weight=0.005, classes=None):
    mavs, fits = ref_openmax_fit(train_z, labels, tailsize, eu_weight, classes)
    C = train_z.shape[1]
    a = min(alpha, C)
    out = []
    for row in z:
        v = [float(x) for x in row]
        ranked = sorted(range(C), key=lambda j: -v[j])[:a]
        vhat = list(v)
        for r, c in enumerate(ranked, start=1):
            omega = (a + 1 - r) / a
            w = ref_wscore(ref_eucos(v, mavs[c], eu_weight), fits[c])
            vhat[c] = v[c] * (1 - omega * w)
        v0 = sum(v[c] - vhat[c] for c in range(C))
        top = max(vhat + [v0])
        den = sum(math.exp(x - top) for x in vhat) + math.exp(v0 - top)
        out.append(-math.exp(v0 - top) / den)
    return np.array(out)


# --------------------------------------------------------------------------- data


def shaping_member(rng, n_train=60, n=25, D=24, C=5, scale=0.4):
    """(train, test) views of one member: non-negative (post-ReLU-like) features, its own head."""
    W = rng.normal(size=(C, D)) * 0.5
    b = rng.normal(size=C) * 0.3
    train_h = np.abs(rng.normal(size=(n_train, D))) * scale * rng.uniform(0.5, 2.0, size=D)
    h = np.abs(rng.normal(size=(n, D))) * scale * 1.3
    return Views(features=train_h, weight=W, bias=b), Views(features=h, weight=W, bias=b)


def logit_member(rng, n_train=200, n=40, C=6, spread=1.0):
    """(train, test) views of one member: train logits peaked at the label, test logits mixing ID-like
    and flat (OOD-like) rows."""
    y = np.arange(n_train) % C
    train_z = rng.normal(size=(n_train, C)) * spread
    train_z[np.arange(n_train), y] += 4.0
    yt = np.arange(n) % C
    z = rng.normal(size=(n, C)) * spread
    z[: n // 2][np.arange(n // 2), yt[: n // 2]] += 4.0
    return Views(logits=train_z, labels=y), Views(logits=z, labels=yt)


def fit_members(name, params, trains):
    return [DETECTORS[name](**params).fit(t) if DETECTORS[name].needs_fit else DETECTORS[name](**params)
            for t in trains]


def ensemble(name, params, strategy, members, trains, tests):
    return ensemble_scores(strategy, lambda: DETECTORS[name](**params), members, trains, {"id": tests})["id"]


# --------------------------------------------------------------------------- per-sample shaping: ash-p, ash-b, scale


@pytest.mark.parametrize("name,p", [("ash-p", 60.0), ("ash-p", 90.0), ("ash-b", 65.0), ("ash-b", 90.0),
                                    ("scale", 85.0), ("scale", 65.0)])
def test_per_sample_shaping_matches_loops(name, p):
    rng = np.random.default_rng(int(p) + len(name))
    _, v = shaping_member(rng, D=23)
    shaped = np.array([PER_SAMPLE[name]([float(x) for x in r], p) for r in v.features])
    ref = energy_rows(head_rows(shaped, v.weight, v.bias))
    close(DETECTORS[name](p=p).score(v), ref)


def test_per_sample_shaping_defaults():
    assert DETECTORS["ash-p"]().p == 60.0 and DETECTORS["ash-b"]().p == 65.0 and DETECTORS["scale"]().p == 85.0
    assert not any(DETECTORS[n].needs_fit for n in ("ash-p", "ash-b", "scale"))


def test_ash_b_ties_go_to_the_lower_index():
    # 10 features, p = 65 keeps 4: row 0 has ties at the boundary (three 1.0 for two places), row 1 is
    # mostly zeros (the kept set runs into them)
    h = np.array([[3.0, 1.0, 0.5, 1.0, 2.0, 0.0, 1.0, 0.2, 0.1, 0.0],
                  [0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    W = np.eye(10)[:4] + 0.1
    b = np.zeros(4)
    got = DETECTORS["ash-b"](p=65.0).score(Views(features=h, weight=W, bias=b))
    # row 0 keeps 0, 4, 1, 3 (the two 1.0s of lowest index); row 1 keeps 2, 6, 0, 1; each set to sum / 4
    shaped = np.zeros_like(h)
    shaped[0, [0, 1, 3, 4]] = h[0].sum() / 4
    shaped[1, [0, 1, 2, 6]] = h[1].sum() / 4
    close(got, energy_rows(head_rows(shaped, W, b)))
    close(got, energy_rows(head_rows([ref_ash_b_row(list(r), 65.0) for r in h], W, b)))


def test_scale_keeps_every_activation_and_ash_p_prunes():
    rng = np.random.default_rng(3)
    _, v = shaping_member(rng, D=20, n=6)
    W = np.eye(20)  # logits = the shaped features themselves
    views = Views(features=v.features, weight=W, bias=np.zeros(20))
    shaped = DETECTORS["scale"](p=85.0).member_logits(views)
    assert (shaped > 0).all()  # nothing pruned
    factor = shaped / v.features
    close(factor, np.repeat(factor[:, :1], 20, axis=1), rtol=1e-12)  # one factor per sample
    pruned = DETECTORS["ash-p"](p=85.0).member_logits(views)
    assert ((pruned != 0).sum(axis=1) == 20 - round(20 * 0.85)).all()


# --------------------------------------------------------------------------- fitted shaping: vra, react-dice


@pytest.mark.parametrize("p_low,p_high,gamma", [(60.0, 90.0, 0.0), (60.0, 95.0, 0.6), (10.0, 50.0, 0.3)])
def test_vra_matches_loops(p_low, p_high, gamma):
    rng = np.random.default_rng(int(p_high))
    train, v = shaping_member(rng)
    shaped = ref_vra(train.features, v.features, p_low, p_high, gamma)
    assert (shaped == 0).any()  # low activations suppressed
    det = DETECTORS["vra"](p_low=p_low, p_high=p_high, gamma=gamma).fit(train)
    close(det.score(v), energy_rows(head_rows(shaped, v.weight, v.bias)))
    assert det.low_.shape == det.high_.shape == (train.features.shape[1],)


def test_vra_defaults():
    det = DETECTORS["vra"]()
    assert (det.p_low, det.p_high, det.gamma) == (60.0, 90.0, 0.0)


@pytest.mark.parametrize("p,react_p", [(10.0, 90.0), (70.0, 85.0)])
def test_reactdice_matches_loops(p, react_p):
    rng = np.random.default_rng(int(p))
    train, v = shaping_member(rng, D=16, C=4)
    ref = energy_rows(ref_react_dice_logits(train.features, v.features, v.weight, v.bias, p, react_p))
    det = DETECTORS["react-dice"](p=p, react_p=react_p).fit(train)
    close(det.score(v), ref)
    assert (v.features > det.clip_).any()  # the clipping matters
    # distinct contributions: the entries above the interpolated percentile at rank p/100 * 63
    assert det.mask_.sum() == 64 - math.floor(p / 100 * 63) - 1


def test_reactdice_defaults_and_its_parts():
    det = DETECTORS["react-dice"]()
    assert (det.p, det.react_p) == (10.0, 90.0)
    rng = np.random.default_rng(8)
    train, v = shaping_member(rng)
    both = DETECTORS["react-dice"](p=70.0, react_p=90.0).fit(train)
    react = DETECTORS["react"](p=90.0).fit(train)
    dice = DETECTORS["dice"](p=70.0).fit(train)
    assert both.clip_ == react.clip_
    assert np.array_equal(both.mask_, dice.mask_)


SHAPING = [("ash-p", {"p": 60.0}), ("ash-b", {"p": 65.0}), ("scale", {"p": 85.0}),
           ("vra", {"p_low": 60.0, "p_high": 95.0, "gamma": 0.4}), ("react-dice", {"p": 30.0, "react_p": 90.0})]


def ref_shaped_logits(name, params, train: Views, v: Views) -> np.ndarray:
    if name in PER_SAMPLE:
        shaped = [PER_SAMPLE[name]([float(x) for x in r], params["p"]) for r in v.features]
        return head_rows(shaped, v.weight, v.bias)
    if name == "vra":
        return head_rows(ref_vra(train.features, v.features, params["p_low"], params["p_high"], params["gamma"]),
                         v.weight, v.bias)
    return ref_react_dice_logits(train.features, v.features, v.weight, v.bias, params["p"], params["react_p"])


@pytest.mark.parametrize("name,params", SHAPING, ids=[s[0] for s in SHAPING])
def test_shaping_ensembles_match_hand_computation(name, params):
    rng = np.random.default_rng(21)
    pairs = [shaping_member(rng, D=18, C=4) for _ in range(3)]
    trains, tests = [t for t, _ in pairs], [v for _, v in pairs]
    members = fit_members(name, params, trains)
    logits = [ref_shaped_logits(name, params, t, v) for t, v in pairs]
    assert DETECTORS[name].strategies == ("mean-logits", "mean-scores")
    assert resolve_strategy(DETECTORS[name], None) == "mean-logits"
    close(ensemble(name, params, "mean-logits", members, trains, tests), energy_rows(sum(logits) / 3))
    close(ensemble(name, params, "mean-scores", members, trains, tests),
          sum(energy_rows(z) for z in logits) / 3)
    for det, z, v in zip(members, logits, tests):  # members on their own
        close(det.score(v), energy_rows(z))


# --------------------------------------------------------------------------- gen


@pytest.mark.parametrize("gamma,M", [(0.1, 100), (0.1, 3), (0.5, 1), (2.0, 6)])
def test_gen_matches_loops(gamma, M):
    rng = np.random.default_rng(int(gamma * 10) + M)
    _, v = logit_member(rng)
    close(DETECTORS["gen"](gamma=gamma, top_m=M).score(v), ref_gen(v.logits, gamma, M))


def test_gen_defaults():
    det = DETECTORS["gen"]()
    assert (det.gamma, det.top_m) == (0.1, 100)
    assert DETECTORS["gen"].strategies == ("mean-logits", "mean-probs", "mean-scores")


def test_gen_keeps_the_resolution_of_confident_rows():
    # p_top = 1 / (1 + 5 e^-40) rounds to 1.0 in float64: 1 - p_top must be the sum of the others,
    # 5 e^-40 / (1 + 5 e^-40), not 0, or every confident row would tie
    C, g = 6, 0.1
    z = np.array([[0.0] + [-40.0] * (C - 1), [0.0] + [-41.0] * (C - 1)])
    got = DETECTORS["gen"](gamma=g).score(Views(logits=z))
    for row, gap in zip(got, (40.0, 41.0)):
        small = math.exp(-gap) / (1 + (C - 1) * math.exp(-gap))
        top, rest = 1 / (1 + (C - 1) * math.exp(-gap)), (C - 1) * small
        expected = -(top**g * rest**g + (C - 1) * small**g * (1 - small) ** g)
        assert row == pytest.approx(expected, rel=1e-12)
    assert got[0] < got[1]  # the more confident row scores higher


def test_gen_ensembles_match_hand_computation():
    rng = np.random.default_rng(5)
    pairs = [logit_member(rng) for _ in range(3)]
    trains, tests = [t for t, _ in pairs], [v for _, v in pairs]
    members = fit_members("gen", {}, trains)
    zs = [v.logits for v in tests]
    n, C = zs[0].shape
    p_bar = [[sum(softmax_row(z[i])[j] for z in zs) / 3 for j in range(C)] for i in range(n)]
    close(ensemble("gen", {}, "mean-logits", members, trains, tests), ref_gen(sum(zs) / 3, 0.1, 100))
    close(ensemble("gen", {}, "mean-probs", members, trains, tests), ref_gen_probs(p_bar, 0.1, 100))
    close(ensemble("gen", {}, "mean-scores", members, trains, tests), sum(ref_gen(z, 0.1, 100) for z in zs) / 3)


# --------------------------------------------------------------------------- klm


def test_klm_matches_loops():
    rng = np.random.default_rng(6)
    train, v = logit_member(rng)
    det = DETECTORS["klm"]().fit(train)
    close(det.score(v), ref_klm(train.logits, v.logits))
    assert det.n_logits_in_ == train.logits.shape[1]


def test_klm_classes_never_predicted_have_no_template():
    rng = np.random.default_rng(7)
    train, v = logit_member(rng, C=5)
    z = train.logits.copy()
    z[:, 4] = -50.0  # no training sample is predicted as class 4
    det = DETECTORS["klm"]().fit(Views(logits=z))
    assert det.template_classes_.tolist() == [0, 1, 2, 3]
    close(det.score(v), ref_klm(z, v.logits))
    assert np.isfinite(det.score(v)).all()


def test_klm_template_match_scores_highest():
    # a sample whose softmax equals a template has KL 0 to it: the maximum score, 0
    rng = np.random.default_rng(8)
    train, _ = logit_member(rng)
    det = DETECTORS["klm"]().fit(train)
    log_t = np.log(det.templates_)
    close(det.score(Views(logits=log_t)) + 1.0, np.ones(len(log_t)), rtol=1e-12)


def test_klm_ensemble_is_mean_scores():
    rng = np.random.default_rng(9)
    pairs = [logit_member(rng) for _ in range(3)]
    trains, tests = [t for t, _ in pairs], [v for _, v in pairs]
    members = fit_members("klm", {}, trains)
    assert resolve_strategy(DETECTORS["klm"], None) == "mean-scores"
    close(ensemble("klm", {}, "mean-scores", members, trains, tests),
          sum(ref_klm(t.logits, v.logits) for t, v in pairs) / 3)
    for s in ("mean-logits", "mean-probs"):
        with pytest.raises(OodensError, match="does not apply"):
            resolve_strategy(DETECTORS["klm"], s)


# --------------------------------------------------------------------------- openmax


@pytest.mark.parametrize("params", [{}, {"alpha": 2}, {"tailsize": 5, "eu_weight": 1.0}, {"alpha": 3, "tailsize": 50}])
def test_openmax_matches_loops(params):
    rng = np.random.default_rng(10 + len(params))
    train, v = logit_member(rng, n_train=150, C=4, spread=1.5)
    det = DETECTORS["openmax"](**params).fit(train)
    close(det.score(v), ref_openmax(train.logits, train.labels, v.logits, **params))


def test_openmax_defaults():
    det = DETECTORS["openmax"]()
    assert (det.tailsize, det.alpha, det.eu_weight) == (20, 10, 0.005)
    assert DETECTORS["openmax"].strategies == ("mean-scores",)


def test_openmax_weibull_is_the_maximum_likelihood_fit():
    """The fitted (shape, scale) of each class maximise the likelihood of its translated tail (libMR's
    location-0 fit): at least as likely as scipy's general-purpose fit and as any nearby parameters."""
    rng = np.random.default_rng(12)
    train, _ = logit_member(rng, n_train=150, C=4, spread=3.0)
    det = DETECTORS["openmax"](eu_weight=0.05).fit(train)
    _, fits = ref_openmax_fit(train.logits, train.labels, 20, 0.05)
    for c, (m, k, log_scale) in enumerate(fits):
        assert det.tail_min_[c] == pytest.approx(m, rel=1e-12)
        assert det.shape_[c] == pytest.approx(k, rel=1e-9)
        assert det.log_scale_[c] == pytest.approx(log_scale, rel=1e-9, abs=1e-15)
    # likelihood check on the first class: the tail by hand
    z, y = train.logits, train.labels
    rows = z[(z.argmax(axis=1) == 0) & (y == 0)]
    mu = rows.mean(axis=0)
    d = np.sort([ref_eucos(r, mu, 0.05) for r in rows])[-20:]
    t = d - d.min() + T_LIBMR
    k, scale = det.shape_[0], T_LIBMR * math.exp(det.log_scale_[0])

    def loglik(kk, ss):
        return float(weibull_min.logpdf(t, kk, scale=ss).sum())

    best = loglik(k, scale)
    c_sp, _, s_sp = weibull_min.fit(t, floc=0)
    assert best >= loglik(c_sp, s_sp) - 1e-6
    for dk, ds in ((1.01, 1.0), (0.99, 1.0), (1.0, 1 + 1e-7), (1.0, 1 - 1e-7)):
        assert best >= loglik(k * dk, scale * ds)


def test_openmax_leave_out_member_maps_columns_to_classes():
    rng = np.random.default_rng(13)
    train, v = logit_member(rng, n_train=150, C=4)
    classes = np.array([0, 2, 5, 7])
    labels = classes[train.labels]
    det = DETECTORS["openmax"]().fit(Views(logits=train.logits, labels=labels, classes=classes))
    close(det.score(Views(logits=v.logits, classes=classes)),
          ref_openmax(train.logits, labels, v.logits, classes=classes))


def test_openmax_needs_labels_and_correct_samples():
    rng = np.random.default_rng(14)
    train, _ = logit_member(rng, C=4)
    with pytest.raises(OodensError, match="views.labels"):
        DETECTORS["openmax"]().fit(Views(logits=train.logits))
    z = train.logits.copy()
    z[:, 3] = -50.0  # class 3 is never predicted: no correctly classified sample
    with pytest.raises(OodensError, match=r"class 3 \(logit column 3\) has 0"):
        DETECTORS["openmax"]().fit(Views(logits=z, labels=train.labels))


def test_openmax_ensemble_is_mean_scores():
    rng = np.random.default_rng(15)
    pairs = [logit_member(rng, n_train=120, C=4) for _ in range(3)]
    trains, tests = [t for t, _ in pairs], [v for _, v in pairs]
    members = fit_members("openmax", {}, trains)
    assert resolve_strategy(DETECTORS["openmax"], None) == "mean-scores"
    close(ensemble("openmax", {}, "mean-scores", members, trains, tests),
          sum(ref_openmax(t.logits, t.labels, v.logits) for t, v in pairs) / 3)


# --------------------------------------------------------------------------- hyperparameter errors


@pytest.mark.parametrize("name,params,param,message", [
    ("ash-p", {"p": 100.0}, "p", r"^p=100 is out of range: expected a percentile in \[0, 100\)$"),
    ("ash-b", {"p": -5.0}, "p", r"^p=-5 is out of range"),
    ("scale", {"p": float("inf")}, "p", r"^p=inf is out of range"),
    ("vra", {"p_low": 90.0, "p_high": 90.0}, "p_low", r"^p_low=90 is out of range: expected p_low < p_high = 90$"),
    ("vra", {"p_high": 100.0}, "p_high", r"^p_high=100 is out of range"),
    ("vra", {"gamma": -0.1}, "gamma", r"^gamma=-0.1 is out of range: expected a finite number >= 0$"),
    ("react-dice", {"react_p": 100.0}, "react_p", r"^react_p=100 is out of range"),
    ("react-dice", {"p": -1.0}, "p", r"^p=-1 is out of range"),
    ("gen", {"gamma": 0.0}, "gamma", r"^gamma=0 is out of range: expected a finite number > 0$"),
    ("gen", {"top_m": 0}, "top_m", r"^top_m=0 is out of range: expected an integer >= 1$"),
    ("gen", {"top_m": 2.5}, "top_m", r"^top_m=2.5 is out of range"),
    ("openmax", {"tailsize": 1}, "tailsize", r"^tailsize=1 is out of range: expected an integer >= 2$"),
    ("openmax", {"alpha": 0}, "alpha", r"^alpha=0 is out of range: expected an integer >= 1$"),
    ("openmax", {"eu_weight": -1.0}, "eu_weight", r"^eu_weight=-1 is out of range"),
])
def test_parameter_errors(name, params, param, message):
    with pytest.raises(ParameterError, match=message) as info:
        DETECTORS[name](**params).validate()
    assert (info.value.owner, info.value.param) == (name, param)


@pytest.mark.parametrize("name", ["ash-p", "ash-b", "scale"])
def test_pruning_every_feature_names_the_detector(name):
    _, v = shaping_member(np.random.default_rng(16), D=24)
    with pytest.raises(ParameterError, match=r"^p=99 prunes every feature") as info:
        DETECTORS[name](p=99.0).score(v)
    assert (info.value.owner, info.value.param) == (name, "p")


@pytest.mark.parametrize("name", ["dice", "react-dice"])
def test_fitted_heads_refuse_views_of_fewer_classes(name):
    """A class-masked set (ImageNet-R's 200 of 1000 classes) holds fewer head rows than fit shaped: one error,
    not a score over classes the set left out."""
    from oodens.errors import OodensError

    rng = np.random.default_rng(0)
    h, w, b = rng.random((20, 6)), rng.normal(size=(4, 6)), rng.normal(size=4)
    det = DETECTORS[name]().fit(Views(features=h, weight=w, bias=b, logits=h @ w.T + b))
    with pytest.raises(OodensError, match="4-class head in fit, but these views hold 2 classes"):
        det.score(Views(features=h, weight=w[:2], bias=b[:2], logits=(h @ w.T + b)[:, :2]))
