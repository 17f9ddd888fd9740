"""oodens.metrics.stats at few modes (issue 16): the Holm family is the independent (detector, OOD set) cells,
intervals of bounded metrics stay in [0, 1], and one mode has no std and no test."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from oodens.cli import main
from oodens.metrics import stats
from oodens.metrics.ood import METRICS
from oodens.runtime.paths import shipped_modes_dir


def logit_interval_by_hand(values, level=0.95, eps=1e-4):
    v = np.clip(np.asarray(values, dtype=np.float64), eps, 1 - eps)
    z = np.log(v / (1 - v))
    n, m, s = len(z), z.mean(), z.std(ddof=1)
    half = sps.t.ppf((1 + level) / 2, n - 1) * s / math.sqrt(n)
    return 1 / (1 + math.exp(-(m - half))), 1 / (1 + math.exp(-(m + half)))


@pytest.mark.parametrize("values", [[0.0, 0.01, 0.3], [0.02, 0.05, 0.9], [0.95, 1.0, 0.999, 0.7], [0.1, 0.2]])
def test_bounded_interval_on_the_logit_scale(values):
    low, high = stats.t_interval(values, logit=True)
    assert (low, high) == pytest.approx(logit_interval_by_hand(values), rel=1e-9, abs=1e-15)
    assert 0.0 <= low <= high <= 1.0
    assert stats.t_interval(values, level=0.9, logit=True) == pytest.approx(logit_interval_by_hand(values, 0.9))


def test_plain_interval_leaves_the_range_where_the_logit_one_does_not():
    values = [0.0, 0.01, 0.3]
    plain = stats.t_interval(values)
    assert plain[0] < 0  # the problem issue 16 saw: FPR95 [-7.5, 33.5]
    assert stats.t_interval(values, logit=True)[0] >= 0
    assert stats.t_interval([0.0, 0.0, 0.0], logit=True) == pytest.approx((1e-4, 1e-4))
    assert all(math.isnan(v) for v in stats.t_interval([0.3], logit=True))


def test_which_metrics_are_bounded():
    assert {m for m in METRICS if stats.bounded(m)} == set(METRICS) - {"id_nll", "id_brier"}


def synthetic_frame(seed=0, n_modes=3):
    """Records like oodens.results.load_frame's: 3 detector settings x (3 sets + near/far/average + C-1), 3 modes."""
    rng = np.random.default_rng(seed)
    kinds = {"a": "near", "b": "far", "c": "far", "s1": "shift", "far": "average", "average": "average",
             "C-1": "shift-average"}
    rows = []
    for det in ("msp", "energy", "knn"):
        for ood, kind in kinds.items():
            base = rng.uniform(0.05, 0.4)
            for i in range(n_modes):
                rows.append({"setting": det, "detector": det, "strategy": "s", "ood": ood, "kind": kind,
                             "role": "member", "member": f"m{i}", "fpr95": base + rng.normal(0, 0.05),
                             "auroc": 1 - base / 2 + rng.normal(0, 0.02)})
            rows.append({"setting": det, "detector": det, "strategy": "s", "ood": ood, "kind": kind,
                         "role": "ensemble", "member": "ensemble", "fpr95": base - rng.uniform(0, 0.1),
                         "auroc": 1 - base / 3})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("metric", ["fpr95", "auroc"])
def test_holm_family_is_the_independent_cells(metric):
    frame = synthetic_frame()
    st = stats.mode_stats(frame, metric)
    ens = frame[frame["role"] == "ensemble"]
    independent = ens[ens["kind"].isin(["near", "far", "semantic", "shift"])][["setting", "ood"]]
    family = st[st["in_family"]]
    assert len(family) == len(independent) == 3 * 4
    assert set(map(tuple, family[["setting", "ood"]].to_numpy())) == set(map(tuple, independent.to_numpy()))
    expected = multipletests(family["p"].to_numpy(), method="holm")[1]
    assert family["p_holm"].to_numpy() == pytest.approx(expected, rel=1e-12)
    derived = st[~st["in_family"]]
    assert set(derived["ood"]) == {"far", "average", "C-1"}
    assert derived["p_holm"].isna().all() and derived["p"].notna().all() and not derived["ensemble_better"].any()
    assert (family["ensemble_better"] == (family["p_holm"] < 0.05)).all()
    assert ((st["ci_low"] >= 0) & (st["ci_high"] <= 1)).all()


def test_single_mode_has_no_test():
    assert stats.mode_stats(synthetic_frame(n_modes=1), "fpr95").empty


def test_one_mode_eval_tables_show_no_std(tmp_path, monkeypatch, capsys):
    modes = tmp_path / "Digits" / "CNN"
    shutil.copytree(shipped_modes_dir() / "seed-1000", modes / "seed-1000")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("OODENS_RESULTS", str(tmp_path / "res"))
    monkeypatch.delenv("OODENS_CACHE", raising=False)
    outs = []
    for extra in (["--ensemble-size", "all"], ["--summary"]):
        try:
            main(["eval", "--modes", str(modes), "--detector", "msp", *extra])
        except SystemExit as e:
            assert not e.code
        outs.append(capsys.readouterr().out)
        assert "± —" in outs[-1] and "± 0.00" not in outs[-1] and "subsets)" not in outs[-1]
    assert "k=1 (1 subset)" in outs[0]
