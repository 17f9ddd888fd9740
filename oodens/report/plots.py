"""The drawing of ``oodens report --plot DIR`` (the data each figure shows is in :mod:`oodens.report.figures`).

Every figure is at most a page wide (:data:`PAGE_WIDTH` inches, saved at :data:`DPI`: PNG at most
2100 px wide) and is saved as PNG and vector PDF. Facets wrap into rows instead of growing sideways;
legends sit outside the data (below the panels, or in an empty facet slot); series use the Okabe–Ito
colour-blind-safe palette (:data:`PALETTE`) *and* distinct markers, so they stay apart in grey print too.

Headless: figures are built with :class:`matplotlib.figure.Figure` and saved through the Agg canvas,
never through pyplot, so no display and no global backend switch is needed.

- :func:`strip_plot`: one panel per OOD set, one row per detector: every mode's value, the modes' mean
  and the ensemble.
- :func:`ensemble_size_plot`: one panel per OOD set, a line per detector of one group: metric against
  the number of modes k, ± std over the k-of-N subsets.
- :func:`score_histograms`: one panel per OOD set: ID against OOD score distributions.
- :func:`reliability_diagram`: the ensemble's accuracy per confidence bin (bars, with bin counts), the
  modes' per-bin mean and range, the diagonal.

Each ``*_figure`` function returns the :class:`~matplotlib.figure.Figure` (for tests and notebooks);
the function without the suffix saves it and returns the written paths.
"""

from __future__ import annotations

import math
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

#: page (text) width in inches: no figure is wider
PAGE_WIDTH = 7.0
#: tallest figure in inches (a page less its margins); taller content is split into several figures
MAX_HEIGHT = 9.0
#: PNG resolution
DPI = 300
#: Okabe & Ito (2008) colour-blind-safe palette, ordered for lines on white (yellow last)
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: most series one ensemble-size figure draws (one colour and marker each)
MAX_SERIES = len(PALETTE)
MODES_COLOR, MEAN_COLOR, ENSEMBLE_COLOR = PALETTE[0], "#000000", PALETTE[1]
#: strip plots: inches per detector row, the OOD-set panels per facet row, their least width
ROW_HEIGHT = 0.2
STRIP_COLUMNS = 5
#: a facet row's axis, tick labels and panel title; the figure title and legend
_FACET_EXTRA, _HEADER = 0.62, 0.75
#: score histograms: a log density axis when the highest bin is this many times the upper quartile of the bins
SPIKE = 20
#: reliability diagram: a mode's bin enters the modes' per-bin mean and range only with this many samples
MIN_BIN_COUNT = 10

_RC = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6.5,
       "legend.fontsize": 6.5, "figure.titlesize": 7.5, "axes.linewidth": 0.6, "grid.linewidth": 0.4,
       "xtick.major.width": 0.6, "ytick.major.width": 0.6, "lines.linewidth": 1.2,
       "pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": DPI}


@contextmanager
def style():
    """The figures' matplotlib settings (small print sizes, TrueType fonts in the PDF), for this block only."""
    with matplotlib.rc_context(_RC):
        yield


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` (:data:`DPI`) and ``stem.pdf`` (vector) at the figure's own size; return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    paths = [stem.with_name(stem.name + ext) for ext in (".png", ".pdf")]
    with style():
        fig.savefig(paths[0], dpi=DPI)
        fig.savefig(paths[1], metadata={"CreationDate": None})  # same data, same bytes
    return paths


def _grid(n: int, ncols: int, panel_height: float, header: float = _HEADER, width: float = PAGE_WIDTH,
          sharey: bool = False):
    """A constrained-layout figure of ``n`` panels wrapped into rows of at most ``ncols``; the unused slots
    of the last row are returned separately (switched off) so a legend can use one."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width, header + nrows * panel_height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, list(axes[:n]), list(axes[n:])


def _legend(fig: Figure, handles, labels, spare: list, ncols: Optional[int] = None):
    """The legend in an empty facet slot when there is one, else below the panels; never over data."""
    if spare:
        spare[0].legend(handles, labels, loc="center", frameon=False)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols or len(labels), frameon=False)


def _suptitle(fig: Figure, title: str) -> None:
    """The figure title, each line wrapped to the figure's width."""
    size = matplotlib.rcParams["figure.titlesize"]
    size = size if isinstance(size, (int, float)) else 8.0
    chars = int(fig.get_figwidth() * 72 / (0.6 * size))
    fig.suptitle("\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in title.split("\n")))


def strip_rows(n_panels: int) -> int:
    """Most detector rows a strip plot of ``n_panels`` OOD sets holds within :data:`MAX_HEIGHT`."""
    facet_rows = math.ceil(n_panels / STRIP_COLUMNS)
    return max(1, int((MAX_HEIGHT - _HEADER - facet_rows * _FACET_EXTRA) / (facet_rows * ROW_HEIGHT)))


def strip_figure(data: dict[str, dict[str, tuple[list[float], float | None]]], xlabel: str, title: str,
                 separators: tuple[int, ...] = ()) -> Figure:
    """``data[ood][detector] = (modes' values, ensemble value or None)``, values in the unit shown.

    One panel per OOD set (wrapping after :data:`STRIP_COLUMNS`), one row per detector (shared across a
    facet row, labelled on its first panel): each mode a dot (spread vertically so equal values stay
    visible), the modes' mean a black bar, the ensemble a star. ``separators``: row indices before which a
    thin line marks a new detector group."""
    dets = list(dict.fromkeys(d for by in data.values() for d in by))
    ncols = min(STRIP_COLUMNS, len(data))
    fig, axes, _ = _grid(len(data), ncols, len(dets) * ROW_HEIGHT + _FACET_EXTRA, sharey=True)
    for i, (ax, (ood, by_det)) in enumerate(zip(axes, data.items())):
        for y, det in enumerate(dets):
            values, ens = by_det.get(det, ([], None))
            values = np.asarray(values, dtype=float)
            values = values[np.isfinite(values)]
            if len(values):
                offsets = np.linspace(-0.22, 0.22, len(values)) if len(values) > 1 else np.zeros(1)
                ax.scatter(values, y + offsets, s=7, color=MODES_COLOR, alpha=0.75, linewidths=0, zorder=2)
                ax.plot([values.mean()], [y], marker="|", ms=9, mew=1.3, color=MEAN_COLOR, ls="none", zorder=3)
            if ens is not None and np.isfinite(ens):
                ax.plot([ens], [y], marker="*", ms=6.5, mew=0.3, mec="white", color=ENSEMBLE_COLOR, ls="none",
                        zorder=4)
        for s in separators:
            ax.axhline(s - 0.5, color="0.6", lw=0.5)
        ax.set_ylim(len(dets) - 0.5, -0.5)
        ax.set_yticks(range(len(dets)), dets)
        ax.tick_params(axis="y", length=0, labelleft=i % ncols == 0)
        ax.set_title(ood)
        ax.grid(axis="x", alpha=0.4)
        ax.margins(x=0.08)
        ax.set_xlabel(xlabel)
    handles = [Line2D([], [], marker="o", ms=3.5, color=MODES_COLOR, ls="none", alpha=0.75),
               Line2D([], [], marker="|", ms=8, mew=1.3, color=MEAN_COLOR, ls="none"),
               Line2D([], [], marker="*", ms=7, color=ENSEMBLE_COLOR, ls="none")]
    labels = ["each mode", "mean of the modes", "ensemble"]
    if separators:
        handles.append(Line2D([], [], color="0.6", lw=0.5))
        labels.append("detector family boundary")
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    _suptitle(fig, title)
    return fig


def strip_plot(data, xlabel: str, title: str, stem: Path, separators: tuple[int, ...] = ()) -> list[Path]:
    with style():
        return save(strip_figure(data, xlabel, title, separators), stem)


def ensemble_size_figure(data: dict[str, dict[str, tuple[list[int], list[float], list[float]]]], ylabel: str,
                         title: str, bounds: Optional[tuple[float, float]] = None) -> Figure:
    """``data[ood][detector] = (ks, means, stds)``: one panel per OOD set (three per facet row), a line per
    detector (at most :data:`MAX_SERIES`, each its own colour and marker) with a ± std band over the k-of-N
    subsets (clipped to the metric's ``bounds``)."""
    dets = list(dict.fromkeys(d for by in data.values() for d in by))
    if len(dets) > MAX_SERIES:
        raise ValueError(f"{len(dets)} detectors in one ensemble-size figure; at most {MAX_SERIES}")
    fig, axes, spare = _grid(len(data), 3, 1.75)
    for ax, (ood, by_det) in zip(axes, data.items()):
        ks_all = set()
        for j, det in enumerate(dets):
            if det not in by_det:
                continue
            ks, means, stds = (np.asarray(v, dtype=float) for v in by_det[det])
            ks_all.update(int(k) for k in ks)
            ax.plot(ks, means, marker=MARKERS[j], ms=3.5, color=PALETTE[j], lw=1.1)
            ok = np.isfinite(stds)
            low, high = means - stds, means + stds
            if bounds is not None:
                low, high = np.clip(low, *bounds), np.clip(high, *bounds)
            ax.fill_between(ks[ok], low[ok], high[ok], color=PALETTE[j], alpha=0.15, lw=0)
        ax.set_xticks(sorted(ks_all))
        ax.set_xlabel("modes in the ensemble (k)")
        ax.set_ylabel(ylabel)
        ax.set_title(ood)
        ax.grid(alpha=0.4)
    handles = [Line2D([], [], marker=MARKERS[j], ms=3.5, color=PALETTE[j]) for j in range(len(dets))]
    _legend(fig, handles, [f"{d} (mean ± std over subsets)" if len(dets) == 1 else d for d in dets], spare,
            ncols=min(len(dets), 4))
    _suptitle(fig, title)
    return fig


def ensemble_size_plot(data, ylabel: str, title: str, stem: Path,
                       bounds: Optional[tuple[float, float]] = None) -> list[Path]:
    with style():
        return save(ensemble_size_figure(data, ylabel, title, bounds), stem)


def score_histogram_figure(id_scores: np.ndarray, ood_scores: dict[str, np.ndarray], title: str,
                           id_label: str = "ID test", bins: int = 50) -> Figure:
    """One panel per OOD set (three per facet row): density histograms of the ID and the OOD scores on shared
    bins (higher score = more in-distribution); log density axis when one spike would flatten the rest
    (:data:`SPIKE`)."""
    fig, axes, spare = _grid(len(ood_scores), 3, 1.65)
    id_scores = np.asarray(id_scores, dtype=float)
    id_scores = id_scores[np.isfinite(id_scores)]
    for ax, (name, scores) in zip(axes, ood_scores.items()):
        scores = np.asarray(scores, dtype=float)
        scores = scores[np.isfinite(scores)]
        both = np.r_[id_scores, scores]
        edges = np.linspace(both.min(), both.max(), bins + 1) if len(both) and both.max() > both.min() else bins
        heights = []
        for values, color in ((id_scores, MODES_COLOR), (scores, ENSEMBLE_COLOR)):
            ax.hist(values, bins=edges, density=True, color=color, alpha=0.3, lw=0)
            h, _, _ = ax.hist(values, bins=edges, density=True, color=color, histtype="step", lw=0.9)
            heights.append(h)
        h = np.concatenate(heights)
        h = h[h > 0]
        spiky = len(h) and h.max() > SPIKE * np.percentile(h, 75)  # a spike would flatten the rest: log density
        if spiky:
            ax.set_yscale("log")
        ax.set_xlabel("score (higher = more ID)")
        ax.set_ylabel("density (log scale)" if spiky else "density")
        ax.set_title(name)
        ax.grid(alpha=0.4)
    handles = [Patch(facecolor=c, edgecolor=c, alpha=0.5) for c in (MODES_COLOR, ENSEMBLE_COLOR)]
    _legend(fig, handles, [id_label, "OOD set (panel title)"], spare, ncols=2)
    _suptitle(fig, title)
    return fig


def score_histograms(id_scores, ood_scores, title: str, stem: Path, id_label: str = "ID test",
                     bins: int = 50) -> list[Path]:
    with style():
        return save(score_histogram_figure(id_scores, ood_scores, title, id_label, bins), stem)


def reliability_figure(ensemble: list[tuple[float, float, int]], modes: dict[str, list[tuple[float, float, int]]],
                       ece: float, mode_eces: dict[str, float], title: str) -> Figure:
    """``ensemble`` and ``modes[name]``: oodens.metrics.calibration.reliability output (per equal-width bin:
    mean confidence, accuracy, count).

    Bars: the ensemble's accuracy per confidence bin (spanning the bin), its sample count printed above;
    empty bins have no bar. The modes, one panel for any number of them: per bin, the mean (dot) and
    min–max (whisker) of the accuracies of the modes with at least :data:`MIN_BIN_COUNT` samples there.
    The dashed diagonal is perfect calibration. ECEs in the legend."""
    n_bins = len(ensemble)
    width = 1.0 / n_bins
    fig = Figure(figsize=(3.4, 3.7), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=0.8, zorder=1)
    left = np.arange(n_bins) * width
    acc = np.array([b[1] for b in ensemble], dtype=float)
    count = np.array([b[2] for b in ensemble], dtype=int)
    full = count > 0
    bars = ax.bar(left[full], acc[full], width=width, align="edge", color=MODES_COLOR, alpha=0.55,
                  edgecolor=MODES_COLOR, lw=0.6, zorder=2, label="ensemble")
    for patch in bars:
        patch.set_gid("ensemble-bar")
    top = acc.copy()
    if modes:
        accs = np.array([[b[1] if b[2] >= MIN_BIN_COUNT else np.nan for b in bins] for bins in modes.values()])
        have = np.isfinite(accs).any(axis=0)
        with np.errstate(all="ignore"):
            lo, hi, mean = np.nanmin(accs[:, have], 0), np.nanmax(accs[:, have], 0), np.nanmean(accs[:, have], 0)
        centers = left[have] + width / 2
        ax.errorbar(centers, mean, yerr=[mean - lo, hi - mean], fmt="o", ms=2.5, color=ENSEMBLE_COLOR, lw=0.8,
                    capsize=1.5, zorder=3, gid="modes")
        top[have] = np.fmax(top[have], hi)
    for b in np.flatnonzero(full):
        ax.text(left[b] + width / 2, top[b] + 0.02, f"{count[b]}", rotation=90, ha="center", va="bottom",
                fontsize=5, color="0.25", gid="bin-count")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.25)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlabel(f"confidence (max softmax), {n_bins} equal-width bins")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.4)
    e = np.array(list(mode_eces.values()), dtype=float)
    handles = [Patch(facecolor=MODES_COLOR, alpha=0.55, edgecolor=MODES_COLOR),
               Line2D([], [], marker="$n$", ms=4.5, color="0.25", ls="none"),
               Line2D([], [], color="0.45", ls="--", lw=0.8)]
    labels = [f"ensemble: accuracy per bin (ECE {100 * ece:.2f}%)", "samples in the bin (ensemble)",
              "perfect calibration"]
    if modes:
        handles.insert(1, ax.containers[-1])
        labels.insert(1, f"{len(modes)} modes: mean, min–max (ECE {100 * e.mean():.2f}"
                         + (f" ± {100 * e.std(ddof=1):.2f}%)" if len(e) > 1 else "%)"))
    fig.legend(handles, labels, loc="outside lower center", ncols=1, frameon=False)
    _suptitle(fig, title)
    return fig


def reliability_diagram(ensemble, modes, ece: float, mode_eces: dict[str, float], title: str,
                        stem: Path) -> list[Path]:
    with style():
        return save(reliability_figure(ensemble, modes, ece, mode_eces, title), stem)
