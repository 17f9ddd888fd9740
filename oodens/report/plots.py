"""Figures for ``oodens report --plot DIR`` (each saved as PNG and PDF).

Headless: figures are built with :class:`matplotlib.figure.Figure` and saved through the Agg
canvas, never through pyplot, so no display and no global backend switch is needed.

- :func:`strip_plot`: per OOD set, every mode's value per detector, with the ensemble marked.
- :func:`ensemble_size_plot`: metric against the number of modes k, ± std over k-of-N subsets.
- :func:`score_histograms`: ID against OOD score distributions of one detector and member.
- :func:`reliability_diagram`: accuracy against confidence per member and for the ensemble.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ENSEMBLE_STYLE = {"color": "tab:red", "marker": "*", "s": 140, "zorder": 3, "label": "ensemble"}


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``; return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    paths = [stem.with_name(stem.name + ext) for ext in (".png", ".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    return paths


def _panels(n: int, width: float = 4.0, height: float = 3.4):
    fig = Figure(figsize=(max(width * n, 4.5), height))
    return fig, fig.subplots(1, n, squeeze=False)[0]


def strip_plot(data: dict[str, dict[str, tuple[list[float], float | None]]], ylabel: str, title: str,
               stem: Path) -> list[Path]:
    """``data[ood][detector] = (modes' values, ensemble value or None)``, values in the unit shown.

    One panel per OOD set; each mode is a dot (spread sideways by a fixed offset so that equal
    values stay visible), the modes' mean a short black line, the ensemble a red star.
    """
    fig, axes = _panels(len(data), width=max(2.0, 0.9 * max(len(d) for d in data.values())) + 1.5)
    for ax, (ood, by_det) in zip(axes, data.items()):
        for x, (det, (values, ens)) in enumerate(by_det.items()):
            if len(values):
                offsets = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else np.zeros(1)
                ax.scatter(x + offsets, values, s=22, color="tab:blue", alpha=0.8, zorder=2,
                           label="modes" if x == 0 else None)
                ax.hlines(np.mean(values), x - 0.28, x + 0.28, color="black", lw=1.2, zorder=2,
                          label="mean of modes" if x == 0 else None)
            if ens is not None and np.isfinite(ens):
                ax.scatter([x], [ens], **{**ENSEMBLE_STYLE, "label": "ensemble" if x == 0 else None})
        ax.set_xticks(range(len(by_det)), list(by_det), rotation=45, ha="right")
        ax.set_title(ood)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return save(fig, stem)


def ensemble_size_plot(data: dict[str, dict[str, tuple[list[int], list[float], list[float]]]], ylabel: str,
                       title: str, stem: Path) -> list[Path]:
    """``data[ood][detector] = (ks, means, stds)``: one panel per OOD set, a line per detector with a
    ± std band over the k-of-N subsets."""
    fig, axes = _panels(len(data))
    for ax, (ood, by_det) in zip(axes, data.items()):
        for det, (ks, means, stds) in by_det.items():
            ks, means, stds = np.asarray(ks), np.asarray(means), np.asarray(stds)
            (line,) = ax.plot(ks, means, marker="o", label=det)
            ax.fill_between(ks, means - stds, means + stds, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("modes in the ensemble (k)")
        ax.set_xticks(sorted({int(k) for _, (ks, _, _) in by_det.items() for k in ks}))
        ax.set_title(ood)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return save(fig, stem)


def score_histograms(id_scores: np.ndarray, ood_scores: dict[str, np.ndarray], title: str,
                     stem: Path, bins: int = 50) -> list[Path]:
    """One panel per OOD set: density histograms of the ID and the OOD scores on shared bins
    (higher score = more in-distribution)."""
    fig, axes = _panels(len(ood_scores), height=3.0)
    for ax, (name, scores) in zip(axes, ood_scores.items()):
        both = np.r_[id_scores, scores]
        edges = np.linspace(both.min(), both.max(), bins + 1) if both.max() > both.min() else bins
        ax.hist(id_scores, bins=edges, density=True, alpha=0.5, color="tab:blue", label="ID test")
        ax.hist(scores, bins=edges, density=True, alpha=0.5, color="tab:orange", label=name)
        ax.set_xlabel("score (higher = more ID)")
        ax.set_title(name)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("density")
    fig.suptitle(title, fontsize="medium")
    return save(fig, stem)


def reliability_diagram(curves: dict[str, list[tuple[float, float, int]]], eces: dict[str, float], title: str,
                        stem: Path) -> list[Path]:
    """``curves[name]`` = oodens.metrics.calibration.reliability output (per bin: confidence, accuracy, count).

    Members are thin lines, ``"ensemble"`` a thick red line and bars; the diagonal is perfect calibration.
    """
    fig = Figure(figsize=(5.0, 4.6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for name, bins in curves.items():
        conf = np.array([b[0] for b in bins], dtype=float)
        acc = np.array([b[1] for b in bins], dtype=float)
        ok = np.isfinite(conf)
        label = f"{name} (ECE {100 * eces[name]:.1f}%)"
        if name == "ensemble":
            width = 1.0 / len(bins)
            centers = (np.arange(len(bins)) + 0.5) * width
            ax.bar(centers[ok], acc[ok], width=width, color="tab:red", alpha=0.15, edgecolor="tab:red")
            ax.plot(conf[ok], acc[ok], color="tab:red", lw=2.5, marker="o", label=label, zorder=3)
        else:
            ax.plot(conf[ok], acc[ok], lw=1, marker=".", alpha=0.7, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="x-small", loc="upper left")
    ax.grid(alpha=0.3)
    return save(fig, stem)
