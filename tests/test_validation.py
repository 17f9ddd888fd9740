"""The ID validation split (a benchmark's own, or a seeded class-stratified hold-out of ID train), the OOD
validation sets of the digits benchmark, and what changes (and what does not) when validation is in use."""

from __future__ import annotations

import json

import numpy as np
import pytest

import oodens
from oodens.data.sources import VAL_CAP, VAL_FRACTION, ArraySource, HoldOutSource, stratified_holdout
from oodens.ensemble.strategies import strategies_for

from cli_runner import run


def test_holdout_is_seeded_stratified_and_capped():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    held = stratified_holdout(labels)
    assert len(held) == round(VAL_FRACTION * 1000) and np.all(np.diff(held) > 0)
    assert np.bincount(labels[held]).tolist() == [50, 30, 20]  # in proportion to the classes
    assert np.array_equal(held, stratified_holdout(labels))  # seeded: the same every time
    assert not np.array_equal(held, stratified_holdout(labels, seed=1))
    assert len(stratified_holdout(np.zeros(200_000, dtype=int))) == VAL_CAP
    # a class never loses its last sample to the hold-out
    tiny = np.array([0] * 30 + [1])
    assert 30 not in stratified_holdout(tiny, fraction=0.5)


def test_holdout_parts_split_the_training_split_with_their_own_keys():
    x = np.random.default_rng(0).random((100, 1, 8, 8)).astype(np.float32)
    src = ArraySource("toy", "train", lambda: (x, np.arange(100) % 4))
    fit, val = HoldOutSource(src, "fit"), HoldOutSource(src, "val")
    assert len(val) == 10 and len(fit) == 90
    assert not set(fit.index) & set(val.index) and set(fit.index) | set(val.index) == set(range(100))
    assert (fit.split, val.split) == ("train", "val")
    ids = [s.identity() for s in (src, fit, val)]
    assert len({json.dumps(i, sort_keys=True) for i in ids}) == 3  # three different cache keys
    assert ids[2]["holdout"] == {"part": "val", "fraction": 0.1, "cap": 5000, "seed": 0}


def test_digits_has_ood_validation_sets_that_are_never_evaluated():
    bench = oodens.get_benchmark("digits")
    assert list(bench.val_ood) == ["letters-val", "noise-val"]
    evaluated = {n: s.arrays[0] for n, s in bench.ood.items()}
    for name, src in bench.val_ood.items():
        x = src.arrays[0]
        assert src.split == "val" and len(x) == 720
        assert all(x.shape != e.shape or not np.array_equal(x, e) for e in evaluated.values())
        assert src.fingerprint not in {s.fingerprint for s in bench.ood.values()}
    # the letters are drawn with another seed: few if any images repeat an evaluated one
    val_letters = {im.tobytes() for im in bench.val_ood["letters-val"].arrays[0]}
    assert sum(im.tobytes() in val_letters for im in evaluated["letters"]) < 72
    with pytest.raises(oodens.OodensError, match="evaluated OOD set"):
        oodens.get_benchmark("digits", val_ood=["letters"])
    with pytest.raises(oodens.OodensError, match="unknown OOD validation set 'nope'"):
        oodens.get_benchmark("digits", val_ood=["nope"])
    assert list(oodens.get_benchmark("digits", val_ood=["NOISE-VAL"]).val_ood) == ["noise-val"]


def test_without_validation_nothing_changes(two_modes, tmp_path):
    exp = oodens.Experiment(two_modes, oodens.get_benchmark("digits", ood=["letters"]), cache_dir=tmp_path / "c")
    res = exp.evaluate(["msp", oodens.detectors.KNN(k=5)], strategy="median")
    assert all("validation" not in run.settings for run in res.runs)
    assert exp.fit_source(False) is exp.train_source and len(exp.train_source) == 758
    assert res.extraction["computed"] == 2 * 3  # train, test, letters per mode: no validation split


def test_validation_fits_on_train_minus_the_holdout(two_modes, tmp_path):
    exp = oodens.Experiment(two_modes, oodens.get_benchmark("digits", ood=["letters"]), cache_dir=tmp_path / "c")
    res = exp.evaluate(oodens.detectors.KNN(k=5), strategy="zscore")
    val = res.runs[0].settings["validation"]
    assert val["fit_on"]["n"] == 758 - 76 and val["fit_on"]["holdout"]["part"] == "fit"
    assert val["id_val"] == {"name": "digits", "split": "val", "n": 76,
                             "holdout": {"part": "val", "fraction": 0.1, "cap": 5000, "seed": 0}}
    assert res.extraction["computed"] == 2 * 4  # train minus hold-out, test, letters and the validation split
    v = exp.views(validation=True)["seed-1000"]
    assert len(v.train) == 682 and len(v.val) == 76 and list(v.val_ood) == ["letters-val", "noise-val"]
    bank = {row.tobytes() for row in np.asarray(v.train.features)}
    assert not any(row.tobytes() in bank for row in np.asarray(v.val.features))  # never in a knn bank
    # extracted once: a second run reads every view from the cache
    again = exp.evaluate(oodens.detectors.KNN(k=5), strategy="zscore")
    assert again.extraction["computed"] == 0
    assert again.records == res.records


def test_strategy_all_gives_one_run_per_strategy(two_modes, tmp_path, capsys):
    code, out, err = run(["eval", "--modes", str(two_modes), "--detector", "msp,pds", "--strategy", "all",
                          "--ood", "noise", "--json", "--cache-dir", str(tmp_path / "c"), "--results",
                          str(tmp_path / "r")], capsys)
    assert code == 0, err
    records = json.loads(out)
    got = {(r["detector"], r["strategy"]) for r in records}
    assert got == {("msp", s) for s in strategies_for(oodens.DETECTORS["msp"], 2)} | {("pds", "ensemble")}
    assert {"median", "std", "fisher", "simes", "rank", "zscore", "mean-probs"} <= {s for _, s in got}


# --------------------------------------------------------------------------- temperature-scaled MSP


def naive_nll(z, y, t):
    """Mean -log softmax(z/t)_y, one sample at a time."""
    total = 0.0
    for row, label in zip(z, y):
        e = [np.exp((v - max(row)) / t) for v in row]
        total -= np.log(e[label] / sum(e))
    return total / len(y)


def test_temperature_minimises_the_validation_nll():
    from oodens.detectors.temperature import TempScaledMSP

    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 120)
    z = rng.normal(0, 1, (120, 5))
    z[np.arange(120), y] += 2.0
    z *= 3.0  # over-confident: the best temperature is above 1
    views = oodens.views.Views(logits=z, labels=y)
    det = TempScaledMSP().fit(None, val=views)
    coarse = np.exp(np.linspace(np.log(0.1), np.log(10), 101))  # steps of 4.7%
    i = int(np.argmin([naive_nll(z, y, t) for t in coarse]))
    fine = np.linspace(coarse[max(i - 1, 0)], coarse[min(i + 1, 100)], 401)
    best = fine[int(np.argmin([naive_nll(z, y, t) for t in fine]))]
    assert det.temperature_ > 1 and det.temperature_ == pytest.approx(best, rel=1e-3)
    want = np.array([max(np.exp(r / det.temperature_)) / sum(np.exp(r / det.temperature_)) for r in z])
    np.testing.assert_allclose(det.score(views), want, rtol=1e-10)
    assert TempScaledMSP().fit(views).temperature_ == det.temperature_  # standalone: fit(calibration views)


def test_tempscale_in_an_experiment_fits_on_the_validation_split(two_modes, tmp_path):
    from oodens.detectors.temperature import fit_temperature

    exp = oodens.Experiment(two_modes, oodens.get_benchmark("digits", ood=["letters"]), cache_dir=tmp_path / "c")
    with pytest.warns(oodens.OodensWarning, match="every sample is classified right"):  # digits' val: 100% right
        res = exp.evaluate("tempscale", ensemble_sizes="all")
    settings = res.runs[0].settings
    assert settings["validation"]["fit_on"] is None and settings["validation"]["id_val"]["n"] == 76
    v = exp.views(validation=True)
    for m in ("seed-1000", "seed-1100"):
        with pytest.warns(oodens.OodensWarning):
            t = fit_temperature(np.asarray(v[m].val.logits), np.asarray(v[m].val.labels))
        assert t == 1.0  # nothing to calibrate: plain MSP
        z = np.asarray(v[m].test.logits, dtype=np.float64) / t
        p = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(res.runs[0].scores[m]["id"], (p / p.sum(1, keepdims=True)).max(1), rtol=1e-9)


def test_validation_is_decided_per_detector(two_modes, tmp_path):
    """Adding a detector that fits on the ID validation split (tempscale) or a strategy standardised on it never
    changes another detector's numbers: knn alone and knn beside tempscale fit on the whole training split."""
    bench = oodens.get_benchmark("digits", ood=["letters"])
    exp = oodens.Experiment(two_modes, bench, cache_dir=tmp_path / "c")
    alone = exp.evaluate("knn").runs[0]
    with pytest.warns(oodens.OodensWarning):  # tempscale on digits' hold-out: nothing to calibrate
        both = {r.settings["detector"]: r for r in exp.evaluate(["knn", "tempscale"]).runs}
    assert "validation" not in alone.settings and "validation" not in both["knn"].settings
    assert both["tempscale"].settings["validation"]["id_val"]["n"] == 76
    assert [r["auroc"] for r in both["knn"].records] == [r["auroc"] for r in alone.records]
    # a strategy standardised on validation: that detector (only) fits on ID train minus the hold-out
    z = exp.evaluate("knn", strategy="zscore").runs[0]
    held = z.settings["validation"]["fit_on"]
    assert held["n"] == len(exp.train_source) - 76 and held["holdout"]


def test_all_skips_a_detector_that_cannot_fit_these_modes(two_modes, tmp_path, monkeypatch):
    """``--detector all`` runs what it can: a detector whose fit fails on these modes is skipped with one
    warning naming it (named explicitly, the same failure is the error)."""
    from oodens.detectors import KNN
    from oodens.errors import OodensError

    def refuse(self, train):
        raise OodensError("knn cannot fit here")

    monkeypatch.setattr(KNN, "fit", refuse)
    exp = oodens.Experiment(two_modes, oodens.get_benchmark("digits", ood=["letters"]), cache_dir=tmp_path / "c")
    with pytest.warns(oodens.OodensWarning, match="skipping knn"):
        res = exp.evaluate(["msp", "knn"], skip_inapplicable=True)
    assert [r.settings["detector"] for r in res.runs] == ["msp"]
    with pytest.raises(OodensError, match="knn cannot fit here"):
        exp.evaluate(["msp", "knn"])
