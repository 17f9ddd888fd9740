"""Ensemble strategies and evaluate_detector against hand-computed ensembles (DESIGN.md section 6)."""

from __future__ import annotations

import numpy as np
import pytest

from oodens.detectors import DETECTORS
from oodens.errors import OodensError
from evaluation import evaluate_named, row
from oodens.ensemble.strategies import STRATEGIES, ensemble_scores, resolve_strategy
from oodens.metrics.ood import OOD_METRICS, ood_metrics
from oodens.views.types import Views

from reference import normalise64, ref_knn, ref_mahalanobis

# ----------------------------------------------------------------------------
# reference formulas (independent of oodens)
# ----------------------------------------------------------------------------


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_msp(z):
    return softmax64(z).max(axis=1)


def ref_maxlogit(z):
    return np.asarray(z, dtype=np.float64).max(axis=1)


def ref_energy(z, T=1.0):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1)
    return m + T * np.log(np.exp((z - m[:, None]) / T).sum(axis=1))


LOGIT_REF = {"msp": ref_msp, "maxlogit": ref_maxlogit, "energy": ref_energy}


# ----------------------------------------------------------------------------
# data: 3 members, train / id-test / two OOD sets
# ----------------------------------------------------------------------------

N_MEMBERS = 3
C = 5
D = 6
MEMBERS = ["mode0", "mode1", "mode2"]


def _member_views(rng, n, labels, shift):
    out = []
    for m in range(N_MEMBERS):
        logits = rng.normal(0.0, 2.0, (n, C))
        if labels is not None:
            logits[np.arange(n), labels] += 2.0 - shift
        feats = (rng.normal(size=(n, D)) + (labels[:, None] * 0.5 if labels is not None else 0.0) + shift)
        out.append(Views(logits=logits, features=feats.astype(np.float32), labels=labels))
    return out


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    n_train, n_id, n_ood = 90, 40, 30
    train_labels = rng.integers(0, C, n_train)
    id_labels = rng.integers(0, C, n_id)
    train = _member_views(rng, n_train, train_labels, 0.0)
    id_test = _member_views(rng, n_id, id_labels, 0.0)
    ood_labels = np.full(n_ood, -1)
    oods = {}
    for name, shift in (("farood", 1.5), ("nearood", 0.5)):
        views = []
        for m in range(N_MEMBERS):
            logits = rng.normal(0.0, 2.0, (n_ood, C))
            feats = rng.normal(size=(n_ood, D)) + shift
            views.append(Views(logits=logits, features=feats.astype(np.float32), labels=ood_labels))
        oods[name] = views
    return {"train": train, "id": id_test, "oods": oods}


def _sets(data):
    """dataset key -> list of member views (keys as in DetectorRun.scores)."""
    return {"id": data["id"], **data["oods"]}


# ----------------------------------------------------------------------------
# strategy resolution
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,strategy",
    [
        ("knn", "mean-logits"),
        ("knn", "mean-probs"),
        ("mahalanobis", "mean-logits"),
        ("msp", "concat"),
        ("msp", "mean-features"),
        ("energy", "mean-probs"),
        ("maxlogit", "concat"),
    ],
)
def test_unsupported_pair(name, strategy):
    with pytest.raises(OodensError):
        resolve_strategy(DETECTORS[name], strategy)


@pytest.mark.parametrize("strategy", ["mean", "bogus", "", "MEAN-LOGITS"])
def test_unknown_strategy(strategy):
    for name in ("msp", "knn"):
        with pytest.raises(OodensError):
            resolve_strategy(DETECTORS[name], strategy)


def test_unsupported_pair_via_evaluate(data):
    with pytest.raises(OodensError):
        evaluate_named("knn", {"k": 5}, "mean-logits", MEMBERS, data["train"], data["id"], data["oods"])


def test_default_strategies():
    assert resolve_strategy(DETECTORS["msp"], None) == "mean-logits"
    assert resolve_strategy(DETECTORS["energy"], None) == "mean-logits"
    assert resolve_strategy(DETECTORS["knn"], None) == "concat"
    assert resolve_strategy(DETECTORS["mahalanobis"], None) == "concat"
    assert resolve_strategy(DETECTORS["msp"], "mean-probs") == "mean-probs"
    assert set(STRATEGIES) >= {"mean-logits", "mean-probs", "concat", "mean-features", "mean-scores"}


# ----------------------------------------------------------------------------
# ensemble scores per strategy
# ----------------------------------------------------------------------------


def _ensemble(run):
    return run.scores["ensemble"]


@pytest.mark.parametrize("name", ["msp", "maxlogit", "energy"])
def test_mean_logits(data, name):
    run = evaluate_named(name, {}, "mean-logits", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    assert set(ens) == {"id", "farood", "nearood"}
    for key, views in _sets(data).items():
        zbar = np.mean(np.stack([np.asarray(v.logits, dtype=np.float64) for v in views]), axis=0)
        np.testing.assert_allclose(ens[key], LOGIT_REF[name](zbar), rtol=1e-12, atol=1e-14)


def test_mean_logits_is_default(data):
    run = evaluate_named("energy", {}, None, MEMBERS, data["train"], data["id"], data["oods"])
    assert run.strategy == "mean-logits"
    zbar = sum(np.asarray(v.logits, dtype=np.float64) for v in data["id"]) / 3
    np.testing.assert_allclose(run.scores["ensemble"]["id"], ref_energy(zbar), rtol=1e-12)


def test_energy_temperature_passed_to_ensemble(data):
    run = evaluate_named("energy", {"temperature": 2.5}, "mean-logits", MEMBERS, data["train"], data["id"], data["oods"])
    zbar = sum(np.asarray(v.logits, dtype=np.float64) for v in data["id"]) / 3
    np.testing.assert_allclose(run.scores["ensemble"]["id"], ref_energy(zbar, 2.5), rtol=1e-12)
    for i, m in enumerate(MEMBERS):
        np.testing.assert_allclose(run.scores[m]["id"], ref_energy(data["id"][i].logits, 2.5), rtol=1e-12)
    assert run.params == {"temperature": 2.5}


def test_mean_probs_msp(data):
    run = evaluate_named("msp", {}, "mean-probs", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    for key, views in _sets(data).items():
        pbar = (softmax64(views[0].logits) + softmax64(views[1].logits) + softmax64(views[2].logits)) / 3
        np.testing.assert_allclose(ens[key], pbar.max(axis=1), rtol=1e-10)


@pytest.mark.parametrize("name", ["msp", "maxlogit", "energy"])
def test_mean_scores_logit(data, name):
    run = evaluate_named(name, {}, "mean-scores", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    for key, views in _sets(data).items():
        per = [LOGIT_REF[name](v.logits) for v in views]
        np.testing.assert_allclose(ens[key], (per[0] + per[1] + per[2]) / 3, rtol=1e-12)
        for i, m in enumerate(MEMBERS):
            np.testing.assert_allclose(run.scores[m][key], per[i], rtol=1e-12)


def test_mean_scores_knn(data):
    k = 7
    run = evaluate_named("knn", {"k": k}, "mean-scores", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    tr = data["train"]
    for key, views in _sets(data).items():
        per = [ref_knn(tr[i].features, views[i].features, k) for i in range(N_MEMBERS)]
        np.testing.assert_allclose(ens[key], (per[0] + per[1] + per[2]) / 3, rtol=1e-4, atol=1e-5)
        for i, m in enumerate(MEMBERS):
            np.testing.assert_allclose(run.scores[m][key], per[i], rtol=1e-4, atol=1e-5)


def test_mean_scores_mahalanobis(data):
    run = evaluate_named("mahalanobis", {}, "mean-scores", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    tr = data["train"]
    for key, views in _sets(data).items():
        per = [ref_mahalanobis(tr[i].features, tr[i].labels, views[i].features) for i in range(N_MEMBERS)]
        np.testing.assert_allclose(ens[key], np.mean(per, axis=0), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 10])
def test_concat_knn(data, k):
    run = evaluate_named("knn", {"k": k}, "concat", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    bank = np.concatenate([normalise64(v.features) for v in data["train"]], axis=1)
    for key, views in _sets(data).items():
        q = np.concatenate([normalise64(v.features) for v in views], axis=1)
        # ref_knn normalises the concatenation again
        np.testing.assert_allclose(ens[key], ref_knn(bank, q, k), rtol=1e-4, atol=1e-5)


def test_concat_knn_is_default(data):
    run = evaluate_named("knn", {"k": 3}, None, MEMBERS, data["train"], data["id"], data["oods"])
    assert run.strategy == "concat"
    bank = np.concatenate([normalise64(v.features) for v in data["train"]], axis=1)
    q = np.concatenate([normalise64(v.features) for v in data["id"]], axis=1)
    np.testing.assert_allclose(run.scores["ensemble"]["id"], ref_knn(bank, q, 3), rtol=1e-4, atol=1e-5)


def test_concat_mahalanobis(data):
    run = evaluate_named("mahalanobis", {}, "concat", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    bank = np.concatenate([np.asarray(v.features, dtype=np.float64) for v in data["train"]], axis=1)
    labels = data["train"][0].labels
    for key, views in _sets(data).items():
        q = np.concatenate([np.asarray(v.features, dtype=np.float64) for v in views], axis=1)
        np.testing.assert_allclose(ens[key], ref_mahalanobis(bank, labels, q), rtol=1e-6)


def test_mean_features_knn(data):
    k = 5
    run = evaluate_named("knn", {"k": k}, "mean-features", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    bank = np.mean([np.asarray(v.features, dtype=np.float64) for v in data["train"]], axis=0)
    for key, views in _sets(data).items():
        q = np.mean([np.asarray(v.features, dtype=np.float64) for v in views], axis=0)
        np.testing.assert_allclose(ens[key], ref_knn(bank, q, k), rtol=1e-4, atol=1e-5)


def test_mean_features_mahalanobis(data):
    run = evaluate_named("mahalanobis", {}, "mean-features", MEMBERS, data["train"], data["id"], data["oods"])
    ens = _ensemble(run)
    bank = np.mean([np.asarray(v.features, dtype=np.float64) for v in data["train"]], axis=0)
    labels = data["train"][0].labels
    for key, views in _sets(data).items():
        q = np.mean([np.asarray(v.features, dtype=np.float64) for v in views], axis=0)
        # mean-features averages in float32: allow for that
        np.testing.assert_allclose(ens[key], ref_mahalanobis(bank, labels, q), rtol=1e-4)


def test_ensemble_scores_direct(data):
    """oodens.ensemble.strategies.ensemble_scores called directly, for mean-logits, mean-scores and concat."""
    sets = {"id": data["id"], "farood": data["oods"]["farood"]}
    energies = [DETECTORS["energy"]() for _ in range(3)]
    out = ensemble_scores("mean-logits", DETECTORS["energy"], energies, data["train"], sets)
    for k, views in sets.items():
        zbar = np.mean([v.logits for v in views], axis=0)
        np.testing.assert_allclose(out[k], ref_energy(zbar), rtol=1e-12)
    out = ensemble_scores("mean-scores", DETECTORS["energy"], energies, data["train"], sets)
    for k, views in sets.items():
        np.testing.assert_allclose(out[k], sum(ref_energy(v.logits) for v in views) / 3, rtol=1e-12)
    knns = [DETECTORS["knn"](k=4).fit(v) for v in data["train"]]
    out = ensemble_scores("concat", lambda: DETECTORS["knn"](k=4), knns, data["train"], sets)
    bank = np.concatenate([normalise64(v.features) for v in data["train"]], axis=1)
    for k, views in sets.items():
        q = np.concatenate([normalise64(v.features) for v in views], axis=1)
        np.testing.assert_allclose(out[k], ref_knn(bank, q, 4), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# evaluate_detector records
# ----------------------------------------------------------------------------


def _rows(run):
    """(member, ood) -> record, checking there are no duplicates."""
    out = {}
    for r in run.records:
        key = (row(r), r["ood"])
        assert key not in out, key
        out[key] = r
    return out


def _argmax_acc(logits, labels):
    correct = 0
    for row, y in zip(np.asarray(logits), labels):
        correct += int(int(np.argmax(row)) == int(y))
    return correct / len(labels)


@pytest.mark.parametrize(
    "name,params,strategy,positive",
    [
        ("msp", {}, "mean-logits", "id"),
        ("energy", {}, "mean-scores", "ood"),
        ("knn", {"k": 5}, "concat", "id"),
        ("mahalanobis", {}, "concat", "ood"),
    ],
)
def test_records(data, name, params, strategy, positive):
    run = evaluate_named(name, params, strategy, MEMBERS, data["train"], data["id"], data["oods"], positive)
    rows = _rows(run)
    oods = ["farood", "nearood"]
    expected_keys = {(m, o) for o in [*oods, "average"] for m in [*MEMBERS, "mean", "std", "ensemble"]}
    assert set(rows) == expected_keys
    assert len(run.records) == len(expected_keys)
    assert run.detector == name and run.strategy == strategy

    for r in run.records:
        assert r["detector"] == name
        assert r["strategy"] == strategy
        assert r["positive"] == positive
        assert r["n_members"] == 3
        for k in OOD_METRICS:
            assert 0.0 <= r[k] <= 1.0 or r["member"] == "std"

    # member rows: metrics of the member's own scores (scores checked against formulas above)
    labels = data["id"][0].labels
    for i, m in enumerate(MEMBERS):
        for o in oods:
            want = ood_metrics(run.scores[m]["id"], run.scores[m][o], positive=positive)
            for k in OOD_METRICS:
                assert rows[(m, o)][k] == pytest.approx(want[k], abs=1e-12)
            assert rows[(m, o)]["id_accuracy"] == pytest.approx(_argmax_acc(data["id"][i].logits, labels))

    # average row = mean over OOD sets, per member
    for m in [*MEMBERS, "ensemble"]:
        for k in OOD_METRICS:
            assert rows[(m, "average")][k] == pytest.approx((rows[(m, "farood")][k] + rows[(m, "nearood")][k]) / 2, abs=1e-12)

    # mean / std rows over members (sample std, ddof=1)
    for o in [*oods, "average"]:
        for k in [*OOD_METRICS, "id_accuracy"]:
            vals = np.array([rows[(m, o)][k] for m in MEMBERS])
            assert rows[("mean", o)][k] == pytest.approx(vals.sum() / 3, abs=1e-12)
            sd = np.sqrt(((vals - vals.sum() / 3) ** 2).sum() / 2)
            assert rows[("std", o)][k] == pytest.approx(sd, abs=1e-12)

    # ensemble rows: metrics of the hand-computed ensemble scores
    ens = _hand_ensemble(data, name, params, strategy)
    for o in oods:
        want = ood_metrics(ens["id"], ens[o], positive=positive)
        for k in OOD_METRICS:
            assert rows[("ensemble", o)][k] == pytest.approx(want[k], abs=1e-6)

    # ensemble accuracy = accuracy of argmax of the mean logits
    zbar = np.mean([np.asarray(v.logits, dtype=np.float64) for v in data["id"]], axis=0)
    acc_ens = _argmax_acc(zbar, labels)
    for o in [*oods, "average"]:
        assert rows[("ensemble", o)]["id_accuracy"] == pytest.approx(acc_ens)


def _hand_ensemble(data, name, params, strategy):
    sets = _sets(data)
    tr = data["train"]
    out = {}
    for key, views in sets.items():
        if strategy == "mean-logits":
            out[key] = LOGIT_REF[name](np.mean([v.logits for v in views], axis=0))
        elif strategy == "mean-scores" and name in LOGIT_REF:
            out[key] = np.mean([LOGIT_REF[name](v.logits) for v in views], axis=0)
        elif strategy == "concat" and name == "knn":
            bank = np.concatenate([normalise64(v.features) for v in tr], axis=1)
            q = np.concatenate([normalise64(v.features) for v in views], axis=1)
            out[key] = ref_knn(bank, q, params["k"])
        elif strategy == "concat" and name == "mahalanobis":
            bank = np.concatenate([np.asarray(v.features, dtype=np.float64) for v in tr], axis=1)
            q = np.concatenate([np.asarray(v.features, dtype=np.float64) for v in views], axis=1)
            out[key] = ref_mahalanobis(bank, tr[0].labels, q)
        else:  # pragma: no cover
            raise AssertionError((name, strategy))
    return out


def test_ensemble_scores_close_to_hand(data):
    # the ensemble scores themselves, for the record-test configurations
    for name, params, strategy in [("knn", {"k": 5}, "concat"), ("mahalanobis", {}, "concat")]:
        run = evaluate_named(name, params, strategy, MEMBERS, data["train"], data["id"], data["oods"])
        ens = _hand_ensemble(data, name, params, strategy)
        for key in ens:
            np.testing.assert_allclose(run.scores["ensemble"][key], ens[key], rtol=1e-4, atol=1e-5)


def test_single_ood_set_has_no_average_row(data):
    oods = {"farood": data["oods"]["farood"]}
    run = evaluate_named("maxlogit", {}, None, MEMBERS, data["train"], data["id"], oods)
    rows = _rows(run)
    assert set(rows) == {(m, "farood") for m in [*MEMBERS, "mean", "std", "ensemble"]}
    zbar = np.mean([v.logits for v in data["id"]], axis=0)
    zbar_o = np.mean([v.logits for v in oods["farood"]], axis=0)
    want = ood_metrics(ref_maxlogit(zbar), ref_maxlogit(zbar_o))
    for k in OOD_METRICS:
        assert rows[("ensemble", "farood")][k] == pytest.approx(want[k], abs=1e-12)


def test_score_keys(data):
    run = evaluate_named("msp", {}, None, MEMBERS, data["train"], data["id"], data["oods"])
    assert set(run.scores) == {*MEMBERS, "ensemble"}
    for m, s in run.scores.items():
        assert set(s) == {"id", "farood", "nearood"}
        assert len(s["id"]) == 40 and len(s["farood"]) == 30
