"""Score-aggregating strategies (median, min, max, std, rank, zscore, fisher, simes) against hand computations,
and their availability to every per-member detector."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2, combine_pvalues

from oodens.detectors import DETECTORS, get_detector
from oodens.ensemble.evaluate import MemberSet, Sweep, evaluate_detector
from oodens.ensemble.strategies import (AGGREGATORS, STRATEGIES, ensemble_scores, resolve_strategy,
                                        strategies_for, supported_strategies)
from oodens.errors import OodensError
from oodens.views.types import Views

M, C = 3, 4


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(7)

    def member_sets(n, shift):
        return [Views(logits=rng.normal(shift, 1.5, (n, C)), labels=np.zeros(n, dtype=np.int64)) for _ in range(M)]

    return {"train": member_sets(20, 1.0), "val": member_sets(25, 1.0), "id": member_sets(15, 1.0),
            "ood": member_sets(12, -1.0)}


def energy(z):
    z = np.asarray(z, dtype=np.float64)
    return np.log(np.exp(z).sum(axis=1))


def member_scores(sets):
    return np.array([energy(v.logits) for v in sets])  # (M, n)


def p_naive(s, val):
    """(1 + #{v <= s}) / (n_val + 1), one sample at a time."""
    return np.array([(1 + sum(1 for v in val if v <= x)) / (len(val) + 1) for x in s])


def hand(name, S, V):
    """The aggregator by hand: S (M, n) member scores, V (M, n_val) member validation scores."""
    n = S.shape[1]
    if name == "mean-scores":
        return np.array([sum(S[:, j]) / M for j in range(n)])
    if name == "median":
        return np.array([sorted(S[:, j])[M // 2] for j in range(n)])  # M odd
    if name == "min":
        return np.array([min(S[:, j]) for j in range(n)])
    if name == "max":
        return np.array([max(S[:, j]) for j in range(n)])
    if name == "std":
        return np.array([-np.sqrt(sum((x - S[:, j].mean()) ** 2 for x in S[:, j]) / M) for j in range(n)])
    if name == "rank":
        return np.mean([[sum(1 for v in V[i] if v <= x) / len(V[i]) for x in S[i]] for i in range(M)], axis=0)
    if name == "zscore":
        return np.mean([(S[i] - V[i].mean()) / np.sqrt(((V[i] - V[i].mean()) ** 2).mean()) for i in range(M)],
                       axis=0)
    p = np.array([p_naive(S[i], V[i]) for i in range(M)])
    if name == "fisher":  # Fisher's statistic: the sum of the log p-values
        return np.array([sum(np.log(q) for q in p[:, j]) for j in range(n)])
    if name == "simes":
        return np.array([min(q * M / (i + 1) for i, q in enumerate(sorted(p[:, j]))) for j in range(n)])
    raise AssertionError(name)


def member_set(views):
    return MemberSet([f"m{i}" for i in range(M)], views["train"], views["id"], {"ood": views["ood"]},
                     val=views["val"])


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_equals_hand_computation(views, name):
    run = evaluate_detector(get_detector("energy")(), member_set(views), name)
    V = member_scores(views["val"])
    for key in ("id", "ood"):
        want = hand(name, member_scores(views[key]), V)
        np.testing.assert_allclose(run.scores["ensemble"][key], want, rtol=1e-12, atol=1e-15)
        for i in range(M):  # the member rows are the members' own scores
            np.testing.assert_allclose(run.scores[f"m{i}"][key], energy(views[key][i].logits), rtol=1e-12)


def test_fisher_and_simes_are_fused_pvalues(views):
    S, V = member_scores(views["ood"]), member_scores(views["val"])
    out = ensemble_scores("fisher", DETECTORS["energy"], [DETECTORS["energy"]() for _ in range(M)], views["train"],
                          {"x": views["ood"]}, val=views["val"])["x"]
    p = np.array([p_naive(S[i], V[i]) for i in range(M)])
    for j in range(S.shape[1]):  # the score is Fisher's statistic; its fused p-value is scipy's
        assert chi2.sf(-2 * out[j], 2 * M) == pytest.approx(combine_pvalues(p[:, j], method="fisher").pvalue,
                                                            rel=1e-12)
    simes = ensemble_scores("simes", DETECTORS["energy"], [DETECTORS["energy"]() for _ in range(M)],
                            views["train"], {"x": views["ood"]}, val=views["val"])["x"]
    assert np.all((0 < simes) & (simes <= 1)) and np.all(out <= 0)
    # OOD (lower energies) gets smaller fused p-values than ID: higher = more ID
    ids = ensemble_scores("simes", DETECTORS["energy"], [DETECTORS["energy"]() for _ in range(M)],
                          views["train"], {"x": views["id"]}, val=views["val"])["x"]
    assert ids.mean() > simes.mean()


def test_validation_strategies_need_validation_views(views):
    sets = MemberSet([f"m{i}" for i in range(M)], views["train"], views["id"], {"ood": views["ood"]})
    with pytest.raises(OodensError, match="ID validation"):
        evaluate_detector(get_detector("msp")(), sets, "zscore")
    evaluate_detector(get_detector("msp")(), sets, "median")  # no validation needed


def test_zscore_of_constant_validation_scores_is_one_line(views):
    flat = [Views(logits=np.zeros((5, C)), labels=np.zeros(5, dtype=np.int64)) for _ in range(M)]
    with pytest.raises(OodensError, match="constant"):
        ensemble_scores("zscore", DETECTORS["msp"], [DETECTORS["msp"]() for _ in range(M)], views["train"],
                        {"x": views["id"]}, val=flat)


def test_every_per_member_detector_supports_every_aggregator():
    for cls in DETECTORS.values():
        got = supported_strategies(cls)
        assert got[: len(cls.strategies)] == tuple(cls.strategies)  # its own first: its default is unchanged
        if cls.ensemble_only:
            assert not set(AGGREGATORS) & set(got)
        else:
            assert set(AGGREGATORS) <= set(got)
            for a in AGGREGATORS:
                assert resolve_strategy(cls, a) == a
    with pytest.raises(OodensError, match="does not apply"):
        resolve_strategy(DETECTORS["pds"], "median")


def test_std_needs_two_members(views):
    assert "std" not in strategies_for(DETECTORS["msp"], 1) and "std" in strategies_for(DETECTORS["msp"], 2)
    one = MemberSet(["m0"], views["train"][:1], views["id"][:1], {"ood": views["ood"][:1]})
    with pytest.raises(OodensError, match="at least 2 members"):
        evaluate_detector(get_detector("msp")(), one, "std")
    # the ensemble-size sweep leaves out k = 1 for std
    run = evaluate_detector(get_detector("msp")(), member_set(views), "std", sweep=Sweep([1, 2, 3]))
    assert sorted({r["k"] for r in run.records if r["role"] == "subsets"}) == [2, 3]


def test_std_is_undefined_for_one_member(views):
    """One member: the std row holds None (undefined), not 0; one subset: its std is None."""
    one = MemberSet(["m0"], views["train"][:1], views["id"][:1], {"ood": views["ood"][:1]})
    run = evaluate_detector(get_detector("msp")(), one, None, sweep=Sweep([1]))
    std = [r for r in run.records if r["role"] == "std"]
    assert std and all(r["auroc"] is None and r["fpr95"] is None and r["id_accuracy"] is None for r in std)
    sub_std = [r for r in run.records if r["role"] == "subsets" and r["stat"] == "std"]
    assert sub_std and all(r["auroc"] is None for r in sub_std)  # k = 1 of 1: one subset
    assert set(STRATEGIES) >= set(AGGREGATORS)


def test_undefined_std_renders_as_a_dash(views):
    from oodens.report.tables import detector_tables
    from oodens.results import records_frame

    one = MemberSet(["m0"], views["train"][:1], views["id"][:1], {"ood": views["ood"][:1]})
    run = evaluate_detector(get_detector("msp")(), one, None, sweep=Sweep([1]))
    frame = records_frame([{"benchmark": "toy", **r} for r in run.records])
    assert frame.loc[frame["role"] == "std", "auroc"].isna().all()
    table = detector_tables(frame)[0].frame
    mean_row = table[table["member"] == "mean ± std"].iloc[0]
    assert all(c.endswith("± —") for c in mean_row.iloc[2:] if c)
    sweep_row = table[table["member"].str.startswith("k=1")].iloc[0]
    assert all(c.endswith("± —") for c in sweep_row.iloc[2:] if c)


def test_fisher_ranks_samples_its_fused_pvalue_ties():
    """Deep inside ID the fused p-value rounds to 1.0 for different statistics; the score keeps them apart."""
    from oodens.ensemble.strategies import agg_fisher

    val = [np.arange(1e5)] * 6
    scores = [np.array([99_990.0, 99_995.0, 99_998.0])] * 6  # 6 members' p-values near 1, all distinct
    stat = agg_fisher(scores, val)
    assert list(chi2.sf(-2 * stat, 12)) == [1.0, 1.0, 1.0]  # the fused p-values tie (1.0 in float64)
    assert stat[0] < stat[1] < stat[2]
