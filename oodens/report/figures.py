"""Figures for ``oodens report --plot DIR``: the data each figure shows, taken from the records (strip plots,
ensemble-size curves), saved scores (histograms) or exported views (reliability diagram); the drawing is in
:mod:`oodens.report.plots`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from oodens.errors import OodensError
from oodens.metrics import calibration as cal
from oodens.report.tables import LABELS, _setting_order, arrow, families, ood_columns, setting_labels
from oodens.runtime.paths import safe_name


def view_probs(views_dir: Path, benchmarks: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Softmax probabilities of each exported mode on the ID test split, plus ``"ensemble"`` (the mean of
    the members' softmax), and the labels: from ``DIR/<mode>/<dataset>/test/{logits,labels}.npy``."""
    views_dir = Path(views_dir)
    found: dict[str, np.ndarray] = {}
    labels = None
    for mode in sorted(p for p in views_dir.iterdir() if p.is_dir()) if views_dir.is_dir() else []:
        for b in benchmarks:
            split = mode / safe_name(b) / "test"
            if (split / "logits.npy").is_file() and (split / "labels.npy").is_file():
                y = np.load(split / "labels.npy", allow_pickle=False)
                if labels is not None and not np.array_equal(y, labels):
                    raise OodensError(f"--views {views_dir}: {split}/labels.npy differs from the other modes' labels "
                                      "(expected one export of one mode set)")
                labels = y
                found[mode.name] = cal.probs(np.load(split / "logits.npy", allow_pickle=False))
                break
    if not found:
        raise OodensError(f"--views {views_dir}: no exported ID test logits; expected {views_dir}/<mode>/"
                          f"{safe_name(benchmarks[0])}/test/logits.npy and labels.npy from `oodens extract --export`")
    found["ensemble"] = np.mean(list(found.values()), axis=0)
    return found, labels


def _slug(info: dict, seen: set) -> str:
    slug = safe_name(f"{info['benchmark']}-{Path(info['modes']).name}" + ("-oodpos" if info.get("positive") == "ood"
                                                                         else ""))
    base, i = slug, 2
    while slug in seen:
        slug, i = f"{base}-{i}", i + 1
    seen.add(slug)
    return slug


def write_plots(out: Path, frame: pd.DataFrame, metrics, oods: Optional[list[str]] = None,
                scores: Optional[dict] = None, member: str = "ensemble",
                views: Optional[tuple[dict, np.ndarray]] = None) -> list[Path]:
    """Strip plots and ensemble-size curves from the records; score histograms from saved scores; the
    reliability diagram from exported views. Returns the written files."""
    from oodens.report import plots

    out = Path(out)
    written, seen = [], set()
    for title, info, sub in families(frame):
        slug = _slug(info, seen)
        cols = ood_columns(sub, oods)
        labels = setting_labels(sub)
        settings = _setting_order(sub)
        unit = "%"
        for m in metrics:
            data = {}
            for o in cols:
                data[o] = {}
                for s in settings:
                    block = sub[(sub["setting"] == s) & (sub["ood"] == o)]
                    values = 100 * block.loc[block["role"] == "member", m].dropna().to_numpy()
                    ens = block.loc[block["role"] == "ensemble", m]
                    data[o][labels[s]] = (values, 100 * float(ens.iloc[0]) if len(ens) else None)
            if cols:
                written += plots.strip_plot(data, f"{LABELS[m]} {arrow(m)} ({unit})", f"{LABELS[m]} · {title}",
                                            out / f"{slug}-strip-{m}")
            subsets = sub[sub["role"] == "subsets"]
            if not subsets.empty and cols:
                curves = {}
                for o in cols:
                    curves[o] = {}
                    for s in _setting_order(subsets):
                        block = subsets[(subsets["setting"] == s) & (subsets["ood"] == o)].sort_values("k")
                        mean, std = block[block["stat"] == "mean"], block[block["stat"] == "std"]
                        curves[o][labels[s]] = (mean["k"].astype(int).tolist(), 100 * mean[m].to_numpy(),
                                                100 * std[m].to_numpy())
                written += plots.ensemble_size_plot(curves, f"{LABELS[m]} {arrow(m)} ({unit})",
                                                    f"{LABELS[m]} vs ensemble size · {title}",
                                                    out / f"{slug}-size-{m}")
    for run, (id_s, by_set) in (scores or {}).items():
        written += plots.score_histograms(id_s, by_set, f"{run} · {member}: ID test vs OOD scores",
                                          out / f"scores-{run}-{safe_name(member)}")
    if views is not None:
        probs, labels = views
        curves = {name: cal.reliability(p, labels) for name, p in probs.items()}
        eces = {name: cal.ece(p, labels) for name, p in probs.items()}
        bench = frame["benchmark"].iloc[0]
        written += plots.reliability_diagram(curves, eces, f"Reliability on the {bench} ID test set",
                                             out / f"reliability-{safe_name(bench)}")
    return written
