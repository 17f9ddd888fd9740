"""``oodens report``: tables, statistics and plots from the results store that ``oodens eval`` fills.

Records become one pandas DataFrame (:func:`load_frame`, one row per record, settings merged in);
the table builders turn it into :class:`Table` objects (wide frames of formatted cells, as in the
papers) that render to the terminal (rich), Markdown (tabulate) or LaTeX (booktabs ``tabular``).
CSV and JSON exports are the long/tidy form (:func:`tidy`: one row per record and metric).

Tables, one set per mode set x benchmark x metric convention:
- ``ood``: per metric, rows = detector x (each mode, mean ± std, ensemble), columns = OOD sets and
  their averages (near/far/average);
- ``stats``: per metric, detector x OOD set: modes' mean with its t-interval (logit scale for metrics in
  [0, 1]), std, min–max, the ensemble, and a one-sided t-test of ensemble vs modes, Holm-corrected over the
  independent (detector, OOD set) cells; near/far/average rows are descriptive (oodens.metrics.stats);
- ``id``: ID accuracy, NLL, Brier, ECE per mode, mean ± std, ensemble;
- ``shift``: accuracy on covariate-shift sets (each corruption and the C-1..C-5 severity averages);
- ``size``: metric against the number of modes k (mean ± std over k-of-N subsets);
- ``strategy``: detector x ensemble strategy on the OOD average (``eval --strategy all``): which fusion suits
  which detector, beside the modes' mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from oodens.errors import OodensError
from oodens.metrics import calibration as cal
from oodens.metrics import stats
from oodens.metrics.ood import METRICS, OOD_METRICS, QUALITY_METRICS
from oodens.results import FAMILY
from oodens.runtime.paths import mode_set_name, safe_name

QUALITY = QUALITY_METRICS
DEFAULT_METRICS = ("fpr95", "auroc")
LABELS = {name: m.label for name, m in METRICS.items()}
NOT_PERCENT = {name for name, m in METRICS.items() if not m.percent}
TABLES = ("ood", "stats", "strategy", "id", "shift", "size")
GROUP_BY = ("metric", "detector")
CONVENTION = {
    "id": "ID positive: FPR95 = % of OOD accepted when 95% of ID is kept",
    "ood": "OOD positive (OpenOOD): FPR95 = % of ID rejected when 95% of OOD is caught",
}
#: the family keys of tables that do not depend on the metric convention (ID quality, accuracy under shift)
MODE_SET = [k for k in FAMILY if k != "positive"]
#: the convention in a title
CONVENTION_TAG = {"id": "ID positive", "ood": "OOD positive"}
#: OOD-set kinds that the average/near/far rows average
SEMANTIC = ("near", "far", "semantic")
AVERAGED = {"average": SEMANTIC, "near": ("near",), "far": ("far",)}
#: the columns of eval's per-detector tables
EVAL_COLUMNS = ("fpr95", "auroc", "aupr_in", "aupr_out", "id_accuracy")


def _names(spec: Optional[str]) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def parse_metrics(spec: Optional[str]) -> list[str]:
    """``--metric``: a comma list of OOD metrics."""
    names = _names(spec)
    bad = [m for m in names if m not in OOD_METRICS]
    if bad:
        raise OodensError(f"unknown metric {bad[0]!r}: expected one of {', '.join(OOD_METRICS)} (comma list)")
    return names


def filter_frame(frame: pd.DataFrame, detector: Optional[str] = None, strategy: Optional[str] = None,
                 modes: Optional[str] = None, ood: Optional[str] = None, where: str = "the results") -> pd.DataFrame:
    """Keep the records of the named detectors, strategy, mode sets (path substring) and OOD sets."""
    def keep(column, wanted, flag):
        have = list(dict.fromkeys(frame[column]))
        bad = [w for w in wanted if w not in have]
        if bad:
            raise OodensError(f"{flag} {bad[0]!r}: not in {where}; expected one of {', '.join(map(str, have))}")
        return frame[column].isin(wanted)

    if detector and detector.strip() != "all":
        frame = frame[keep("detector", _names(detector), "--detector")]
    if strategy:
        frame = frame[keep("strategy", _names(strategy), "--strategy")]
    if modes:
        hit = frame["modes"].str.contains(modes, regex=False)
        if not hit.any():
            raise OodensError(f"--modes {modes!r} matches no mode set in {where}; expected a substring of one of "
                              f"{', '.join(dict.fromkeys(frame['modes']))}")
        frame = frame[hit]
    if ood:
        frame = frame[keep("ood", _names(ood), "--ood")]
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------- formatting

def fmt(x: float, metric: str) -> str:
    """Percent with one decimal (NLL and Brier as they are, three decimals); NaN as an em dash."""
    if x is None or not np.isfinite(x):
        return "—"
    return f"{x:.3f}" if metric in NOT_PERCENT else f"{100 * x:.1f}"


def fmt_mean_std(values, metric: str) -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "—"
    return fmt(v.mean(), metric) + (f" ± {fmt(v.std(ddof=1), metric)}" if len(v) > 1 else "")


def fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def arrow(metric: str) -> str:
    return "↑" if METRICS[metric].higher_is_better else "↓"


# --------------------------------------------------------------------------- tables

@dataclass
class Table:
    """A wide table of formatted cells; the first ``labels`` columns name the rows. Consecutive rows with
    the same first label form a block (one detector), separated by a rule when rendered."""

    kind: str
    title: str
    caption: str
    frame: pd.DataFrame
    labels: int = 1
    #: rule between blocks of rows sharing the first label (when ``labels`` > 1)
    sections: bool = True
    #: cells to emphasise, as (row position, column name): bold in every rendering
    bold: frozenset = frozenset()

    def __str__(self) -> str:
        return render_markdown(self)

    def _repr_markdown_(self) -> str:  # notebooks
        return render_markdown(self)


def family_title(info: dict, sub: pd.DataFrame) -> str:
    """``digits · shipped (5 modes of cnn)``: the benchmark and the mode set by its short name and member count;
    a superseded mode set (``--all-runs``) says so, with the date of its latest run."""
    n = int(sub["n_members"].max())
    title = f"{info['benchmark']} · {mode_set_name(info['modes'])} ({plural(n, 'mode')} of {set_arch(sub)})"
    if "superseded" in sub and sub["superseded"].any():
        title += f", superseded run of {str(sub['created'].max())[:16].replace('T', ' ')}"
    return title


def set_arch(sub: pd.DataFrame) -> str:
    """The mode set's architecture: the run's (``a+b`` for a mixed set, whose member rows carry their own)."""
    whole = sub.loc[sub["role"] != "member", "arch"] if "role" in sub else sub["arch"]
    return str((whole if len(whole) else sub["arch"]).iloc[0])


def member_labels(rows: pd.DataFrame) -> dict[str, str]:
    """Member name -> its row label: the name, with its architecture (``seed-1 (cnn)``) when the members' rows
    name several (a mixed set)."""
    rows = rows[rows["role"] == "member"] if "role" in rows else rows
    arch = rows.drop_duplicates("member").set_index("member")["arch"] if "arch" in rows else pd.Series(dtype=object)
    mixed = arch.nunique() > 1
    return {name: f"{name} ({arch[name]})" if mixed and arch.get(name) else name for name in rows["member"].unique()}


def families(frame: pd.DataFrame, keys=FAMILY):
    """(title, {key: value}, sub-frame) per benchmark x mode set (folder and checkpoints) x convention
    (``keys``); the averaged rows (average/near/far) of each sub-frame are over the same OOD sets for every
    row (:func:`align_averages`)."""
    for key, sub in frame.groupby(keys, sort=False):
        info = dict(zip(keys, key))
        yield family_title(info, sub), info, align_averages(sub)


def averaged_sets(sub: pd.DataFrame) -> dict[str, list[str]]:
    """The OOD sets each averaged row (average, near, far) of ``sub`` is the mean of: the semantic sets that every
    detector setting of ``sub`` was evaluated on (all of them unless ``--ood`` changed between runs); a row
    needs two sets, as in :mod:`oodens.ensemble.evaluate`."""
    semantic = sub[sub["kind"].isin(SEMANTIC)]
    if semantic.empty:
        return {}
    common = set.intersection(*semantic.groupby("setting")["ood"].agg(set))
    kinds = semantic.drop_duplicates("ood").set_index("ood")["kind"]
    have = set(sub["ood"])
    out = {}
    for row, members in AVERAGED.items():
        sets = [o for o, k in kinds.items() if k in members and o in common]
        if row in have and len(sets) > 1:
            out[row] = sets
    return out


def align_averages(sub: pd.DataFrame) -> pd.DataFrame:
    """When the settings of one table were evaluated on different OOD sets (``--ood`` changed between runs), an
    average over each setting's own sets would compare different things: recompute average/near/far over the
    sets every setting has (:func:`averaged_sets`; per record: members, ensemble, subset means; a subset std
    cannot be recomputed from the per-set stds and becomes NaN, shown as —); a row left with fewer than two
    sets becomes NaN."""
    semantic = sub[sub["kind"].isin(SEMANTIC)]
    if semantic.groupby("setting")["ood"].agg(frozenset).nunique() <= 1:
        return sub
    values = [m for m in METRICS if m in sub]
    id_cols = ["setting", "role", "member", "k", "stat"]
    rows = averaged_sets(sub)
    out = sub.copy()
    for row in AVERAGED:
        at = out["ood"] == row
        if not at.any():
            continue
        if row not in rows:
            out.loc[at, values] = np.nan
            continue
        means = (semantic[semantic["ood"].isin(rows[row])].fillna({"k": -1.0, "stat": ""})
                 .groupby(id_cols)[values].mean())
        for i in out.index[at]:
            r = out.loc[i]
            key = (r["setting"], r["role"], r["member"], r["k"] if np.isfinite(r["k"]) else -1.0,
                   r["stat"] if isinstance(r["stat"], str) else "")
            out.loc[i, values] = means.loc[key].to_numpy() if key in means.index and r["stat"] != "std" else np.nan
    return out


def _setting_order(sub: pd.DataFrame) -> list[str]:
    from oodens.detectors import DETECTORS

    order = {name: i for i, name in enumerate(DETECTORS)}
    first = dict(zip(sub["setting"], sub["detector"]))
    return sorted(first, key=lambda s: (order.get(first[s], len(order)), s))


def setting_labels(sub: pd.DataFrame) -> dict[str, str]:
    """Row labels: ``detector · strategy``, with the parameters only where one detector has several."""
    first = sub.drop_duplicates("setting").set_index("setting")
    out = {}
    for s, r in first.iterrows():
        same = first[(first["detector"] == r["detector"]) & (first["strategy"] == r["strategy"])]
        out[s] = s if len(same) > 1 else f"{r['detector']} · {r['strategy']}"
    return out


def ood_columns(sub: pd.DataFrame, wanted: Optional[list[str]] = None) -> list[str]:
    """The OOD sets named in ``wanted`` (in that order), else the semantic sets then near/far/average."""
    order = list(dict.fromkeys(sub["ood"]))
    if wanted:
        return [o for o in wanted if o in order]
    kinds = sub.drop_duplicates("ood").set_index("ood")["kind"]
    return ([o for o in order if kinds[o] in ("near", "far", "semantic")]
            + [o for o in ("near", "far", "average") if o in order])


#: above this many members, tables show their mean ± std and min–max instead of a row each (``--members``)
MEMBER_ROWS_MAX = 10


def show_members(n: int, members: Optional[bool] = None) -> bool:
    """Whether tables list every member: ``members`` when given (``--members/--no-members``), else up to
    :data:`MEMBER_ROWS_MAX` members (50 SED heads collapse into their mean ± std and min–max)."""
    return members if members is not None else n <= MEMBER_ROWS_MAX


def fmt_range(values, metric: str) -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return f"{fmt(v.min(), metric)}–{fmt(v.max(), metric)}" if len(v) else "—"


def _member_rows(block: pd.DataFrame, cells: list[tuple[str, str]], members: Optional[bool] = None) -> list[list[str]]:
    """[label, *cells] for each mode (or, when :func:`show_members` says no, their min–max), mean ± std over
    modes and the ensemble; ``cells`` = (metric, ood) pairs."""
    modes = block[block["role"] == "member"]
    rows = []
    mats = {m: modes.pivot_table(index="member", columns="ood", values=m, aggfunc="first", dropna=False)
            for m in dict.fromkeys(m for m, _ in cells)}

    def cell(mat, name, ood, metric):
        return fmt(mat.at[name, ood], metric) if name in mat.index and ood in mat.columns else "—"

    names = sorted(modes["member"].unique())
    listed = show_members(len(names), members)
    label = member_labels(modes)
    for name in names if listed else []:
        rows.append([label[name]] + [cell(mats[m], name, o, m) for m, o in cells])
    if len(names) > 1:
        column = lambda m, o: mats[m][o] if o in mats[m].columns else []  # noqa: E731
        rows.append(["mean ± std"] + [fmt_mean_std(column(m, o), m) for m, o in cells])
        if not listed:
            rows.append([f"min–max ({len(names)})"] + [fmt_range(column(m, o), m) for m, o in cells])
    soup = block[block["role"] == "soup"].set_index("ood")
    if len(soup):  # SED heads: their averaged weights as one head, beside the ensemble
        rows.append(["soup"] + [fmt(soup.at[o, m], m) if o in soup.index else "—" for m, o in cells])
    ens = block[block["role"] == "ensemble"].set_index("ood")
    if len(ens):
        rows.append([f"ensemble ({int(ens['n_members'].iloc[0])})"]
                    + [fmt(ens.at[o, m], m) if o in ens.index else "—" for m, o in cells])
    return rows


def averages_note(sub: pd.DataFrame) -> str:
    """What the averaged columns average, for a caption: ``average = mean over a, b, c.``"""
    parts = [f"{row} = mean over {', '.join(sets)}" for row, sets in averaged_sets(sub).items() if sets]
    return ("; ".join(parts) + ". ") if parts else ""


def params_note(sub: pd.DataFrame) -> str:
    """The hyperparameters in force, for a caption (``Hyperparameters: odin eps=0.0014, eps_space=normalized,
    temperature=1000; knn k=50.``): they change with the benchmark (:mod:`oodens.detectors.defaults`) and the
    flags, and a table must say which were used."""
    seen = {}
    for s in _setting_order(sub):
        row = sub[sub["setting"] == s].iloc[0]
        params = json.loads(row["params"])
        if params:
            seen.setdefault(f"{row['detector']} " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in params.items()), None)
    return ("Hyperparameters: " + "; ".join(seen) + ". ") if seen else ""


def _caption(positive: str, sub: pd.DataFrame) -> str:
    return (f"{CONVENTION[positive]}. Values in %; mean ± std over modes (sample std); ensemble (N): the N modes "
            f"combined with the detector's strategy. {averages_note(sub)}{params_note(sub)}").strip()


def ood_tables(frame: pd.DataFrame, metrics=DEFAULT_METRICS, oods: Optional[list[str]] = None,
               group_by: str = "metric", members: Optional[bool] = None) -> list[Table]:
    """The papers' OOD table. ``group_by="metric"``: one table per metric, rows = detector x member,
    columns = OOD sets; ``"detector"``: one table per detector, rows = metric x OOD set, columns = members.
    ``members``: list every member (default: up to :data:`MEMBER_ROWS_MAX`, see :func:`show_members`)."""
    out = []
    for title, info, sub in families(frame):
        cols = ood_columns(sub, oods)
        if not cols:
            continue
        labels = setting_labels(sub)
        settings = _setting_order(sub)
        if group_by == "metric":
            for m in metrics:
                rows = [[labels[s], *r] for s in settings for r in _member_rows(sub[sub["setting"] == s],
                                                                                 [(m, o) for o in cols], members)]
                out.append(Table("ood", f"{LABELS[m]} {arrow(m)} ({CONVENTION_TAG[info['positive']]}) · {title}", _caption(info["positive"], sub),
                                 pd.DataFrame(rows, columns=["detector", "member", *cols]), 2))
        else:  # members as columns, metric x OOD set as rows
            pairs = [(m, o) for m in metrics for o in cols]
            for s in settings:
                rows = _member_rows(sub[sub["setting"] == s], pairs, members)
                wide = pd.DataFrame([r[1:] for r in rows], index=[r[0] for r in rows]).T
                wide.insert(0, "OOD set", cols * len(metrics))
                wide.insert(0, "metric", [f"{LABELS[m]} {arrow(m)}" for m, _ in pairs])
                out.append(Table("ood", f"{labels[s]} ({CONVENTION_TAG[info['positive']]}) · {title}", _caption(info["positive"], sub),
                                 wide.reset_index(drop=True), 2))
    return out


def stats_frame(frame: pd.DataFrame, metrics=DEFAULT_METRICS, oods: Optional[list[str]] = None,
                alpha: float = 0.05) -> pd.DataFrame:
    """oodens.metrics.stats.mode_stats per mode set x benchmark x convention x metric (Holm within each), as numbers."""
    parts = []
    for _, info, sub in families(frame):
        sub = sub[sub["ood"].isin(ood_columns(sub, oods))]
        for m in metrics:
            st = stats.mode_stats(sub, m, level=1 - alpha, alpha=alpha)
            parts.append(st.assign(**info))
    cols = FAMILY + ["setting", "detector", "strategy", "ood", "kind", "metric", "n_modes", "mean", "std", "min",
                     "max", "ci_low", "ci_high", "ensemble", "t", "p", "p_beat", "in_family", "p_holm",
                     "ensemble_better"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def stats_tables(frame: pd.DataFrame, metrics=DEFAULT_METRICS, oods: Optional[list[str]] = None,
                 alpha: float = 0.05) -> list[Table]:
    """Per metric: modes' mean, t-interval, std, min–max, ensemble, and the Holm-corrected test."""
    numbers = stats_frame(frame, metrics, oods, alpha)
    out = []
    level = f"{100 * (1 - alpha):g}%"
    for title, info, sub in families(frame):
        labels = setting_labels(sub)
        order = {s: i for i, s in enumerate(_setting_order(sub))}
        for m in metrics:
            st = numbers[(numbers[FAMILY] == pd.Series(info)).all(axis=1) & (numbers["metric"] == m)]
            if st.empty:
                continue
            cols = {o: i for i, o in enumerate(ood_columns(sub, oods))}
            st = st.assign(_s=st["setting"].map(order), _o=st["ood"].map(cols)).sort_values(["_s", "_o"])
            rows = [[labels[r.setting], r.ood, fmt(r.mean, m), f"[{fmt(r.ci_low, m)}, {fmt(r.ci_high, m)}]",
                     fmt(r.std, m), f"{fmt(r.min, m)}–{fmt(r.max, m)}", fmt(r.ensemble, m),
                     f"{100 * (r.ensemble - r.mean):+.1f}", f"{r.p_beat:.2f}", fmt_p(r.p), fmt_p(r.p_holm),
                     ("yes" if r.ensemble_better else "no") if r.in_family else "—"] for r in st.itertuples()]
            head = ["detector", "OOD set", "modes", f"{level} CI", "std", "min–max", "ensemble", "Δ", "P(beat)", "p",
                    "p Holm", "better"]
            side = "higher" if METRICS[m].higher_is_better else "lower"
            n_family, derived = int(st["in_family"].sum()), list(dict.fromkeys(st.loc[~st["in_family"], "ood"]))
            interval = (f"{level} t-interval on the logit scale (values clipped to [{stats.LOGIT_EPS:g}, "
                        f"1 − {stats.LOGIT_EPS:g}]), back-transformed" if stats.bounded(m) else f"{level} t-interval")
            caption = (f"{CONVENTION[info['positive']]}. " + ("Values in %. " if m not in NOT_PERCENT else "")
                       + f"modes: mean over modes with its {interval}, sample std and range; Δ = ensemble − modes' "
                       f"mean; P(beat): probability that the ensemble beats a mode drawn at random (share of modes "
                       f"worse than the ensemble, ties half); p: one-sided one-sample t-test of the modes' values against the ensemble's (H1: "
                       f"ensemble better, {side} is better); p Holm: Holm-corrected over the {n_family} independent "
                       f"(detector, OOD set) test{'s' if n_family != 1 else ''} of this table; better: p Holm < "
                       f"{alpha:g}."
                       + (f" Rows {', '.join(derived)} average other rows: their p is descriptive, not a test "
                          "(no correction, —)." if derived else ""))
            tag = CONVENTION_TAG[info["positive"]]
            out.append(Table("stats", f"Ensemble vs modes: {LABELS[m]} {arrow(m)} ({tag}) · {title}", caption,
                             pd.DataFrame(rows, columns=head), 2))
            gains = stats.ensemble_gain(st, level=1 - alpha)
            if not gains.empty:
                out.append(gain_table(gains, labels, m, level, f"{LABELS[m]} {arrow(m)} ({tag}) · {title}",
                                      CONVENTION[info["positive"]]))
    return out


def gain_table(gains: pd.DataFrame, labels: dict[str, str], metric: str, level: str, title: str,
               convention: str) -> Table:
    """Per detector setting: the ensemble's gain over the modes' mean across the OOD sets, its paired
    t-interval over sets, and P(ensemble beats a random mode) averaged over sets."""
    unit = " (points of %)" if metric not in NOT_PERCENT else ""
    scale = 1 if metric in NOT_PERCENT else 100
    digits = 3 if metric in NOT_PERCENT else 1

    def num(x):
        return "—" if not np.isfinite(x) else f"{scale * x:+.{digits}f}"

    rows = [[labels[r.setting], str(r.n_sets), num(r.gain), f"[{num(r.gain_low)}, {num(r.gain_high)}]",
             f"{r.p_beat:.2f}"] for r in gains.itertuples()]
    sets = ", ".join(dict.fromkeys(o for r in gains.itertuples() for o in r.oods))
    caption = (f"{convention}. Gain = ensemble's improvement over the modes' mean{unit}, positive = better, "
               f"averaged over the OOD sets {sets}; {level} CI: paired t-interval over those sets (each set pairs the "
               "ensemble with the modes' mean; — for one set); P(beat): mean over the sets of the probability that "
               "the ensemble beats a mode drawn at random.")
    return Table("stats", f"Ensemble gain over OOD sets: {title}", caption,
                 pd.DataFrame(rows, columns=["detector", "OOD sets", "gain", f"{level} CI", "P(beat)"]), 1,
                 sections=False)


def strategy_tables(frame: pd.DataFrame, metrics=DEFAULT_METRICS, oods: Optional[list[str]] = None) -> list[Table]:
    """Per metric: rows = detector (same hyperparameters), columns = the modes' mean ± std and the ensemble under
    each strategy stored, on the average OOD row (else the one semantic set); the best strategy of each row in
    bold (Markdown ``**``). Only for mode sets where some detector was evaluated under several strategies."""
    out = []
    for title, info, sub in families(frame):
        # a row per detector *variant*: its setting less the strategy (hyperparameters, fit fraction, fit=train-val,
        # select=...), so that runs fitted differently are never one row
        sub = sub.assign(variant=[st.replace(f" · {sg}", "", 1) for st, sg in zip(sub["setting"], sub["strategy"])])
        ens = sub[sub["role"] == "ensemble"]
        if ens.empty or ens.groupby("variant")["strategy"].nunique().max() < 2:
            continue
        target = "average" if "average" in set(sub["ood"]) else (ood_columns(sub, oods) or [None])[-1]
        if target is None:
            continue
        strategies = list(dict.fromkeys(ens["strategy"]))
        order = {name: i for i, name in enumerate(_setting_order(sub))}
        for m in metrics:
            better = max if METRICS[m].higher_is_better else min
            rows, bold = [], set()
            groups = ens[ens["ood"] == target].groupby(["detector", "variant"], sort=False)
            for (det, variant), block in sorted(groups, key=lambda g: min(order[s] for s in g[1]["setting"])):
                values = dict(zip(block["strategy"], block[m]))
                members = sub[(sub["role"] == "member") & (sub["ood"] == target) & (sub["variant"] == variant)]
                mean = fmt_mean_std(members.drop_duplicates("member")[m], m) if len(members) else "—"
                finite = [v for v in values.values() if np.isfinite(v)]
                best = better(finite) if finite else None
                cells = [fmt(values[s], m) if s in values else "—" for s in strategies]
                bold |= {(len(rows), s) for s in strategies
                         if s in values and len(finite) > 1 and values[s] == best}
                several = ens.loc[ens["detector"] == det, "variant"].nunique() > 1
                rows.append([variant if several else det, mean, *cells])
            where = f"average over {', '.join(averaged_sets(sub).get('average', []))}" if target == "average" \
                else target
            caption = (f"{CONVENTION[info['positive']]}. Values in % on the {where}; modes: mean ± std over modes "
                       "(the same whatever the strategy); one column per ensemble strategy, the best in bold; — where "
                       "a strategy does not apply or was not run.")
            out.append(Table("strategy", f"Ensemble strategies: {LABELS[m]} {arrow(m)} "
                             f"({CONVENTION_TAG[info['positive']]}) · {title}", caption,
                             pd.DataFrame(rows, columns=["detector", "modes", *strategies]), 1, sections=False,
                             bold=frozenset(bold)))
    return out


def _quality_rows(sub: pd.DataFrame, columns: list[tuple[str, str]], members: Optional[bool] = None) -> list[list[str]]:
    """Rows (modes, mean ± std, ensemble) of per-member quantities that do not depend on the detector:
    ``columns`` = (metric, ood) pairs; the first record of each member and OOD set is used."""
    sub = sub[sub["role"].isin(["member", "ensemble"])]
    by_member = sub.drop_duplicates(["role", "member", "ood"])
    return _member_rows(by_member.assign(setting="", n_members=by_member["n_members"].max()), columns, members)


def quality_tables(frame: pd.DataFrame, members: Optional[bool] = None) -> list[Table]:
    """ID quality and calibration per mode, mean ± std and ensemble: accuracy, NLL, Brier, ECE."""
    out = []
    for title, info, sub in families(frame, MODE_SET):
        rows = _quality_rows(sub.assign(ood="ID test"), [(m, "ID test") for m in QUALITY], members)
        head = ["member"] + [LABELS[m] + ("" if m in NOT_PERCENT else " %") + f" {arrow(m)}" for m in QUALITY]
        caption = (f"ID test set of {info['benchmark']}. Accuracy and ECE in % (ECE: {cal.ECE_BINS} equal-width "
                   "bins), NLL in nats, Brier = mean sum of squares over classes. " + _ensemble_note(sub, quality=True))
        out.append(Table("id", f"ID quality and calibration · {title}", caption, pd.DataFrame(rows, columns=head), 1))
    return out


def _ensemble_note(sub: pd.DataFrame, quality: bool) -> str:
    """How the ensemble's prediction is formed, for a caption (leave-out members differ)."""
    if sub["leave_out"].any():
        return ("Leave-out members are judged on the test samples of the classes they kept; ensemble: each member's "
                "softmax spread over all classes (0 on the classes it left out), averaged" +
                (" (accuracy: argmax of that mean)." if quality else "; accuracy: argmax of that mean."))
    if quality:
        return "Ensemble: mean of the members' softmax (accuracy: argmax of the averaged logits)."
    return "Ensemble: argmax of the averaged logits."


def shift_tables(frame: pd.DataFrame, members: Optional[bool] = None) -> list[Table]:
    """Accuracy under covariate shift: the clean ID test, each corrupted set, and C-1..C-5 severity averages."""
    out = []
    for title, info, sub in families(frame, MODE_SET):
        shift = sub[sub["kind"].isin(["shift", "shift-average"])]
        if shift.empty:
            continue
        sets = list(dict.fromkeys(shift.loc[shift["kind"] == "shift", "ood"]))
        sev = sorted(dict.fromkeys(shift.loc[shift["kind"] == "shift-average", "ood"]))
        clean = sub.assign(ood="clean", ood_accuracy=sub["id_accuracy"])
        both = pd.concat([clean.drop_duplicates(["role", "member"]), shift], ignore_index=True)
        rows = _quality_rows(both, [("ood_accuracy", o) for o in ["clean", *sets, *sev]], members)
        wide = pd.DataFrame(rows, columns=["member", "clean", *[o.split("/", 1)[-1] for o in sets], *sev])
        wide = wide.set_index("member").T.rename_axis(None, axis=1).rename_axis("set").reset_index()
        caption = ("Accuracy in % on the ID test set (clean) and its corrupted copies (rows); C-s: mean over the "
                   "corruptions at severity s. " + _ensemble_note(sub, quality=False))
        out.append(Table("shift", f"Accuracy under covariate shift · {title}", caption, wide, 1))
    return out


def size_tables(frame: pd.DataFrame, metrics=DEFAULT_METRICS, oods: Optional[list[str]] = None) -> list[Table]:
    """Metric against ensemble size k: mean ± std over the k-of-N subsets (``--ensemble-size`` runs)."""
    out = []
    for title, info, sub in families(frame):
        subsets = sub[sub["role"] == "subsets"]
        if subsets.empty:
            continue
        cols = ood_columns(sub, oods)
        ks = sorted(int(k) for k in subsets["k"].dropna().unique())
        labels = setting_labels(sub)
        for m in metrics:
            rows = []
            for s in _setting_order(subsets):
                block = subsets[subsets["setting"] == s]
                for o in cols:
                    cells = []
                    for k in ks:
                        at = (block["k"] == k) & (block["ood"] == o)
                        mean = block[at & (block["stat"] == "mean")]
                        std = block[at & (block["stat"] == "std")][m]
                        if mean.empty:
                            cells.append("—")
                        elif float(mean["n_subsets"].iloc[0]) < 2:  # one subset (k = N): no std
                            cells.append(fmt(mean[m].iloc[0], m))
                        else:
                            cells.append(f"{fmt(mean[m].iloc[0], m)} ± {fmt(std.iloc[0], m)}")
                    rows.append([labels[s], o, *cells])
            caption = (f"{CONVENTION[info['positive']]}. Values in %: mean ± std over the k-of-N subsets of the "
                       "modes (all of them, or a seeded sample; counts in the CSV as n_subsets; one subset: no std).")
            tag = CONVENTION_TAG[info["positive"]]
            out.append(Table("size", f"Ensemble size: {LABELS[m]} {arrow(m)} ({tag}) · {title}", caption,
                             pd.DataFrame(rows, columns=["detector", "OOD set", *[f"k={k}" for k in ks]]), 2))
    return out


def bootstrap_table(boot: pd.DataFrame, n: int, alpha: float, seed: int) -> Table:
    rows = [[r.run, r.member, r.ood, LABELS[r.metric], fmt(r.value, r.metric),
             f"[{fmt(r.ci_low, r.metric)}, {fmt(r.ci_high, r.metric)}]"] for r in boot.itertuples()]
    caption = (f"Percentile bootstrap over samples ({n} resamples of the ID and OOD scores, seed {seed}); "
               "values in %.")
    return Table("bootstrap", f"Bootstrap {100 * (1 - alpha):g}% CI from saved scores", caption,
                 pd.DataFrame(rows, columns=["detector", "member", "OOD set", "metric", "value", "CI"]), 2)


# --------------------------------------------------------------------------- eval's tables

def _pct2(x: float) -> str:
    return f"{100 * x:.2f}"


def _eval_cells(row: pd.Series, columns, std: Optional[pd.Series] = None, n: int = 2) -> list[str]:
    """Percentages with two decimals; with ``std``, "mean ± std" over ``n`` values ("mean ± —" for one value:
    the std of one mode or one subset is undefined, whatever the record stores)."""
    def one(k):
        if not np.isfinite(row[k]):
            return ""
        if std is None:
            return _pct2(row[k])
        return f"{_pct2(row[k])} ± {_pct2(std[k]) if n > 1 else '—'}"
    return [one(k) for k in columns]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def detector_tables(frame: pd.DataFrame, members: Optional[bool] = None) -> list[Table]:
    """``oodens eval``'s tables, one per detector x strategy: per OOD set a row per mode (or their min–max, see
    :func:`show_members`), mean ± std, the ensemble and the ensemble-size sweep (k=..), with every OOD metric
    and ID accuracy as columns."""
    out = []
    for _, block in frame.groupby("setting", sort=False):
        first = block.iloc[0]
        params = ", ".join(f"{k}={v}" for k, v in json.loads(first["params"]).items())
        columns = list(EVAL_COLUMNS) + (["ood_accuracy"] if block["ood_accuracy"].notna().any() else [])
        heads = [f"{LABELS[c] if c != 'id_accuracy' else 'ID acc'} {arrow(c)}" for c in columns]
        heads = [h.replace("Acc. on set", "acc on set") for h in heads]
        rows = []
        listed = show_members(int(first["n_members"]), members)
        label = member_labels(block)
        for ood, at in block.groupby("ood", sort=False):
            std = at[at["role"] == "std"]
            for _, r in at.iterrows():
                if r["role"] == "member" and listed:
                    rows.append([ood, label.get(r["member"], r["member"]), *_eval_cells(r, columns)])
                elif r["role"] == "mean":
                    rows.append([ood, "mean ± std", *_eval_cells(r, columns, std.iloc[0], int(r["n_members"]))])
                    if not listed:
                        each = at[at["role"] == "member"]
                        rows.append([ood, f"min–max ({len(each)})",
                                     *[f"{_pct2(each[c].min())}–{_pct2(each[c].max())}" if each[c].notna().any()
                                       else "" for c in columns]])
                elif r["role"] == "soup":  # SED heads: their averaged weights as one head, not in the ensemble
                    rows.append([ood, "soup", *_eval_cells(r, columns)])
                elif r["role"] == "ensemble":
                    rows.append([ood, f"ensemble ({int(r['n_members'])})", *_eval_cells(r, columns)])
                elif r["role"] == "subsets" and r["stat"] == "mean":
                    sd = at[(at["role"] == "subsets") & (at["k"] == r["k"]) & (at["stat"] == "std")].iloc[0]
                    n = int(r["n_subsets"])
                    rows.append([ood, f"k={int(r['k'])} ({plural(n, 'subset')})", *_eval_cells(r, columns, sd, n)])
        title = f"{first['detector']}{f' ({params})' if params else ''} · strategy {first['strategy']}"
        out.append(Table("eval", title, CONVENTION[first["positive"]] + "; values in %, std over modes",
                         pd.DataFrame(rows, columns=["OOD set", "member", *heads]), 2))
    return out


def summary_table(frame: pd.DataFrame) -> Table:
    """One row per detector x strategy on the OOD average (or the one semantic OOD set when there is one): the
    modes' mean ± std next to the ensemble, for FPR95, AUROC and AUPR-Out, sorted by the ensemble's AUROC (best
    first) so that the best detector leads however many run (``oodens eval --summary``)."""
    first = frame.iloc[0]
    semantic = list(dict.fromkeys(frame.loc[frame["kind"].isin(SEMANTIC), "ood"]))
    target = "average" if "average" in set(frame["ood"]) else (semantic or list(dict.fromkeys(frame["ood"])))[-1]
    rows, order = [], []
    for _, block in frame[frame["ood"] == target].groupby("setting", sort=False):
        by_role = {role: b.iloc[0] for role, b in block.groupby("role", sort=False)}
        cells = []
        for k in ("fpr95", "auroc", "aupr_out"):
            mean = (_eval_cells(by_role["mean"], [k], by_role["std"], int(by_role["mean"]["n_members"]))[0]
                    if "mean" in by_role else "—")
            cells += [mean, _pct2(by_role["ensemble"][k])]
        rows.append([block["detector"].iloc[0], block["strategy"].iloc[0], *cells])
        order.append(-by_role["ensemble"]["auroc"])
    rows = [r for _, r in sorted(zip(order, rows), key=lambda pair: (not np.isfinite(pair[0]), pair[0]))]
    where = f"average over {', '.join(semantic)}" if target == "average" else target
    title = f"summary · {where} ({CONVENTION_TAG[first['positive']]})"
    heads = ["detector", "strategy", "FPR95 modes", "FPR95 ens.", "AUROC modes", "AUROC ens.", "AUPR-Out modes",
             "AUPR-Out ens."]
    return Table("summary", title, CONVENTION[first["positive"]] + "; values in %, mean ± std over modes; sorted by "
                 "the ensemble's AUROC", pd.DataFrame(rows, columns=heads), 2, sections=False)


# --------------------------------------------------------------------------- rendering

def _blank_repeats(table: Table) -> tuple[list[list[str]], list[bool]]:
    """Cell rows with repeated first labels blanked, and whether each row ends a block."""
    cells = table.frame.astype(str).values.tolist()
    firsts = [r[0] for r in cells]
    ends = [i == len(cells) - 1 or firsts[i + 1] != firsts[i] for i in range(len(cells))]
    if table.labels > 1:
        cells = [[("" if i and firsts[i - 1] == r[0] else r[0]), *r[1:]] for i, r in enumerate(cells)]
    return cells, ends


def render_rich(table: Table):
    from rich import box
    from rich.table import Table as RichTable

    out = RichTable(title=table.title, caption=table.caption, box=box.SIMPLE_HEAD, title_justify="left",
                    caption_justify="left")
    for i, col in enumerate(table.frame.columns):
        out.add_column(str(col), justify="left" if i < table.labels else "right")
    cells, ends = _blank_repeats(table)
    for row, end in zip(_emphasised(table, cells, "[bold]{}[/]", escape_markup), ends):
        label = row[table.labels - 1]
        style = ("bold" if label.startswith("ensemble") else "italic" if label.startswith("mean")
                 else "dim" if label.startswith("k=") else None)
        out.add_row(*row, style=style, end_section=end and table.labels > 1 and table.sections)
    return out


def _emphasised(table: Table, cells: list[list[str]], pattern: str, escape=lambda c: c) -> list[list[str]]:
    """``cells`` escaped for the output format, with ``table.bold`` cells wrapped in ``pattern``."""
    where = {(i, list(table.frame.columns).index(col)) for i, col in table.bold}
    return [[pattern.format(escape(c)) if (i, j) in where else escape(c) for j, c in enumerate(row)]
            for i, row in enumerate(cells)]


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def render_markdown(table: Table) -> str:
    cells, _ = _blank_repeats(table)
    body = pd.DataFrame(_emphasised(table, cells, "**{}**"), columns=table.frame.columns).to_markdown(
        index=False, disable_numparse=True,  # the cells as formatted (tabulate would drop a gain's "+")
        colalign=["left"] * table.labels + ["right"] * (table.frame.shape[1] - table.labels))
    return f"**{table.title}**\n\n{body}\n\n_{table.caption}_\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "↓": r"$\downarrow$",
        "↑": r"$\uparrow$", "−": "$-$", "–": "--", "—": "---", "·": r"$\cdot$", "Δ": r"$\Delta$", "<": r"$<$",
        ">": r"$>$"}


def tex(text) -> str:
    """Escape text for LaTeX (special characters, and the symbols the tables use)."""
    return "".join(_TEX.get(c, c) for c in str(text))


def render_latex(table: Table) -> str:
    """A ``table`` float holding a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    cells, ends = _blank_repeats(table)
    spec = "l" * table.labels + "r" * (table.frame.shape[1] - table.labels)
    lines = [r"\begin{table}[htbp]", r"\centering", rf"\caption{{{tex(table.title)}. {tex(table.caption)}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex(c) for c in table.frame.columns) + r" \\", r"\midrule"]
    for i, (row, end) in enumerate(zip(_emphasised(table, cells, r"\textbf{{{}}}", tex), ends)):
        lines.append(" & ".join(row) + r" \\")
        if end and table.labels > 1 and i < len(cells) - 1:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_json(records: pd.DataFrame, stats_numbers: pd.DataFrame, boot: Optional[pd.DataFrame] = None) -> str:
    """``{"records": tidy records, "stats": ensemble-vs-modes numbers, "bootstrap": ...}`` (fractions; null for NaN)."""
    def rows(df):
        return json.loads(df.to_json(orient="records")) if df is not None else []

    return json.dumps({"records": rows(records), "stats": rows(stats_numbers), "bootstrap": rows(boot)}, indent=1)


# --------------------------------------------------------------------------- saved scores and exported views

def _id_file(folder: Path, benchmarks: list[str]) -> Optional[Path]:
    for b in benchmarks:
        if (folder / f"{safe_name(b)}.npy").is_file():
            return folder / f"{safe_name(b)}.npy"
    return None


def load_scores(scores_dir: Path, frame: pd.DataFrame, member: str = "ensemble", detectors: Optional[list[str]] = None,
                oods: Optional[list[str]] = None) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Saved per-sample scores (``eval --save-scores``): ``{"<detector>-<strategy>": (ID scores, {set: scores})}``
    for one member. OOD sets: the named ones, else every saved set that is not a covariate-shift set."""
    scores_dir = Path(scores_dir)
    if not scores_dir.is_dir():
        raise OodensError(f"--scores {scores_dir}: no such folder (expected the DIR of `oodens eval --save-scores "
                          "DIR`)")
    benchmarks = list(dict.fromkeys(frame["benchmark"]))
    shift = {safe_name(o) for o in frame.loc[frame["kind"] == "shift", "ood"]}
    wanted = [safe_name(o) for o in oods] if oods else None
    out = {}
    for run in sorted(p for p in scores_dir.iterdir() if p.is_dir()):
        if detectors and split_run(run.name, frame)[0] not in detectors:
            continue
        folder = run / member
        id_file = _id_file(folder, benchmarks)
        if id_file is None:
            continue
        names = [p.stem for p in sorted(folder.glob("*.npy")) if p != id_file]
        names = [n for n in names if (n in wanted if wanted else n not in shift)]
        if names:
            out[run.name] = (np.load(id_file, allow_pickle=False),
                             {n: np.load(folder / f"{n}.npy", allow_pickle=False) for n in names})
    if not out:
        raise OodensError(f"--scores {scores_dir}: no scores of member {member!r} for {', '.join(benchmarks)}; "
                          f"expected {scores_dir}/<detector>-<strategy>/{member}/<dataset>.npy from `oodens eval "
                          "--save-scores`")
    return out


def split_run(run: str, frame: pd.DataFrame) -> tuple[str, str]:
    """(detector, strategy) of a saved-scores folder ``<detector>-<strategy>``; both may hold hyphens
    (``mahalanobis-ml-mean-scores``): matched against the records, else against the registered detector names."""
    from oodens.detectors import DETECTORS

    pairs = {f"{d}-{s}": (d, s) for d, s in zip(frame["detector"], frame["strategy"])}
    if run in pairs:
        return pairs[run]
    known = [d for d in DETECTORS if run.startswith(d + "-")]
    det = max(known, key=len) if known else run.partition("-")[0]
    return det, run[len(det) + 1:]


def bootstrap_frame(scores: dict, frame: pd.DataFrame, metrics, n: int, member: str, alpha: float = 0.05,
                    seed: int = 0) -> pd.DataFrame:
    """Bootstrap CIs of each metric, per saved run and OOD set, for one member (convention from the records)."""
    rows = []
    for run, (id_s, by_set) in scores.items():
        det, strat = split_run(run, frame)
        pos = frame.loc[(frame["detector"] == det) & (frame["strategy"] == strat), "positive"]
        positive = pos.iloc[0] if len(pos) else "id"
        for name, ood_s in by_set.items():
            for m in metrics:
                value, low, high = stats.bootstrap_ci(id_s, ood_s, m, n=n, level=1 - alpha, seed=seed,
                                                      positive=positive)
                rows.append({"run": run, "member": member, "ood": name, "metric": m, "positive": positive,
                             "value": value, "ci_low": low, "ci_high": high, "n_boot": n, "seed": seed})
    return pd.DataFrame(rows)
