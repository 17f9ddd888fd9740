"""Figures for ``oodens report --plot DIR``: the data each figure shows, taken from the records (strip plots,
ensemble-size curves), saved scores (histograms) or exported views (reliability diagram); the drawing is in
:mod:`oodens.report.plots`.

File names come from the content only, never from the order the runs were stored in:
``<benchmark>-<mode set>-<detector group>-<kind>-<metric>-<convention>`` (``.png`` and ``.pdf``), e.g.
``digits-shipped-all-strip-fpr95-idpos``:

- mode set: :func:`mode_slugs` (``shipped``, else the last two folders of its path, longer where two mode sets
  of the results would share a name);
- detector group: ``all`` when one strip plot holds every detector, else the detectors' family
  (``oodens.detectors.DETECTORS[name].family``; ``logit_2`` for the second part of a family too big for one
  figure); ensemble-size figures are always one per family (one colour and marker per detector);
- kind: ``strip``, ``size``; convention: ``idpos`` (ID positive, the papers') or ``oodpos`` (OpenOOD).

Score histograms: ``<benchmark>-<mode set>-<detector>-<strategy>-scores-<member>``; the reliability diagram:
``<benchmark>-<mode set>-reliability``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from oodens.errors import OodensError
from oodens.metrics import calibration as cal
from oodens.metrics.ood import METRICS
from oodens.report.tables import (CONVENTION, LABELS, _setting_order, arrow, families, ood_columns, setting_labels,
                                  set_arch, split_run)
from oodens.runtime.paths import mode_set_name, safe_name

#: the metric convention in file names
CONVENTION_SLUG = {"id": "idpos", "ood": "oodpos"}


class ViewProbs(tuple):
    """``(probs, labels)`` as :func:`view_probs` returns them, with the ``benchmark`` they were read for."""

    def __new__(cls, probs: dict, labels: np.ndarray, benchmark: str):
        out = super().__new__(cls, (probs, labels))
        out.benchmark = benchmark
        return out


def view_probs(views_dir: Path, benchmarks: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Softmax probabilities of each exported mode on the ID test split, plus ``"ensemble"`` (the mean of
    the members' softmax), and the labels: from ``DIR/<mode>/<dataset>/test/{logits,labels}.npy``."""
    views_dir = Path(views_dir)
    found: dict[str, np.ndarray] = {}
    labels = bench = None
    for mode in sorted(p for p in views_dir.iterdir() if p.is_dir()) if views_dir.is_dir() else []:
        for b in benchmarks:
            split = mode / safe_name(b) / "test"
            if (split / "logits.npy").is_file() and (split / "labels.npy").is_file():
                y = np.load(split / "labels.npy", allow_pickle=False)
                if labels is not None and not np.array_equal(y, labels):
                    raise OodensError(f"--views {views_dir}: {split}/labels.npy differs from the other modes' labels "
                                      "(expected one export of one mode set)")
                labels, bench = y, b
                found[mode.name] = cal.probs(np.load(split / "logits.npy", allow_pickle=False))
                break
    if not found:
        raise OodensError(f"--views {views_dir}: no exported ID test logits; expected {views_dir}/<mode>/"
                          f"{safe_name(benchmarks[0])}/test/logits.npy and labels.npy from `oodens extract --export`")
    found["ensemble"] = np.mean(list(found.values()), axis=0)
    return ViewProbs(found, labels, bench)


# --------------------------------------------------------------------------- names and titles

def slug(text: str) -> str:
    """One file-name field: letters, digits, ``.+_`` kept; any other run of characters (``/``, spaces,
    ``-``, the field separator) becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9.+]+", "_", str(text)).strip("_.") or "_"


def mode_slugs(modes) -> dict[str, str]:
    """File-name field of each mode set (paths as stored): ``shipped`` for the shipped modes, else the last two
    folders of :func:`~oodens.runtime.paths.mode_set_name` (``save/ImageNet/DN121`` -> ``ImageNet_DN121``).
    Mode sets that would share a field get their whole name (``save_ImageNet_DN121``), then, if still equal,
    a hash of the resolved path: two folders never share one (a superseded mode set of the same folder, shown by
    ``--all-runs``, adds ``superseded_<modeset>`` to its names). Depends on the set of mode sets, not their order."""
    names = {m: mode_set_name(m) for m in sorted(set(modes))}
    short = {m: n if n == "shipped" else slug("_".join(Path(n).parts[-2:])) for m, n in names.items()}
    out = {}
    for m in names:
        same = [o for o in names if short[o] == short[m]]
        if len(same) == 1:
            out[m] = short[m]
            continue
        long = {o: slug(names[o]) for o in same}
        if list(long.values()).count(long[m]) == 1:
            out[m] = long[m]
        else:
            digest = hashlib.sha256(str(Path(m).expanduser().resolve()).encode()).hexdigest()[:6]
            out[m] = f"{long[m]}_{digest}"
    return out


def stem(*fields: str) -> str:
    return "-".join(fields)


def mode_set_header(info: dict, sub: pd.DataFrame) -> str:
    """``digits · mode set shipped (5 modes of cnn)``: never an absolute install path."""
    n = int(sub["n_members"].max())
    arch = set_arch(sub) if "arch" in sub and len(sub) else ""
    of = f" of {arch}" if arch else ""
    return f"{info['benchmark']} · mode set {mode_set_name(info['modes'])} ({n} mode{'s' if n != 1 else ''}{of})"


def metric_title(metric: str, positive: str) -> str:
    """``FPR95 ↓ (lower is better) · ID positive: FPR95 = % of OOD accepted when 95% of ID is kept``; for other
    metrics the convention's name only."""
    better = "higher" if METRICS[metric].higher_is_better else "lower"
    conv = CONVENTION[positive] if metric == "fpr95" else CONVENTION[positive].split(":")[0]
    return f"{LABELS[metric]} {arrow(metric)} ({better} is better) · {conv}"


def _family(detector: str) -> str:
    from oodens.detectors import DETECTORS

    cls = DETECTORS.get(detector)
    return slug(getattr(cls, "family", None) or "other")


def detector_groups(settings: list[str], detector: dict[str, str], most: int,
                    whole: bool = True) -> list[tuple[str, list[str]]]:
    """``[(group, settings)]``: all settings as group ``all`` when ``whole`` and they are at most ``most``;
    else one group per detector family (in the given order), a family of more than ``most`` settings split into
    ``family_1``, ``family_2``, ..."""
    if whole and len(settings) <= most:
        return [("all", list(settings))]
    by_family: dict[str, list[str]] = {}
    for s in settings:
        by_family.setdefault(_family(detector[s]), []).append(s)
    out = []
    for fam, members in by_family.items():
        parts = [members[i:i + most] for i in range(0, len(members), most)]
        out += [(fam if len(parts) == 1 else f"{fam}_{i + 1}", p) for i, p in enumerate(parts)]
    return out


def _unit(metric: str) -> str:
    return "" if not METRICS[metric].percent else " (%)"


def _scale(metric: str) -> float:
    return 100.0 if METRICS[metric].percent else 1.0


# --------------------------------------------------------------------------- the figures

def write_plots(out: Path, frame: pd.DataFrame, metrics, oods: Optional[list[str]] = None,
                scores: Optional[dict] = None, member: str = "ensemble",
                views: Optional[tuple[dict, np.ndarray]] = None) -> list[Path]:
    """Strip plots and ensemble-size curves from the records (per mode set, benchmark, convention, metric and
    detector group); score histograms from saved scores; the reliability diagram from exported views.
    Returns the written files, sorted."""
    from oodens.report import plots

    out = Path(out)
    written: list[Path] = []
    modes_field = mode_slugs(frame["modes"]) if len(frame) else {}
    for _, info, sub in families(frame):
        cols = ood_columns(sub, oods)
        if not cols:
            continue
        labels = setting_labels(sub)
        settings = _setting_order(sub)
        detector = dict(zip(sub["setting"], sub["detector"]))
        header = mode_set_header(info, sub)
        base = (slug(info["benchmark"]), modes_field[info["modes"]])
        if sub["superseded"].any():  # --all-runs: a folder's older mode set must not overwrite its current one
            base += (f"superseded_{info['modeset'][:8]}",)
        conv = CONVENTION_SLUG.get(info["positive"], slug(info["positive"]))
        subsets = sub[sub["role"] == "subsets"]
        strip_groups = detector_groups(settings, detector, plots.strip_rows(len(cols)))
        size_groups = detector_groups(_setting_order(subsets), detector, plots.MAX_SERIES, whole=False) \
            if not subsets.empty else []
        for m in metrics:
            scale, axis = _scale(m), f"{LABELS[m]}{_unit(m)}"
            for group, members in strip_groups:
                data = {}
                for o in cols:
                    data[o] = {}
                    for s in members:
                        block = sub[(sub["setting"] == s) & (sub["ood"] == o)]
                        values = scale * block.loc[block["role"] == "member", m].dropna().to_numpy()
                        ens = block.loc[block["role"] == "ensemble", m]
                        data[o][labels[s]] = (values, scale * float(ens.iloc[0]) if len(ens) else None)
                fams = [_family(detector[s]) for s in members]
                separators = tuple(i for i in range(1, len(fams)) if fams[i] != fams[i - 1])
                n = len(members)
                what = f"{n} detector{'s' if n != 1 else ''}" + ("" if group == "all" else f" of the {group} family")
                title = f"{metric_title(m, info['positive'])}\n{header} · {what}: each mode vs the ensemble"
                written += plots.strip_plot(data, axis, title, out / stem(*base, group, "strip", m, conv),
                                            separators)
            for group, members in size_groups:
                curves = {}
                for o in cols:
                    curves[o] = {}
                    for s in members:
                        block = subsets[(subsets["setting"] == s) & (subsets["ood"] == o)].sort_values("k")
                        mean, std = block[block["stat"] == "mean"], block[block["stat"] == "std"]
                        if not mean.empty:
                            std = std.set_index("k")[m].reindex(mean["k"]).to_numpy()
                            curves[o][labels[s]] = (mean["k"].astype(int).tolist(), scale * mean[m].to_numpy(),
                                                    scale * std)
                title = (f"{metric_title(m, info['positive'])}\n{header} · {len(members)} detectors of the "
                         f"{group} family · mean ± std over k-of-N subsets")
                bounds = (0.0, scale) if METRICS[m].percent else None  # NLL and Brier have no upper bound
                written += plots.ensemble_size_plot(curves, axis, title, out / stem(*base, group, "size", m, conv),
                                                    bounds)
    for run, (id_s, by_set) in sorted((scores or {}).items()):
        det, strategy = split_run(run, frame)  # names may hold "-"
        rows = frame[(frame["detector"] == det) & (frame["strategy"] == strategy)]
        pairs = rows.drop_duplicates(["benchmark", "modes"])
        if len(pairs) == 1:
            info = pairs.iloc[0].to_dict()
            where = mode_set_header(info, rows)
            base = (slug(info["benchmark"]), modes_field[info["modes"]])
        else:
            where, base = "", ()
        title = (f"{det} · {strategy} scores of the {member}: ID test vs each OOD set (higher score = more ID; "
                 f"no convention)" + (f"\n{where}" if where else ""))
        written += plots.score_histograms(id_s, by_set, title,
                                          out / stem(*base, slug(det), slug(strategy), "scores", slug(member)))
    if views is not None:
        written += _reliability(out, frame, views, modes_field)
    return sorted(written)


def _reliability(out: Path, frame: pd.DataFrame, views, modes_field: dict) -> list[Path]:
    """The ensemble's bars and the modes' per-bin spread; the mode set is the one in the records whose modes
    include every exported one (named only when that is a single mode set)."""
    from oodens.report import plots

    probs, labels = views
    bench = getattr(views, "benchmark", None) or sorted(set(frame["benchmark"]))[0]
    names = {k for k in probs if k != "ensemble"}
    members = frame[(frame["benchmark"] == bench) & (frame["role"] == "member")]
    hits = sorted(m for m, block in members.groupby("modes") if names <= set(block["member"]))
    modes = {k: cal.reliability(p, labels) for k, p in sorted(probs.items()) if k != "ensemble"}
    eces = {k: cal.ece(p, labels) for k, p in sorted(probs.items()) if k != "ensemble"}
    if len(hits) == 1:
        sub = frame[(frame["benchmark"] == bench) & (frame["modes"] == hits[0])]
        where = mode_set_header({"benchmark": bench, "modes": hits[0]}, sub.assign(n_members=len(names)))
        base = (slug(bench), modes_field[hits[0]])
    else:
        where, base = f"{bench} · {len(names)} modes", (slug(bench),)
    title = f"Reliability on the ID test set: the ensemble (mean of softmaxes) and its modes\n{where}"
    return plots.reliability_diagram(cal.reliability(probs["ensemble"], labels), modes,
                                     cal.ece(probs["ensemble"], labels), eces, title, out / stem(*base, "reliability"))
