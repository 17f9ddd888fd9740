"""oodens report: statistics and calibration against independent computations, CSV/LaTeX/Markdown/JSON
output, plots, and the command line end to end on three of the shipped modes."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from scipy.special import softmax

from oodens import results
from oodens.cli import main
from oodens.metrics import stats
from oodens.metrics.ood import ood_metrics
from oodens.report import figures
from oodens.report import tables as report
from oodens.runtime.paths import shipped_modes_dir

MODES = ("seed-1000", "seed-1100", "seed-1200")
DETECTORS = "msp,energy,pds"


def cli(args):
    """Run the CLI in-process; return the exit code."""
    try:
        main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run(args, capsys):
    code = cli(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One eval (3 modes; msp, energy, pds; two corruptions; every ensemble size; saved scores) and the
    exported views, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("report")
    modes = root / "modes" / "Digits" / "CNN"
    for name in MODES:
        shutil.copytree(shipped_modes_dir() / name, modes / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))
        mp.setenv("XDG_DATA_HOME", str(root / "xdg-data"))
        mp.delenv("OODENS_RESULTS", raising=False)
        mp.delenv("OODENS_CACHE", raising=False)
        common = ["--modes", str(modes), "--corruptions", "contrast:1,jpeg:1"]
        assert cli(["eval", *common, "--detector", DETECTORS, "--ensemble-size", "all", "--json",
                    "--save-scores", str(root / "scores"), "--results", str(root / "res")]) == 0
        assert cli(["extract", *common, "--export", str(root / "views")]) == 0
    return {"results": root / "res", "scores": root / "scores", "views": root / "views"}


def raw_records(results: Path) -> list[dict]:
    return [r for f in sorted((results / "runs").glob("*.json")) for r in json.loads(f.read_text())["records"]]


def pick(records, **kv) -> dict:
    (hit,) = [r for r in records if all(r.get(k) == v for k, v in kv.items())]
    return hit


# --------------------------------------------------------------------------- statistics by hand

def test_t_interval_by_hand():
    x = np.array([0.12, 0.07, 0.19, 0.10, 0.15])
    n, mean, s = len(x), x.mean(), x.std(ddof=1)
    half = sps.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    assert stats.t_interval(x) == pytest.approx((mean - half, mean + half), abs=1e-12)
    half90 = sps.t.ppf(0.95, n - 1) * s / math.sqrt(n)
    assert stats.t_interval(x, level=0.90) == pytest.approx((mean - half90, mean + half90), abs=1e-12)
    assert stats.t_interval([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in stats.t_interval([0.3]))


def test_ensemble_test_one_sided_by_hand():
    x = np.array([0.12, 0.07, 0.19, 0.10, 0.15])
    ens = 0.08
    t = (x.mean() - ens) / (x.std(ddof=1) / math.sqrt(len(x)))
    # lower is better: H1 = the modes' mean is above the ensemble
    assert stats.ensemble_test(x, ens, "fpr95") == pytest.approx((t, sps.t.sf(t, len(x) - 1)), rel=1e-10)
    assert stats.ensemble_test(x, ens, "detection_error")[1] == pytest.approx(sps.t.sf(t, len(x) - 1), rel=1e-10)
    # higher is better: H1 = the modes' mean is below the ensemble
    assert stats.ensemble_test(x, ens, "auroc") == pytest.approx((t, sps.t.cdf(t, len(x) - 1)), rel=1e-10)
    # no spread over modes: decided by the side the modes are on
    assert stats.ensemble_test([0.2, 0.2], 0.1, "fpr95")[1] == 0.0
    assert stats.ensemble_test([0.2, 0.2], 0.3, "fpr95")[1] == 1.0
    assert stats.ensemble_test([0.0, 0.0], 0.0, "fpr95")[1] == 1.0
    assert math.isnan(stats.ensemble_test([0.2], 0.1, "fpr95")[1])


def holm_by_hand(p):
    p = list(p)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adj, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, 0.20, 0.5]
    assert stats.holm(p) == pytest.approx(holm_by_hand(p), abs=1e-12)
    with_nan = stats.holm([0.01, math.nan, 0.04])
    assert math.isnan(with_nan[1])
    assert [with_nan[0], with_nan[2]] == pytest.approx(holm_by_hand([0.01, 0.04]))


def test_mode_stats_match_records_by_hand(store):
    recs = raw_records(store["results"])
    frame = results.load_frame(store["results"])
    st = report.stats_frame(frame, ["fpr95"])
    oods = ["digits-6789", "letters", "noise", "far", "average"]
    assert set(st["ood"]) == set(oods)
    assert set(st["detector"]) == {"msp", "energy"}  # pds is ensemble-only: nothing to compare with
    ps = []
    for row in st.itertuples():
        values = np.array([pick(recs, detector=row.detector, member=m, ood=row.ood)["fpr95"] for m in MODES])
        ens = pick(recs, detector=row.detector, member="ensemble", ood=row.ood)["fpr95"]
        n, s = len(values), values.std(ddof=1)
        assert row.mean == pytest.approx(values.mean())
        assert (row.min, row.max, row.ensemble) == pytest.approx((values.min(), values.max(), ens))
        assert row.std == pytest.approx(s)
        if s > 0:
            # FPR95 is bounded: the t-interval of the mean logit (values clipped to [1e-4, 1 - 1e-4]), mapped back
            z = np.log(np.clip(values, 1e-4, 1 - 1e-4) / (1 - np.clip(values, 1e-4, 1 - 1e-4)))
            half = sps.t.ppf(0.975, n - 1) * z.std(ddof=1) / math.sqrt(n)
            expected = 1 / (1 + np.exp(-(z.mean() - half))), 1 / (1 + np.exp(-(z.mean() + half)))
            assert (row.ci_low, row.ci_high) == pytest.approx(expected)
            assert 0 <= row.ci_low <= row.ci_high <= 1
            t = (values.mean() - ens) / (s / math.sqrt(n))
            assert row.p == pytest.approx(sps.t.sf(t, n - 1))
        ps.append(row.p)
    # one family: the independent cells (detector x OOD set: digits-6789, letters, noise); far and average
    # average other sets, so they are descriptive (their p uncorrected, no p_holm)
    cells = {(r["detector"], r["ood"]) for r in recs if r["role"] == "ensemble" and r["detector"] in ("msp", "energy")
             and r["kind"] in ("near", "far", "semantic") and r["ood"] in oods}
    family = st["in_family"].to_numpy()
    assert family.sum() == len(cells) == 6
    assert set(zip(st.loc[family, "detector"], st.loc[family, "ood"])) == cells
    assert st.loc[family, "p_holm"].to_numpy() == pytest.approx(holm_by_hand(np.array(ps)[family]))
    assert st.loc[~family, "p_holm"].isna().all() and set(st.loc[~family, "ood"]) == {"far", "average"}
    assert (st["ensemble_better"] == (st["p_holm"] < 0.05)).all()


def test_bootstrap_is_seeded_and_contains_the_point_estimate(store):
    folder = store["scores"] / "msp-mean-logits" / "seed-1000"
    id_s, ood_s = np.load(folder / "digits.npy"), np.load(folder / "digits-6789.npy")
    exact = ood_metrics(id_s, ood_s)
    for metric in ("fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"):
        point, low, high = stats.bootstrap_ci(id_s, ood_s, metric, n=100, seed=3)
        assert point == pytest.approx(exact[metric], abs=1e-12)
        assert low <= point <= high
        assert stats.bootstrap_ci(id_s, ood_s, metric, n=100, seed=3) == (point, low, high)
    assert stats.bootstrap_ci(id_s, ood_s, "auroc", n=100, seed=4) != stats.bootstrap_ci(id_s, ood_s, "auroc", n=100,
                                                                                          seed=3)
    # the OpenOOD convention bootstraps its own FPR95
    ood_pos = ood_metrics(id_s, ood_s, positive="ood")["fpr95"]
    assert stats.bootstrap_ci(id_s, ood_s, "fpr95", n=20, positive="ood")[0] == pytest.approx(ood_pos)


# --------------------------------------------------------------------------- calibration and shift by hand

def hand_quality(probs, labels):
    p_true = probs[np.arange(len(labels)), labels]
    onehot = np.eye(probs.shape[1])[labels]
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.sum() / len(labels) * abs(correct[m].mean() - conf[m].mean())
    return {"id_nll": -np.mean(np.log(p_true)), "id_brier": np.mean(((probs - onehot) ** 2).sum(axis=1)),
            "id_ece": ece}


def test_id_quality_table_and_reliability_match_the_views(store):
    views = store["views"]
    labels = np.load(views / MODES[0] / "digits" / "test" / "labels.npy")
    probs = {m: softmax(np.load(views / m / "digits" / "test" / "logits.npy").astype(np.float64), axis=1)
             for m in MODES}
    probs["ensemble"] = np.mean([probs[m] for m in MODES], axis=0)
    frame = results.load_frame(store["results"])
    first = frame[frame["ood"] == "average"].drop_duplicates("member").set_index("member")
    for member, p in probs.items():
        for key, value in hand_quality(p, labels).items():
            assert first.at[member, key] == pytest.approx(value, rel=1e-9, abs=1e-12)

    (table,) = report.quality_tables(frame)
    cells = table.frame.set_index("member")
    ece_col = [c for c in cells.columns if c.startswith("ECE")][0]
    nll_col = [c for c in cells.columns if c.startswith("NLL")][0]
    assert cells.at["ensemble (3)", ece_col] == f"{100 * hand_quality(probs['ensemble'], labels)['id_ece']:.1f}"
    nll = [hand_quality(probs[m], labels)["id_nll"] for m in MODES]
    assert cells.at["mean ± std", nll_col] == f"{np.mean(nll):.3f} ± {np.std(nll, ddof=1):.3f}"

    got, y = figures.view_probs(views, ["digits"])
    assert np.array_equal(y, labels) and set(got) == {*MODES, "ensemble"}
    np.testing.assert_allclose(got["ensemble"], probs["ensemble"], rtol=1e-12)


def test_captions_say_how_the_ensemble_predicts(store):
    # independent seeds: the averaged logits; leave-out members (ELOC): the spread, averaged softmax
    frame = results.load_frame(store["results"])
    assert not frame["leave_out"].any()
    (table,) = report.quality_tables(frame)
    assert "argmax of the averaged logits" in table.caption and "left out" not in table.caption
    (table,) = report.quality_tables(frame.assign(leave_out=True))
    assert "averaged logits" not in table.caption and "0 on the classes it left out" in table.caption
    (table,) = report.shift_tables(frame.assign(leave_out=True))
    assert "averaged logits" not in table.caption and "kept" in table.caption


def test_shift_table_accuracy_by_hand(store):
    views = store["views"]
    labels = np.load(views / MODES[0] / "digits" / "test" / "labels.npy")

    def acc(logits):
        return np.mean(np.argmax(logits, axis=1) == labels)

    logits = {s: [np.load(views / m / f"digits-C_{s}" / "test" / "logits.npy").astype(np.float64) for m in MODES]
              for s in ("contrast-1", "jpeg-1")}
    (table,) = report.shift_tables(results.load_frame(store["results"]))
    cells = table.frame.set_index("set")
    assert list(cells.index) == ["clean", "contrast-1", "jpeg-1", "C-1"]
    for s, zs in logits.items():
        for m, z in zip(MODES, zs):
            assert cells.at[s, m] == f"{100 * acc(z):.1f}"
        assert cells.at[s, "ensemble (3)"] == f"{100 * acc(np.mean(zs, axis=0)):.1f}"
    c1 = [(acc(a) + acc(b)) / 2 for a, b in zip(logits["contrast-1"], logits["jpeg-1"])]
    assert cells.at["C-1", "mean ± std"] == f"{100 * np.mean(c1):.1f} ± {100 * np.std(c1, ddof=1):.1f}"


# --------------------------------------------------------------------------- output formats

def test_csv_round_trips_through_pandas(store, tmp_path, capsys):
    path = tmp_path / "out" / "report.csv"
    code, _, err = run(["report", "--results", str(store["results"]), "--csv", str(path)], capsys)
    assert code == 0, err
    expected = results.tidy(results.load_frame(store["results"]))
    back = pd.read_csv(path)
    assert list(back.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False, check_exact=False, rtol=1e-15, atol=0)
    assert {"fpr95", "auroc", "id_nll", "ood_accuracy"} <= set(back["metric"])
    assert (back["value"].between(0, 1) | back["metric"].isin(["id_nll", "id_brier"])).all()

    code, out, err = run(["report", "--results", str(store["results"]), "--csv", "-", "--metric", "auroc",
                          "--detector", "msp"], capsys)
    assert code == 0, err
    back = pd.read_csv(io.StringIO(out))
    assert set(back["metric"]) == {"auroc"} and set(back["detector"]) == {"msp"}
    np.testing.assert_allclose(back["value"], expected[(expected.metric == "auroc") & (expected.detector == "msp")]
                               ["value"].to_numpy(), rtol=1e-15)


def parse_tabulars(tex: str) -> list[tuple[str, list[list[str]]]]:
    """(column spec, rows of cells) for every tabular; rows are the lines ending in a LaTeX line break."""
    out = []
    for spec, body in re.findall(r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", tex, flags=re.S):
        rows = [line.strip()[:-2] for line in body.splitlines() if line.strip().endswith(r"\\")]
        out.append((spec, [[c.strip() for c in re.split(r"(?<!\\)&", row)] for row in rows]))
    return out


def test_latex_is_a_well_formed_tabular(store, capsys):
    code, out, err = run(["report", "--results", str(store["results"]), "--latex", "--metric", "fpr95",
                          "--tables", "ood,stats,id"], capsys)
    assert code == 0, err
    # ood, stats, the ensemble gain over OOD sets (part of the stats tables), id
    assert out.count(r"\begin{tabular}") == out.count(r"\end{tabular}") == 4
    assert out.count(r"\begin{table}") == out.count(r"\end{table}") == 4
    assert out.count("{") - out.count(r"\{") == out.count("}") - out.count(r"\}")
    ood, st, gain, idq = parse_tabulars(out)
    for spec, rows in (ood, st, gain, idq):
        assert re.fullmatch(r"l+r+", spec)
        assert all(len(r) == len(spec) for r in rows)
    oods = ["digits-6789", "letters", "noise", "far", "average"]
    assert ood[0] == "ll" + "r" * len(oods)
    assert ood[1][0] == ["detector", "member", *oods]
    # msp and energy: 3 modes, mean ± std, ensemble; pds: its ensemble only
    assert len(ood[1]) == 1 + 2 * (len(MODES) + 2) + 1
    assert len(st[1]) == 1 + 2 * len(oods)
    assert len(idq[1]) == 1 + len(MODES) + 2 and len(idq[0]) == 5
    for word in (r"\toprule", r"\midrule", r"\bottomrule", r"$\pm$", "ID positive"):
        assert word in out


def test_terminal_markdown_and_json(store, capsys):
    res = str(store["results"])
    code, out, err = run(["report", "--results", res], capsys)
    assert code == 0, err
    for text in ("FPR95", "AUROC", "mean ± std", "ensemble (3)", "msp · mean-logits", "pds · ensemble",
                 "ID positive", "Ensemble vs modes", "p Holm", "ID quality", "NLL", "ECE", "covariate shift", "C-1",
                 "Ensemble size", "k=3", "digits-6789", "average", "far"):
        assert text in out, text

    code, out, err = run(["report", "--results", res, "--markdown", "--tables", "ood", "--metric", "auroc"], capsys)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 2 * (len(MODES) + 2) + 1
    assert len({ln.count("|") for ln in lines}) == 1

    code, out, err = run(["report", "--results", res, "--json", "--detector", "msp", "--metric", "fpr95"], capsys)
    assert code == 0, err
    data = json.loads(out)
    recs = pd.DataFrame(data["records"])
    assert set(recs["metric"]) == {"fpr95"} and set(recs["detector"]) == {"msp"}
    assert len(data["stats"]) == 5 and {"p", "p_holm", "ci_low", "ci_high"} <= data["stats"][0].keys()

    code, out, err = run(["report", "--results", res, "--group-by", "detector", "--tables", "ood", "--detector",
                          "energy"], capsys)
    assert code == 0, err
    assert "seed-1200" in out and "energy · mean-logits" in out


def test_bootstrap_from_saved_scores_is_reproducible(store, capsys):
    args = ["report", "--results", str(store["results"]), "--scores", str(store["scores"]), "--bootstrap", "50",
            "--member", "seed-1100", "--detector", "msp", "--seed", "7", "--json"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    boot = json.loads(out)["bootstrap"]
    assert {(b["ood"], b["metric"]) for b in boot} == {(o, m) for o in ("digits-6789", "letters", "noise")
                                                       for m in ("fpr95", "auroc")}
    recs = raw_records(store["results"])
    for b in boot:
        assert b["value"] == pytest.approx(pick(recs, detector="msp", member="seed-1100", ood=b["ood"])[b["metric"]])
        assert b["ci_low"] <= b["value"] <= b["ci_high"]
    assert run(args, capsys)[1] == out


# --------------------------------------------------------------------------- plots

def test_every_plot_kind_is_written(store, tmp_path, capsys):
    out = tmp_path / "plots"
    code, _, err = run(["report", "--results", str(store["results"]), "--tables", "id", "--plot", str(out),
                        "--scores", str(store["scores"]), "--views", str(store["views"]), "--detector", "msp,pds"],
                       capsys)
    assert code == 0, err
    stems = [f"digits-Digits_CNN-{g}-{kind}-{m}-idpos" for g, kind in (("all", "strip"), ("logit", "size"),
                                                                      ("disagreement", "size"))
             for m in ("fpr95", "auroc")]
    stems += ["digits-Digits_CNN-msp-mean_logits-scores-ensemble", "digits-Digits_CNN-pds-ensemble-scores-ensemble",
              "digits-Digits_CNN-reliability"]
    for stem in stems:
        for ext in (".png", ".pdf"):
            f = out / f"{stem}{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
    assert (out / f"{stems[0]}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "digits-Digits_CNN-reliability.pdf").read_bytes()[:5] == b"%PDF-"


# --------------------------------------------------------------------------- errors

def test_no_results_is_one_line_naming_the_folder(tmp_path, capsys):
    code, out, err = run(["report"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "xdg-data") in err.replace("\n", "") and "oodens eval" in err


@pytest.mark.parametrize("args, words", [
    (["--metric", "fpr99"], ["fpr99", "fpr95", "auroc"]),
    (["--detector", "knn"], ["knn", "msp"]),
    (["--ood", "SVHN"], ["SVHN", "digits-6789"]),
    (["--modes", "ImageNet"], ["ImageNet", "Digits"]),
    (["--group-by", "seed"], ["seed", "detector"]),
    (["--tables", "ood,roc"], ["roc", "stats"]),
    (["--bootstrap", "10"], ["--scores"]),
    (["--views", "x"], ["--plot"]),
])
def test_bad_input_is_one_line_exit_2(store, capsys, args, words):
    code, out, err = run(["report", "--results", str(store["results"]), *args], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err


def test_missing_scores_and_views_are_one_line(store, tmp_path, capsys):
    res = str(store["results"])
    for args, word in ((["--scores", str(tmp_path / "none"), "--bootstrap", "5"], "save-scores"),
                       (["--scores", str(store["scores"]), "--bootstrap", "5", "--member", "seed-9"], "seed-9"),
                       (["--plot", str(tmp_path / "p"), "--views", str(tmp_path)], "extract --export")):
        code, _, err = run(["report", "--results", res, "--tables", "id", *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and word in err, err
