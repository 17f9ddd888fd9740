"""The public API: the README's example runs verbatim, and its numbers are `oodens eval --json`'s."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import oodens
from oodens.cli import main

from evaluation import row

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_verbatim_and_equals_eval_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OODENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OODENS_RESULTS", str(tmp_path / "results"))
    scope: dict = {}
    exec(compile(readme_example(), str(README), "exec"), scope)
    res, v, scores = scope["res"], scope["v"], scope["scores"]

    # the records went into the store that `oodens report` reads
    assert len(list((tmp_path / "results" / "runs").glob("*.json"))) == 3
    # the views: five modes, ID train/test and the two chosen OOD sets
    assert sorted(v) == [f"seed-{s}" for s in (1000, 1100, 1200, 1300, 1400)]
    assert list(v["seed-1000"].ood) == ["digits-6789", "letters"]
    assert v["seed-1000"].test.logits.shape == (325, 6) and v["seed-1000"].train.features.shape[0] == 758
    assert scores.shape == (325,) and np.isfinite(scores).all()

    # the same settings on the command line
    try:
        main(["eval", "--detector", "msp,energy,knn", "--knn-k", "50", "--ensemble-size", "all", "--json",
              "--ood", "digits-6789,letters"])
    except SystemExit as e:
        assert e.code in (0, None)
    records = json.loads(capsys.readouterr().out)
    frame = res.frame()
    assert set(frame.columns) >= {"detector", "strategy", "member", "role", "k", "stat", "ood", "kind", "metric",
                                  "value"}
    # a std over one subset is undefined: null in the records, no row in the frame
    cli = {(r["detector"], row(r), r["ood"], m): r[m] for r in records for m in oodens.METRICS
           if r.get(m) is not None}
    assert any(r["role"] == "subsets" and r["stat"] == "std" and r["k"] == 5 and r["auroc"] is None for r in records)
    api = {(r.detector, f"subsets-{int(r.k)}-{r.stat}" if r.role == "subsets" else r.member, r.ood, r.metric): r.value
           for r in frame.itertuples()}
    assert api.keys() == cli.keys()
    for key, value in cli.items():
        assert api[key] == pytest.approx(value, abs=1e-12), key
    # the table is the report's FPR95 table: ensemble cell = the record's value
    table = scope["res"].table("fpr95").frame
    assert isinstance(table, pd.DataFrame)
    knn_rows = table[table["detector"].eq("knn · concat").cummax() | table["detector"].eq("")]
    ens = knn_rows[knn_rows["member"] == "ensemble (5)"].iloc[-1]
    assert ens["letters"] == f"{100 * cli[('knn', 'ensemble', 'letters', 'fpr95')]:.1f}"


def test_experiment_without_arguments_is_digits_on_the_shipped_modes(tmp_path):
    exp = oodens.Experiment(cache_dir=tmp_path)
    assert exp.benchmark.name == "digits" and len(exp.modes) == 5 and exp.modes.shipped
    assert list(exp.oods) == ["digits-6789", "letters", "noise"]


def test_registries_are_listable():
    assert "knn" in oodens.DETECTORS and "concat" in oodens.STRATEGIES and "cnn" in oodens.ARCHS
    assert "digits" in oodens.BENCHMARKS
    assert oodens.METRICS["auroc"].higher_is_better and not oodens.METRICS["fpr95"].higher_is_better


def test_library_errors_name_parameters(tmp_path):
    with pytest.raises(oodens.ParameterError, match=r"fit_fraction=2 "):
        oodens.Experiment(cache_dir=tmp_path, fit_fraction=2)
    exp = oodens.Experiment(cache_dir=tmp_path, benchmark=oodens.get_benchmark("digits", ood=["noise"]))
    with pytest.raises(oodens.ParameterError, match=r"k=5000 exceeds the 758 training samples"):
        exp.evaluate(oodens.detectors.KNN(k=5000))
    assert not any(tmp_path.rglob("*.npy"))  # refused before any extraction
    with pytest.raises(oodens.ParameterError, match=r"ensemble_sizes=9 .*1\.\.5"):
        exp.evaluate("msp", ensemble_sizes=9)
    with pytest.raises(oodens.OodensError, match="unknown OOD set 'nope'"):
        oodens.get_benchmark("digits", ood=["nope"])
