"""The results store knows its runs: mode sets by checkpoint hashes (superseded runs left out, --all-runs
shows them apart), tables whose averages cover the same OOD sets in every row, captions that name mode sets by
their short name, and the ensemble's gain over OOD sets (paired interval, P(beat)) checked by hand."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
from scipy import stats as sps

from cli_runner import run
from oodens.metrics import stats
from oodens.runtime.paths import mode_set_name, shipped_modes_dir


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("OODENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OODENS_RESULTS", str(tmp_path / "res"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_modes(dest, names):
    for name in names:
        shutil.copytree(shipped_modes_dir() / name, dest / name)


def markdown_tables(out: str) -> list[tuple[str, str]]:
    """(title, body) of each Markdown table printed by report --markdown."""
    parts = re.split(r"^\*\*(.+?)\*\*\s*$", out, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def test_a_changed_mode_set_supersedes_its_older_runs(env, capsys):
    modes = env / "save" / "Digits" / "CNN"
    copy_modes(modes, ["seed-1000", "seed-1100"])
    assert run(["eval", "--modes", str(modes), "--detector", "msp", "--json"], capsys)[0] == 0
    copy_modes(modes, ["seed-1200"])  # a mode added: the folder's mode set changed
    assert run(["eval", "--modes", str(modes), "--detector", "msp", "--json"], capsys)[0] == 0

    code, out, err = run(["report", "--markdown", "--tables", "ood", "--metric", "fpr95"], capsys)
    assert code == 0, err
    tables = markdown_tables(out)
    assert len(tables) == 1
    title, body = tables[0]
    assert "save/Digits/CNN (3 modes of cnn)" in title and str(env) not in title  # relative to the working dir
    assert "ensemble (3)" in body and "ensemble (2)" not in body
    note = [line for line in err.splitlines() if "superseded" in line]
    assert len(note) == 1 and "save/Digits/CNN" in note[0] and "2 modes" in note[0] and "--all-runs" in note[0]

    code, out, err = run(["report", "--markdown", "--tables", "ood", "--metric", "fpr95", "--all-runs"], capsys)
    assert code == 0, err
    tables = markdown_tables(out)
    assert len(tables) == 2  # never one caption over two mode sets
    by_n = {("ensemble (2)" in body, "ensemble (3)" in body): title for title, body in tables}
    assert set(by_n) == {(True, False), (False, True)}
    assert "superseded" in by_n[(True, False)] and "2 modes" in by_n[(True, False)]
    assert "superseded" not in by_n[(False, True)]

    # the same folder re-evaluated with its original modes is current again: the latest run decides
    shutil.rmtree(modes / "seed-1200")
    assert run(["eval", "--modes", str(modes), "--detector", "msp", "--json"], capsys)[0] == 0
    code, out, err = run(["report", "--markdown", "--tables", "ood", "--metric", "fpr95"], capsys)
    (title, body), = markdown_tables(out)
    assert "ensemble (2)" in body and "ensemble (3)" not in body and "2 modes" in title


def test_two_mode_sets_are_two_tables_named_by_short_name(env, capsys):
    a, b = env / "a", env / "b"
    copy_modes(a, ["seed-1000", "seed-1100"])
    copy_modes(b, ["seed-1200", "seed-1300", "seed-1400"])
    for folder in (a, b):
        assert run(["eval", "--modes", str(folder), "--detector", "energy", "--json"], capsys)[0] == 0
    assert run(["eval", "--detector", "energy", "--json"], capsys)[0] == 0  # the shipped modes
    code, out, err = run(["report", "--markdown", "--tables", "ood,id", "--metric", "auroc"], capsys)
    assert code == 0 and "superseded" not in err
    titles = [t for t, _ in markdown_tables(out)]
    assert sum("· a (2 modes of cnn)" in t for t in titles) == 2
    assert sum("· b (3 modes of cnn)" in t for t in titles) == 2
    assert sum("· shipped (5 modes of cnn)" in t for t in titles) == 2
    assert "site-packages" not in out and str(shipped_modes_dir()) not in out
    assert all("(ID positive)" in t for t in titles if t.startswith("AUROC"))


def test_mode_set_name(tmp_path):
    assert mode_set_name(shipped_modes_dir()) == "shipped"
    assert mode_set_name(tmp_path / "save" / "X", cwd=tmp_path) == "save/X"
    assert mode_set_name(tmp_path, cwd=tmp_path) == "."
    assert mode_set_name("/", cwd=tmp_path) == "/"  # neither below the working nor the home folder: absolute


def test_sets_missing_from_some_rows_show_a_dash_and_averages_cover_the_same_sets(env, capsys):
    common = ["--results", str(env / "res"), "--json"]
    assert run(["eval", "--detector", "energy", "--ood", "digits-6789,letters,noise", *common], capsys)[0] == 0
    assert run(["eval", "--detector", "msp", "--ood", "digits-6789,letters", *common], capsys)[0] == 0
    records = [{**json.loads(f.read_text())["settings"], **r} for f in (env / "res" / "runs").glob("*.json")
               for r in json.loads(f.read_text())["records"]]

    code, out, err = run(["report", "--markdown", "--tables", "ood", "--metric", "fpr95"], capsys)
    assert code == 0, err
    (title, body), = markdown_tables(out)
    assert "(ID positive)" in title
    assert "average = mean over digits-6789, letters" in body and "noise" not in body.split("average = ")[1]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    col = {name: i for i, name in enumerate(head)}
    detector = ""
    for r in rows:
        detector = r[0] or detector
        member = r[1]
        if member.startswith("seed-") or member.startswith("ensemble"):
            role = "member" if member.startswith("seed-") else "ensemble"
            mine = [x for x in records if x["detector"] == detector.split(" · ")[0] and x["role"] == role
                    and (role == "ensemble" or x["member"] == member)]
            by_set = {x["ood"]: x["fpr95"] for x in mine}
            # the average over the sets every row has, whatever each run averaged itself
            assert r[col["average"]] == f"{100 * np.mean([by_set['digits-6789'], by_set['letters']]):.1f}"
            if detector.startswith("msp"):
                assert r[col["noise"]] == "—"
            else:
                assert r[col["noise"]] == f"{100 * by_set['noise']:.1f}"
    assert any(r[0].startswith("msp") for r in rows) and any(r[0].startswith("energy") for r in rows)


def test_summary_title_lists_exactly_the_averaged_sets(env, capsys):
    code, out, err = run(["eval", "--detector", "msp,energy,maxlogit", "--corruptions", "contrast:1,jpeg:5",
                          "--summary"], capsys)
    assert code == 0, err
    title = [line for line in out.splitlines() if "summary" in line][0]
    assert "average over digits-6789, letters, noise" in title and "contrast" not in title and "jpeg" not in title
    # sorted by the ensemble's AUROC, best first
    rows = [line for line in out.splitlines() if re.match(r"\s*(msp|energy|maxlogit)\s", line)]
    ens_auroc = [float(line.split()[-5]) for line in rows]  # ... AUROC ens., AUPR-Out mean ± std, AUPR-Out ens.
    assert len(rows) == 3 and ens_auroc == sorted(ens_auroc, reverse=True)


# --------------------------------------------------------------------------- gain and P(beat) by hand

def test_beat_probability_by_brute_force():
    modes = [0.20, 0.10, 0.15, 0.10, 0.30]
    for ens in (0.05, 0.10, 0.12, 0.31):
        worse = sum(1.0 if m > ens else 0.5 if m == ens else 0.0 for m in modes)  # fpr95: lower is better
        assert stats.beat_probability(modes, ens, "fpr95") == worse / len(modes)
        better = sum(1.0 if m < ens else 0.5 if m == ens else 0.0 for m in modes)  # auroc: higher is better
        assert stats.beat_probability(modes, ens, "auroc") == better / len(modes)
    assert math.isnan(stats.beat_probability([], 0.1, "auroc"))


def test_ensemble_gain_is_a_paired_t_interval_over_sets():
    import pandas as pd

    rng = np.random.default_rng(3)
    sets = ["a", "b", "c", "d"]
    rows, gains, beats = [], [], []
    for o in sets:
        modes = rng.uniform(0.1, 0.4, 5)
        ens = float(modes.mean() - rng.uniform(0.0, 0.1))
        gains.append(modes.mean() - ens)  # fpr95: lower is better, so gain = mean - ensemble
        beats.append(np.mean(modes > ens))
        rows.append({"setting": "s", "detector": "knn", "strategy": "concat", "ood": o, "kind": "semantic",
                     "metric": "fpr95", "mean": modes.mean(), "ensemble": ens, "in_family": True,
                     "p_beat": stats.beat_probability(modes, ens, "fpr95")})
    rows.append({**rows[0], "ood": "average", "kind": "average", "in_family": False})  # derived: not a set
    got = stats.ensemble_gain(pd.DataFrame(rows)).iloc[0]
    g = np.array(gains)
    half = sps.t.ppf(0.975, len(g) - 1) * g.std(ddof=1) / math.sqrt(len(g))
    assert got["n_sets"] == 4 and got["oods"] == sets
    assert got["gain"] == pytest.approx(g.mean(), abs=1e-12)
    assert (got["gain_low"], got["gain_high"]) == pytest.approx((g.mean() - half, g.mean() + half), abs=1e-12)
    assert got["p_beat"] == pytest.approx(np.mean(beats), abs=1e-12)


def test_report_prints_the_gain_table(env, capsys):
    modes = env / "m"
    copy_modes(modes, ["seed-1000", "seed-1100", "seed-1200"])
    assert run(["eval", "--modes", str(modes), "--detector", "energy", "--json"], capsys)[0] == 0
    records = [r for f in (env / "res" / "runs").glob("*.json") for r in json.loads(f.read_text())["records"]]
    code, out, err = run(["report", "--markdown", "--tables", "stats", "--metric", "auroc"], capsys)
    assert code == 0, err
    (title, body), = [(t, b) for t, b in markdown_tables(out) if t.startswith("Ensemble gain")]
    sets = ["digits-6789", "letters", "noise"]
    g = []
    for o in sets:
        modes_v = [r["auroc"] for r in records if r["ood"] == o and r["role"] == "member"]
        ens = [r["auroc"] for r in records if r["ood"] == o and r["role"] == "ensemble"][0]
        g.append(100 * (ens - np.mean(modes_v)))
    row = [line for line in body.splitlines() if line.startswith("| energy")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3" and cells[2] == f"{np.mean(g):+.1f}"
    low, high = sps.t.interval(0.95, 2, loc=np.mean(g), scale=np.std(g, ddof=1) / math.sqrt(3))
    assert cells[3] == f"[{low:+.1f}, {high:+.1f}]"
    assert "AUROC ↑ (ID positive)" in title


def test_strategy_table_puts_each_strategy_beside_the_modes(env, capsys):
    strategies = ["mean-logits", "mean-probs", "mean-scores"]
    for s in strategies:
        assert run(["eval", "--detector", "msp", "--strategy", s, "--json"], capsys)[0] == 0
    assert run(["eval", "--detector", "energy", "--json"], capsys)[0] == 0  # one strategy: a row with dashes
    records = [r for f in (env / "res" / "runs").glob("*.json") for r in json.loads(f.read_text())["records"]]
    code, out, err = run(["report", "--markdown", "--tables", "strategy", "--metric", "auroc"], capsys)
    assert code == 0, err
    (title, body), = markdown_tables(out)
    assert title.startswith("Ensemble strategies: AUROC ↑ (ID positive) · digits · shipped (5 modes")
    lines = [line for line in body.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["detector", "modes", *strategies]
    cells = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    ens = {r["strategy"]: r["auroc"] for r in records if r["detector"] == "msp" and r["role"] == "ensemble"
           and r["ood"] == "average"}
    best = max(ens.values())
    for i, s in enumerate(strategies):
        text = f"{100 * ens[s]:.1f}"
        assert cells["msp"][2 + i] == (f"**{text}**" if ens[s] == best else text)
    members = [r["auroc"] for r in records if r["detector"] == "msp" and r["role"] == "member"
               and r["ood"] == "average" and r["strategy"] == "mean-logits"]
    assert cells["msp"][1] == f"{100 * np.mean(members):.1f} ± {100 * np.std(members, ddof=1):.1f}"
    assert cells["energy"][3:] == ["—", "—"]


def test_saved_score_folders_with_hyphenated_names_resolve():
    import pandas as pd

    from oodens.report.tables import split_run

    frame = pd.DataFrame({"detector": ["mahalanobis-ml", "knn"], "strategy": ["mean-scores", "concat"]})
    assert split_run("mahalanobis-ml-mean-scores", frame) == ("mahalanobis-ml", "mean-scores")
    assert split_run("knn-concat", frame) == ("knn", "concat")
    # not in the records: the longest registered detector name that prefixes the folder
    assert split_run("ash-p-mean-logits", frame.iloc[:0]) == ("ash-p", "mean-logits")
    assert split_run("ash-mean-scores", frame.iloc[:0]) == ("ash", "mean-scores")


def test_captions_name_the_hyperparameters_in_force(env, capsys):
    modes = env / "m"
    copy_modes(modes, ["seed-1000", "seed-1100"])
    assert run(["eval", "--modes", str(modes), "--detector", "odin,knn", "--odin-eps", "0.002", "--json"],
               capsys)[0] == 0
    code, out, err = run(["report", "--markdown", "--tables", "ood", "--metric", "auroc"], capsys)
    assert code == 0, err
    caption = out.strip().splitlines()[-1]
    assert "Hyperparameters: odin temperature=1000, eps=0.002, eps_space=normalized; knn k=50." in caption


def test_many_members_collapse_into_mean_and_range(env, capsys, monkeypatch):
    from oodens.report import tables

    modes = env / "m"
    copy_modes(modes, ["seed-1000", "seed-1100", "seed-1200"])
    assert run(["eval", "--modes", str(modes), "--detector", "energy", "--json"], capsys)[0] == 0
    records = [r for f in (env / "res" / "runs").glob("*.json") for r in json.loads(f.read_text())["records"]]
    code, out, _ = run(["report", "--markdown", "--tables", "ood", "--metric", "fpr95"], capsys)
    assert "seed-1000" in out and "min–max" not in out  # 3 members: listed
    monkeypatch.setattr(tables, "MEMBER_ROWS_MAX", 2)  # as 50 heads would: collapsed by default
    for args in ([], ["--no-members"]):
        code, out, _ = run(["report", "--markdown", "--tables", "ood", "--metric", "fpr95", *args], capsys)
        assert code == 0 and "seed-1000" not in out
        row = [line for line in out.splitlines() if "min–max (3)" in line][0]
        cells = [c.strip() for c in row.strip("|").split("|")]
        values = [r["fpr95"] for r in records if r["role"] == "member" and r["ood"] == "letters"]
        assert cells[3] == f"{100 * min(values):.1f}–{100 * max(values):.1f}"  # detector, member, digits-6789, letters
    code, out, _ = run(["report", "--markdown", "--tables", "ood", "--metric", "fpr95", "--members"], capsys)
    assert "seed-1000" in out and "min–max" not in out


def test_the_soup_row_shows_beside_the_ensemble():
    from oodens.report.tables import detector_tables, ood_tables
    from oodens.results import records_frame

    base = {"benchmark": "digits", "modes": "/x/heads", "arch": "cnn", "detector": "msp", "strategy": "mean-logits",
            "params": {}, "positive": "id", "n_members": 2, "ood": "letters", "kind": "semantic"}
    records = [{**base, "member": "head-00", "role": "member", "k": 1, "auroc": 0.90},
               {**base, "member": "head-01", "role": "member", "k": 1, "auroc": 0.92},
               {**base, "member": "mean", "role": "mean", "auroc": 0.91},
               {**base, "member": "std", "role": "std", "auroc": 0.0141},
               {**base, "member": "soup", "role": "soup", "k": 1, "auroc": 0.935},
               {**base, "member": "ensemble", "role": "ensemble", "k": 2, "auroc": 0.94}]
    frame = records_frame(records)
    (eval_table,) = detector_tables(frame)
    rows = eval_table.frame.set_index("member")
    assert rows.loc["soup", "AUROC ↑"] == "93.50" and list(rows.index)[-2:] == ["soup", "ensemble (2)"]
    (table,) = ood_tables(frame, ["auroc"])
    cells = table.frame.set_index("member")
    assert cells.loc["soup", "letters"] == "93.5" and cells.loc["ensemble (2)", "letters"] == "94.0"


def test_the_latest_run_is_decided_by_time_not_by_text():
    """Run times written with other offsets (nodes in other time zones, older releases without a colon in the
    offset) are compared as instants: the run written last wins, whatever its string sorts as."""
    import pandas as pd

    from oodens.results import mark_superseded

    rows = [{"benchmark": "digits", "modes": "/m", "modeset": "old", "created": "2026-12-01T10:30:00+02:00"},
            {"benchmark": "digits", "modes": "/m", "modeset": "new", "created": "2026-12-01T09:00:00.000001+00:00"},
            {"benchmark": "digits", "modes": "/m", "modeset": "older", "created": "2026-12-01T05:00:00-0200"}]
    # as strings "2026-12-01T10:30" sorts last, but it is 08:30 UTC: the 09:00 UTC run is the latest
    got = mark_superseded(pd.DataFrame(rows)).set_index("modeset")["superseded"]
    assert got.to_dict() == {"old": True, "new": False, "older": True}


def test_gain_rows_average_the_sets_every_row_has():
    import pandas as pd

    cells = [{"setting": s, "detector": d, "strategy": "x", "ood": o, "kind": "semantic", "metric": "auroc",
              "mean": 0.9, "ensemble": e, "in_family": True, "p_beat": 1.0}
             for s, d, sets in (("a", "knn", {"s1": 0.95, "s2": 0.97, "s3": 0.99}), ("b", "msp", {"s1": 0.92, "s2": 0.94}))
             for o, e in sets.items()]
    got = stats.ensemble_gain(pd.DataFrame(cells)).set_index("setting")
    assert got.loc["a", "oods"] == ["s1", "s2"] and got.loc["a", "gain"] == pytest.approx(0.06)
    assert got.loc["b", "gain"] == pytest.approx(0.03)


def test_strategy_table_keeps_differently_fitted_runs_apart(env, capsys):
    # knn on the whole training split (concat), then under --strategy zscore, which fits on train minus the hold-out
    assert run(["eval", "--detector", "knn", "--json"], capsys)[0] == 0
    assert run(["eval", "--detector", "knn", "--strategy", "zscore", "--json"], capsys)[0] == 0
    assert run(["eval", "--detector", "knn", "--strategy", "mean-scores", "--json"], capsys)[0] == 0
    code, out, err = run(["report", "--markdown", "--tables", "strategy", "--metric", "auroc"], capsys)
    assert code == 0, err
    (title, body), = markdown_tables(out)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("|")][2:]
    labels = [r[0] for r in rows]
    assert labels == ["knn (k=50)", "knn (k=50, fit=train-val)"]  # two variants, never one row
    assert rows[0][3] == "—" and rows[1][2] == "—"  # zscore only in the variant fitted on train minus the hold-out
