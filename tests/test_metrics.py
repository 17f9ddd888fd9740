"""oodens.metrics.ood against independent computations (brute-force loops and sklearn).

Convention: scores are higher for ID. See DESIGN.md section 7.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oodens.metrics import stats
from oodens.metrics.ood import KINDS, METRICS, OOD_METRICS, QUALITY_METRICS, Metric, accuracy, ood_metrics

KEYS = {"fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"}


# ----------------------------------------------------------------------------
# brute-force references (plain Python loops, no oodens code)
# ----------------------------------------------------------------------------


def _k95(n: int) -> int:
    """ceil(0.95 n) in exact integer arithmetic."""
    return (95 * n + 99) // 100


def bf_fpr95(id_scores, ood_scores, positive="id") -> float:
    id_s = [float(x) for x in id_scores]
    ood_s = [float(x) for x in ood_scores]
    if positive == "id":
        pos, neg = id_s, ood_s
    else:  # OOD positive, scores negated
        pos, neg = [-x for x in ood_s], [-x for x in id_s]
    t = sorted(pos, reverse=True)[_k95(len(pos)) - 1]
    fp = 0
    for x in neg:
        if x >= t:
            fp += 1
    return fp / len(neg)


def bf_auroc(id_scores, ood_scores) -> float:
    total = 0.0
    for a in id_scores:
        for b in ood_scores:
            if a > b:
                total += 1.0
            elif a == b:
                total += 0.5
    return total / (len(id_scores) * len(ood_scores))


def bf_average_precision(pos_scores, neg_scores) -> float:
    """sklearn's AP: sum_n (R_n - R_{n-1}) P_n, thresholds at the distinct scores (descending)."""
    pos = [float(x) for x in pos_scores]
    neg = [float(x) for x in neg_scores]
    thresholds = sorted(set(pos) | set(neg), reverse=True)
    ap, r_prev = 0.0, 0.0
    for t in thresholds:
        tp = sum(1 for x in pos if x >= t)
        fp = sum(1 for x in neg if x >= t)
        r = tp / len(pos)
        p = tp / (tp + fp)
        ap += (r - r_prev) * p
        r_prev = r
    return ap


def bf_detection_error(id_scores, ood_scores) -> float:
    id_s = [float(x) for x in id_scores]
    ood_s = [float(x) for x in ood_scores]
    best = math.inf
    for t in sorted(set(id_s) | set(ood_s)) + [math.inf]:
        tpr = sum(1 for x in id_s if x >= t) / len(id_s)
        fpr = sum(1 for x in ood_s if x >= t) / len(ood_s)
        best = min(best, 0.5 * (1.0 - tpr) + 0.5 * fpr)
    return best


def _sk_labels(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[np.asarray(id_s, float), np.asarray(ood_s, float)]
    return y, s


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------


def _cases():
    """(label, id_scores, ood_scores) of several shapes, continuous and heavily tied."""
    rng = np.random.default_rng(0)
    out = []
    out.append(("gauss", rng.normal(1.0, 1.0, 137), rng.normal(0.0, 1.2, 91)))
    out.append(("ties-int5", rng.integers(0, 5, 60).astype(float), rng.integers(0, 5, 45).astype(float)))
    out.append(("ties-int3-shift", rng.integers(1, 4, 40).astype(float), rng.integers(0, 3, 77).astype(float)))
    out.append(("n20", rng.normal(0.5, 1.0, 20), rng.normal(0.0, 1.0, 20)))
    out.append(("n100-ties", np.round(rng.normal(0.5, 1.0, 100), 1), np.round(rng.normal(0.0, 1.0, 100), 1)))
    out.append(("tiny", np.array([0.3]), np.array([0.1, 0.3, 0.7])))
    out.append(("reversed", rng.normal(-2.0, 1.0, 33), rng.normal(2.0, 1.0, 29)))
    out.append(("all-equal", np.full(10, 2.0), np.full(7, 2.0)))
    return out


CASES = _cases()
IDS = [c[0] for c in CASES]


# ----------------------------------------------------------------------------
# FPR95
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fpr95_matches_brute_force(case, positive):
    _, id_s, ood_s = case
    got = ood_metrics(id_s, ood_s, positive=positive)["fpr95"]
    assert got == pytest.approx(bf_fpr95(id_s, ood_s, positive), abs=1e-12)


def test_fpr95_many_ties_seeds():
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        id_s = rng.integers(0, 5, rng.integers(1, 80)).astype(float)
        ood_s = rng.integers(0, 5, rng.integers(1, 80)).astype(float)
        for positive in ("id", "ood"):
            got = ood_metrics(id_s, ood_s, positive=positive)["fpr95"]
            assert got == pytest.approx(bf_fpr95(id_s, ood_s, positive), abs=1e-12), (seed, positive)


def test_hand_worked_example():
    # id = [4, 3, 2, 1], ood = [0, 1, 1, 5]
    # positive="id": ceil(0.95*4) = 4 -> t = 4th largest ID score = 1;
    #   OOD >= 1: {1, 1, 5} -> FPR95 = 3/4.
    # positive="ood": -ood = [0, -1, -1, -5], ceil(0.95*4) = 4 -> t = -5;
    #   ID with -score >= -5: all four (-4, -3, -2, -1) -> FPR95 = 1.
    # AUROC over 16 pairs: id 4, 3, 2 each beat 0, 1, 1 (3 wins each, lose to 5) = 9;
    #   id 1 beats 0 (1), ties 1, 1 (2 x 0.5 = 1) -> 2. Total 11/16 = 0.6875.
    # Detection error, predict ID when score >= t:
    #   t=inf: .5(1-0)+.5(0)=.5; t=5: .5+.125=.625; t=4: .375+.125=.5; t=3: .25+.125=.375;
    #   t=2: .125+.125=.25; t=1: 0+.375=.375; t=0: 0+.5=.5  -> min 0.25.
    # AUPR-In, thresholds 5,4,3,2,1,0 (tp, fp): (0,1) (1,1) (2,1) (3,1) (4,3) (4,4);
    #   recall steps of 1/4 at t=4,3,2,1 with precisions 1/2, 2/3, 3/4, 4/7
    #   -> (1/2 + 2/3 + 3/4 + 4/7) / 4 = (42 + 56 + 63 + 48) / (84*4) = 209/336.
    id_s, ood_s = [4, 3, 2, 1], [0, 1, 1, 5]
    m = ood_metrics(id_s, ood_s, positive="id")
    assert m["fpr95"] == pytest.approx(0.75)
    assert m["auroc"] == pytest.approx(11 / 16)
    assert m["detection_error"] == pytest.approx(0.25)
    assert m["aupr_in"] == pytest.approx(209 / 336)
    m_ood = ood_metrics(id_s, ood_s, positive="ood")
    assert m_ood["fpr95"] == pytest.approx(1.0)


def test_fpr95_hand_example_n20():
    # n_id = 20 -> ceil(19.0) = 19: t = 19th largest of 1..20 = 2; OOD >= 2 among
    # [1.5, 2, 2, 3, 0] -> {2, 2, 3} -> 3/5. (Ties at t are false positives.)
    id_s = np.arange(1, 21, dtype=float)
    ood_s = np.array([1.5, 2.0, 2.0, 3.0, 0.0])
    assert ood_metrics(id_s, ood_s)["fpr95"] == pytest.approx(3 / 5)
    # n_id = 21 -> ceil(19.95) = 20: t = 20th largest of 1..21 = 2 -> same 3/5
    assert ood_metrics(np.arange(1, 22, dtype=float), ood_s)["fpr95"] == pytest.approx(3 / 5)
    # n_id = 19 -> ceil(18.05) = 19: t = 1 -> OOD >= 1: {1.5, 2, 2, 3} -> 4/5
    assert ood_metrics(np.arange(1, 20, dtype=float), ood_s)["fpr95"] == pytest.approx(4 / 5)


# ----------------------------------------------------------------------------
# AUROC, AUPR, detection error
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_auroc(case):
    _, id_s, ood_s = case
    got = ood_metrics(id_s, ood_s)["auroc"]
    assert got == pytest.approx(bf_auroc(id_s, ood_s), abs=1e-12)
    y, s = _sk_labels(id_s, ood_s)
    assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_aupr(case):
    _, id_s, ood_s = case
    m = ood_metrics(id_s, ood_s)
    y, s = _sk_labels(id_s, ood_s)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(bf_average_precision(id_s, ood_s), abs=1e-12)
    # AUPR-Out = AP with OOD positive on negated scores
    assert m["aupr_out"] == pytest.approx(bf_average_precision(-np.asarray(ood_s), -np.asarray(id_s)), abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_detection_error(case):
    _, id_s, ood_s = case
    got = ood_metrics(id_s, ood_s)["detection_error"]
    assert got == pytest.approx(bf_detection_error(id_s, ood_s), abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_convention_independent_metrics(case):
    _, id_s, ood_s = case
    a = ood_metrics(id_s, ood_s, positive="id")
    b = ood_metrics(id_s, ood_s, positive="ood")
    for k in ("auroc", "aupr_in", "aupr_out", "detection_error"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_keys_and_ranges(case, positive):
    _, id_s, ood_s = case
    m = ood_metrics(id_s, ood_s, positive=positive)
    assert set(m) == KEYS
    for k, v in m.items():
        assert isinstance(v, float), k
        assert 0.0 <= v <= 1.0, (k, v)


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_perfect_separation(positive):
    rng = np.random.default_rng(1)
    id_s = rng.uniform(10, 11, 50)
    ood_s = rng.uniform(0, 1, 70)
    m = ood_metrics(id_s, ood_s, positive=positive)
    assert m["fpr95"] == 0.0
    assert m["auroc"] == 1.0
    assert m["aupr_in"] == 1.0
    assert m["aupr_out"] == 1.0
    assert m["detection_error"] == 0.0


def test_accepts_lists_and_2d_columns():
    rng = np.random.default_rng(2)
    id_s = rng.normal(1, 1, 30)
    ood_s = rng.normal(0, 1, 25)
    a = ood_metrics(list(id_s), list(ood_s))
    y, s = _sk_labels(id_s, ood_s)
    assert a["auroc"] == pytest.approx(roc_auc_score(y, s))
    b = ood_metrics(id_s[:, None], ood_s[:, None])
    assert b["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert b["fpr95"] == pytest.approx(bf_fpr95(id_s, ood_s))


# ----------------------------------------------------------------------------
# invalid input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("positive", ["ID", "in", "", None, "both"])
def test_invalid_positive(positive):
    with pytest.raises(ValueError):
        ood_metrics([1.0, 2.0], [0.0], positive=positive)


@pytest.mark.parametrize("id_s,ood_s", [([], [1.0]), ([1.0], []), ([], [])])
def test_empty_input(id_s, ood_s):
    with pytest.raises(ValueError):
        ood_metrics(id_s, ood_s)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["id", "ood"])
def test_non_finite_input(bad, where):
    id_s = np.array([1.0, 2.0, 3.0])
    ood_s = np.array([0.0, 1.5])
    if where == "id":
        id_s[1] = bad
    else:
        ood_s[0] = bad
    for positive in ("id", "ood"):
        with pytest.raises(ValueError):
            ood_metrics(id_s, ood_s, positive=positive)


# ----------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------


def test_accuracy_hand_count():
    logits = np.array(
        [
            [0.1, 2.0, 0.3],  # argmax 1
            [5.0, 1.0, 1.0],  # argmax 0
            [0.0, 0.0, 9.0],  # argmax 2
            [1.0, 3.0, 2.0],  # argmax 1
            [-1.0, -2.0, -0.5],  # argmax 2
        ]
    )
    labels = np.array([1, 0, 1, 1, 0])
    # correct: rows 0, 1, 3 -> 3/5
    assert accuracy(logits, labels) == pytest.approx(3 / 5)
    assert accuracy(logits, [1, 0, 2, 1, 2]) == pytest.approx(1.0)


def test_accuracy_random_loop():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 7))
    labels = rng.integers(0, 7, 200)
    correct = 0
    for row, y in zip(logits, labels):
        best = 0
        for c in range(len(row)):
            if row[c] > row[best]:
                best = c
        correct += int(best == y)
    assert accuracy(logits, labels) == pytest.approx(correct / 200)


# ----------------------------------------------------------------------------
# the registry: names, direction, and the functions behind ood_metrics
# ----------------------------------------------------------------------------


def test_registry_names_and_kinds():
    assert list(METRICS) == ["fpr95", "auroc", "aupr_in", "aupr_out", "detection_error",
                             "id_accuracy", "id_nll", "id_brier", "id_ece", "ood_accuracy"]
    assert OOD_METRICS == ("fpr95", "auroc", "aupr_in", "aupr_out", "detection_error")
    assert set(OOD_METRICS) == KEYS
    assert QUALITY_METRICS == ("id_accuracy", "id_nll", "id_brier", "id_ece")
    assert METRICS["ood_accuracy"].kind == "shift"
    for name, m in METRICS.items():
        assert isinstance(m, Metric) and m.name == name and m.kind in KINDS
        assert (m.fn is not None) == (m.kind == "ood"), name
    assert len({m.label for m in METRICS.values()}) == len(METRICS)
    assert {n for n, m in METRICS.items() if not m.percent} == {"id_nll", "id_brier"}
    with pytest.raises(Exception):  # frozen
        METRICS["auroc"].higher_is_better = False
    with pytest.raises(ValueError):
        Metric("x", "X", True, "other")
    with pytest.raises(ValueError):
        Metric("x", "X", True, "quality", fn=lambda i, o, p: 0.0)
    with pytest.raises(TypeError):
        METRICS["id_nll"]([1.0], [0.0])


@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_registry_functions_are_ood_metrics(case, positive):
    """ood_metrics is the registry's OOD metrics, nothing else: each one called alone gives the same number."""
    _, id_s, ood_s = case
    m = ood_metrics(id_s, ood_s, positive=positive)
    assert list(m) == list(OOD_METRICS)
    for name in OOD_METRICS:
        assert METRICS[name](list(id_s), list(ood_s), positive) == m[name], name
        assert METRICS[name].fn(np.asarray(id_s, float), np.asarray(ood_s, float), positive) == m[name], name


@pytest.mark.parametrize("bad", [([], [1.0], "id"), ([1.0], [np.nan], "id"), ([1.0], [0.0], "OOD")])
def test_registry_call_validates(bad):
    for name in OOD_METRICS:
        with pytest.raises(ValueError):
            METRICS[name](*bad)


def _better(m: Metric, a: float, b: float) -> bool:
    return a > b if m.higher_is_better else a < b


@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("name", OOD_METRICS)
def test_registry_direction_brute_force(name, positive):
    """A perfect detector gets the best value (1 when higher is better, 0 when lower is), computed by the
    brute-force references; no detector does better, and the reversed detector does strictly worse."""
    m = METRICS[name]
    brute = {"fpr95": lambda i, o: bf_fpr95(i, o, positive), "auroc": bf_auroc,
             "aupr_in": bf_average_precision, "aupr_out": lambda i, o: bf_average_precision(-o, -i),
             "detection_error": bf_detection_error}[name]
    rng = np.random.default_rng(5)
    id_s, ood_s = rng.uniform(2, 3, 40), rng.uniform(0, 1, 30)
    best = 1.0 if m.higher_is_better else 0.0
    assert brute(id_s, ood_s) == pytest.approx(best, abs=1e-12)
    assert m(id_s, ood_s, positive) == pytest.approx(best, abs=1e-12)
    assert _better(m, m(id_s, ood_s, positive), m(ood_s, id_s, positive))  # reversed: ID scored as OOD
    assert _better(m, brute(id_s, ood_s), brute(ood_s, id_s))
    for seed in range(10):
        r = np.random.default_rng(50 + seed)
        i, o = r.normal(0.5, 1, 30), r.normal(0, 1, 25)
        assert not _better(m, m(i, o, positive), best)


def test_quality_and_shift_direction_brute_force():
    """Accuracy: higher is better (all correct = 1). NLL, Brier, ECE: lower is better (0 for one-hot correct
    predictions), all worse for a confidently wrong predictor; see tests/test_calibration.py for their values."""
    from oodens.metrics import calibration as cal

    y = np.array([0, 1, 2, 1])
    right, wrong = np.eye(3)[y], np.eye(3)[(y + 1) % 3] * 0.9 + 0.1 / 3
    fns = {"id_accuracy": accuracy, "ood_accuracy": accuracy, "id_nll": cal.nll, "id_brier": cal.brier,
           "id_ece": cal.ece}
    assert set(fns) == {n for n, m in METRICS.items() if m.kind != "ood"}
    for name, f in fns.items():
        m = METRICS[name]
        assert f(right, y) == pytest.approx(1.0 if m.higher_is_better else 0.0, abs=1e-12), name
        assert _better(m, f(right, y), f(wrong, y)), name


def test_rank_auroc_equals_sklearn():
    """The registry's AUROC (Mann-Whitney on mid-ranks, fast for the bootstrap) is sklearn's roc_auc_score."""
    for seed in range(30):
        rng = np.random.default_rng(200 + seed)
        n_id, n_ood = rng.integers(1, 400, 2)
        if seed % 2:
            id_s, ood_s = rng.integers(0, 4, n_id).astype(float), rng.integers(0, 4, n_ood).astype(float)
        else:
            id_s, ood_s = rng.normal(0.3, 1, n_id), rng.normal(0, 1, n_ood)
        y, s = _sk_labels(id_s, ood_s)
        assert METRICS["auroc"](id_s, ood_s) == pytest.approx(roc_auc_score(y, s), abs=1e-12), seed


@pytest.mark.parametrize("name", list(METRICS))
def test_stats_direction_comes_from_the_registry(name):
    """stats.ensemble_test's one-sided alternative follows higher_is_better."""
    m = METRICS[name]
    step = 0.1 if m.higher_is_better else -0.1
    worse_modes = [0.5 - step, 0.5 - 2 * step, 0.5 - 1.5 * step]  # all worse than an ensemble at 0.5
    assert stats.ensemble_test(worse_modes, 0.5, name)[1] < 0.05
    assert stats.ensemble_test([1 - v for v in worse_modes], 0.5, name)[1] > 0.5


def test_bootstrap_uses_the_registry():
    rng = np.random.default_rng(9)
    id_s, ood_s = rng.normal(1, 1, 60), rng.normal(0, 1, 50)
    for positive in ("id", "ood"):
        exact = ood_metrics(id_s, ood_s, positive)
        for name in OOD_METRICS:
            assert stats.bootstrap_ci(id_s, ood_s, name, n=5, positive=positive)[0] == exact[name]
    for name in ("id_nll", "ood_accuracy", "nope"):
        with pytest.raises(ValueError):
            stats.bootstrap_ci(id_s, ood_s, name, n=5)
