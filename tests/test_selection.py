"""Hyperparameter selection on validation data (``--select``, ``grid=``): the choice equals a brute-force loop
over the grid on the validation views, no network runs after extraction, and the ID test split and the evaluated
OOD sets are never read to choose."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import oodens
from oodens.ensemble.evaluate import MemberSet, Selection, evaluate_detector
from oodens.views.types import Views

from cli_runner import run

GRID = [3, 10, 50]


@pytest.fixture
def exp(two_modes, tmp_path):
    return oodens.Experiment(two_modes, oodens.get_benchmark("digits", ood=["digits-6789", "letters"]),
                             cache_dir=tmp_path / "cache")


def val_auroc(id_scores, ood_sets):
    """Mean AUROC (ID positive) of the ID validation scores against each OOD validation set's."""
    return np.mean([roc_auc_score(np.r_[np.ones(len(id_scores)), np.zeros(len(o))], np.r_[id_scores, o])
                    for o in ood_sets])


def test_choice_equals_a_brute_force_loop_on_the_validation_views(exp):
    res = exp.evaluate(oodens.detectors.KNN(k=50), select="auroc", grid={"knn": {"k": GRID}}, ensemble_sizes=[1])
    run_ = res.runs[0]
    assert run_.settings["validation"]["select"] == "auroc"
    assert run_.settings["validation"]["ood_val"] == {"letters-val": 720, "noise-val": 720}
    assert run_.settings["params"] == {"k": GRID}
    v = exp.views(validation=True)
    for m, mv in v.items():  # each member: its own choice
        values = []
        for k in GRID:
            det = oodens.detectors.KNN(k=k).fit(mv.train)
            values.append(val_auroc(det.score(mv.val), [det.score(o) for o in mv.val_ood.values()]))
        best = GRID[int(np.argmax(values))]
        assert run_.detector_run.selected[m] == {"params": {"k": best}, "auroc": pytest.approx(max(values))}
        member_rows = [r for r in run_.records if r["member"] == m]
        assert all(r["selected"]["params"] == {"k": best} for r in member_rows)
        np.testing.assert_allclose(run_.scores[m]["id"], oodens.detectors.KNN(k=best).fit(mv.train).score(mv.test),
                                   rtol=1e-6)
    # the ensemble: each grid value evaluated with the validation views standing in for the evaluated sets
    names = list(v)
    val_as_eval = MemberSet(names, [v[m].train for m in names], [v[m].val for m in names],
                            {o: [v[m].val_ood[o] for m in names] for o in v[names[0]].val_ood})
    values = []
    for k in GRID:
        recs = evaluate_detector(oodens.detectors.KNN(k=k), val_as_eval).records
        values.append(next(r["auroc"] for r in recs if r["role"] == "ensemble" and r["ood"] == "average"))
    assert run_.detector_run.selected["ensemble"]["params"] == {"k": GRID[int(np.argmax(values))]}
    assert run_.detector_run.selected["ensemble"]["auroc"] == pytest.approx(max(values))


def test_fpr95_selection_takes_the_smallest(exp):
    res = exp.evaluate("energy", select="fpr95", grid={"energy": {"temperature": [0.5, 1.0, 20.0]}})
    v = exp.views(validation=True)
    for m, mv in v.items():
        from oodens.metrics.ood import ood_metrics

        values = [np.mean([ood_metrics(oodens.detectors.Energy(temperature=t).score(mv.val),
                                       oodens.detectors.Energy(temperature=t).score(o))["fpr95"]
                           for o in mv.val_ood.values()]) for t in (0.5, 1.0, 20.0)]
        assert res.runs[0].detector_run.selected[m]["params"]["temperature"] == (0.5, 1.0, 20.0)[int(np.argmin(values))]


def _poisoned(sets: MemberSet) -> MemberSet:
    rng = np.random.default_rng(0)

    def noise(v: Views) -> Views:
        return Views(logits=rng.normal(size=np.shape(v.logits)) * 50, features=rng.normal(size=np.shape(v.features)),
                     labels=v.labels, weight=v.weight, bias=v.bias)

    return MemberSet(sets.names, sets.train, [noise(v) for v in sets.test],
                     {o: [noise(v) for v in vs] for o, vs in sets.oods.items()}, sets.kinds, sets.val, sets.val_oods)


def test_the_evaluated_sets_are_never_read_to_choose(exp):
    ex = exp.extract(["knn"], validation=True, val_ood=True)
    sets = exp.member_set(ex, True, True, True)
    select = Selection("auroc", {"k": GRID})
    clean = evaluate_detector(oodens.detectors.KNN(), sets, select=select, sweep=None)
    poisoned = evaluate_detector(oodens.detectors.KNN(), _poisoned(sets), select=select)
    assert clean.selected == poisoned.selected
    assert len({s["params"]["k"] for s in clean.selected.values()}) >= 1
    assert not np.allclose(clean.scores["ensemble"]["id"], poisoned.scores["ensemble"]["id"])  # they were poisoned


def test_no_forward_pass_after_extraction(exp, monkeypatch, two_modes, tmp_path):
    """Every module call of every loaded network is counted: a five-point grid with the subset sweep runs the
    same forward passes as one point (those of extraction), and a warm cache runs none."""
    from oodens.modes.discovery import Mode

    calls = []
    load = Mode.load

    def counting_load(self):
        model = load(self)
        for module in model.modules():
            module.register_forward_pre_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(Mode, "load", counting_load)
    exp.evaluate("knn", select="auroc", grid={"knn": {"k": [3]}})
    one_point = len(calls)
    assert one_point > 0
    calls.clear()
    fresh = oodens.Experiment(two_modes, oodens.get_benchmark("digits", ood=["digits-6789", "letters"]),
                              cache_dir=tmp_path / "other-cache")
    res = fresh.evaluate("knn", select="auroc", grid={"knn": {"k": GRID + [100, 200]}}, ensemble_sizes="all")
    assert len(calls) == one_point
    calls.clear()
    again = fresh.evaluate("knn", select="auroc", grid={"knn": {"k": GRID + [100, 200]}}, ensemble_sizes="all")
    assert calls == [] and again.extraction["computed"] == 0 and again.records == res.records


def test_grid_errors_are_one_line(exp, two_modes, tmp_path, capsys):
    with pytest.raises(oodens.OodensError, match=r"grid of hyperparameters .* needs select="):
        exp.evaluate("knn", grid={"knn": {"k": GRID}})
    with pytest.raises(oodens.OodensError, match=r"grid parameter 'kk' is not a hyperparameter of knn"):
        exp.evaluate("knn", select="auroc", grid={"knn": {"kk": GRID}})
    with pytest.raises(oodens.OodensError, match=r"grid for detector 'react', which is not evaluated"):
        exp.evaluate("knn", select="auroc", grid={"react": {"p": [80, 90]}})
    with pytest.raises(oodens.ParameterError, match=r"^k=0 is out of range"):
        exp.evaluate("knn", select="auroc", grid={"knn": {"k": [0, 5]}})
    with pytest.raises(oodens.ParameterError, match=r"^select=auprc is not one of auroc, fpr95"):
        exp.evaluate("knn", select="auprc")
    assert not any((tmp_path / "cache").rglob("*.npy"))  # all refused before any extraction
    base = ["eval", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c"), "--results", str(tmp_path / "r")]
    for args, message in (
        (["--detector", "knn", "--knn-k", "10,50"], "oodens: error: --knn-k 10,50 is a grid: expected --select"),
        (["--detector", "knn", "--knn-k", "10,x", "--select", "auroc"],
         "oodens: error: --knn-k 10,x: 'x' is not an integer: expected an integer, or a comma list of them"),
        (["--detector", "react", "--react-p", "90,,95"], "oodens: error: --react-p 90,,95: an empty value"),
        (["--detector", "knn", "--select", "auprc"], "oodens: error: --select auprc is not one of auroc, fpr95"),
        (["--detector", "knn", "--knn-k", "0,5", "--select", "auroc"], "oodens: error: --knn-k 0 is out of range"),
        (["--detector", "knn", "--select", "auroc", "--val-ood", "noise"], "'noise' is an evaluated OOD set"),
    ):
        code, out, err = run(base + args, capsys)
        assert code == 2 and message in " ".join(err.split()), (args, err)
        assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1, err


def test_cli_selection_records_say_what_was_chosen(two_modes, tmp_path, capsys):
    import json

    code, out, err = run(["eval", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c"), "--results",
                          str(tmp_path / "r"), "--detector", "knn,msp", "--knn-k", "3,50", "--select", "auroc",
                          "--val-ood", "noise-val", "--ood", "letters", "--json"], capsys)
    assert code == 0, err
    records = json.loads(out)
    knn = [r for r in records if r["detector"] == "knn"]
    assert all(r["params"] == {"k": [3, 50]} for r in knn)
    assert all(r["selected"]["params"]["k"] in (3, 50) and 0 <= r["selected"]["auroc"] <= 1
               for r in knn if r["role"] in ("member", "ensemble"))
    assert all("selected" not in r for r in records if r["detector"] == "msp")  # nothing to choose
    runs = {r["settings"]["detector"]: r["settings"] for r in
            (json.loads(f.read_text()) for f in (tmp_path / "r" / "runs").glob("*.json"))}
    stored = runs["knn"]
    assert stored["validation"]["ood_val"] == {"noise-val": 720} and stored["validation"]["fit_on"]["n"] == 682
    assert runs["msp"]["validation"]["fit_on"] is None  # msp fits nothing
