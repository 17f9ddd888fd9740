"""Statistics over modes for ``oodens report``.

- :func:`t_interval`: the t-interval of the mean of the modes' values.
- :func:`ensemble_test`: does the ensemble beat the modes? A one-sided one-sample t-test of the
  modes' values against the ensemble's value (H1: the modes' mean is worse than the ensemble).
- :func:`holm`: Holm's step-down correction (statsmodels) over a family of such tests.
- :func:`mode_stats`: all of the above, plus spread (std, min, max), for every detector x OOD set.
- :func:`bootstrap_ci`: a seeded percentile bootstrap CI over samples for one member's metric,
  from its per-sample scores (ID and OOD resampled separately).

Values are fractions, as in the records. "Better" is lower for FPR95, detection error, NLL, Brier
and ECE, higher for everything else.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import average_precision_score
from statsmodels.stats.multitest import multipletests

from oodens.metrics import detection_error, fpr_at_95_tpr

LOWER_IS_BETTER = frozenset({"fpr95", "detection_error", "id_nll", "id_brier", "id_ece"})


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Two-sided t-interval of the mean: mean ± t_{(1+level)/2, n-1} · s / sqrt(n) (s: sample std).

    NaN for fewer than two values; a zero-width interval when all values are equal.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))
    if se == 0:
        return mean, mean
    low, high = stats.t.interval(level, len(x) - 1, loc=mean, scale=se)
    return float(low), float(high)


def ensemble_test(values, ensemble: float, metric: str) -> tuple[float, float]:
    """One-sided one-sample t-test of the modes' ``values`` against the ensemble's value.

    H1: the ensemble is better than the modes' mean (modes' mean > ensemble for lower-is-better
    metrics, < for the rest). Returns (t, p). With no spread over modes the test degenerates:
    p = 0 when every mode is worse than the ensemble, else 1. NaN for fewer than two modes.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    alternative = "greater" if lower_is_better(metric) else "less"
    if np.all(x == x[0]):
        worse = x[0] > ensemble if alternative == "greater" else x[0] < ensemble
        t = math.copysign(math.inf, x[0] - ensemble) if x[0] != ensemble else math.nan
        return t, 0.0 if worse else 1.0
    res = stats.ttest_1samp(x, ensemble, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values over one family of tests; NaN entries stay NaN and are not counted."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def mode_stats(frame: pd.DataFrame, metric: str, level: float = 0.95, alpha: float = 0.05) -> pd.DataFrame:
    """Per detector setting x OOD set in ``frame`` (records of ONE mode set, benchmark and convention):
    the modes' mean, t-interval, std, min, max; the ensemble's value; the one-sided test of the ensemble
    against the modes, Holm-corrected over every row (detectors x OOD sets) of the result.

    ``frame`` is oodens.report's records frame: one row per record with columns ``setting`` (detector,
    strategy, parameters), ``role`` (``"mode"`` and ``"ensemble"`` rows are used), ``ood`` and the metric.
    Settings with fewer than two modes (nothing to test) or without an ensemble row are left out.
    """
    rows = []
    modes = frame[frame["role"] == "mode"]
    ensemble = frame[frame["role"] == "ensemble"]
    for (setting, ood), ens in ensemble.groupby(["setting", "ood"], sort=False):
        values = modes.loc[(modes["setting"] == setting) & (modes["ood"] == ood), metric].dropna().to_numpy()
        ens_value = float(ens[metric].iloc[0])
        if len(values) < 2 or not np.isfinite(ens_value):
            continue  # ensemble-only detectors and single modes: nothing to compare
        low, high = t_interval(values, level)
        t, p = ensemble_test(values, ens_value, metric)
        rows.append({"setting": setting, "detector": ens["detector"].iloc[0], "strategy": ens["strategy"].iloc[0],
                     "ood": ood, "metric": metric, "n_modes": len(values), "mean": float(values.mean()),
                     "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "min": float(values.min()),
                     "max": float(values.max()), "ci_low": low, "ci_high": high, "ensemble": ens_value,
                     "t": t, "p": p})
    out = pd.DataFrame(rows, columns=["setting", "detector", "strategy", "ood", "metric", "n_modes", "mean", "std",
                                      "min", "max", "ci_low", "ci_high", "ensemble", "t", "p"])
    out["p_holm"] = holm(out["p"].to_numpy()) if len(out) else []
    out["ensemble_better"] = out["p_holm"] < alpha
    return out


def auroc(id_scores, ood_scores) -> float:
    """AUROC (ID positive) as the Mann-Whitney statistic on mid-ranks: P(ID > OOD) + P(tie) / 2, the same
    number as sklearn's roc_auc_score, and fast enough to repeat for every bootstrap resample."""
    i, o = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    ranks = stats.rankdata(np.r_[i, o])
    return float((ranks[: len(i)].sum() - len(i) * (len(i) + 1) / 2) / (len(i) * len(o)))


def metric_function(metric: str, positive: str = "id"):
    """``f(id_scores, ood_scores) -> float`` for one OOD metric (same definitions as oodens.metrics)."""
    def labels(i, o):
        return np.r_[np.ones(len(i)), np.zeros(len(o))], np.r_[i, o]

    if metric == "fpr95":
        return (lambda i, o: fpr_at_95_tpr(i, o)) if positive == "id" else (lambda i, o: fpr_at_95_tpr(-o, -i))
    if metric == "auroc":
        return auroc
    if metric == "aupr_in":
        return lambda i, o: float(average_precision_score(*labels(i, o)))
    if metric == "aupr_out":
        return lambda i, o: float(average_precision_score(1 - labels(i, o)[0], -labels(i, o)[1]))
    if metric == "detection_error":
        return detection_error
    raise ValueError(f"no per-sample metric {metric!r}")


def bootstrap_ci(id_scores, ood_scores, metric: str, n: int = 1000, level: float = 0.95, seed: int = 0,
                 positive: str = "id") -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap interval of ``metric`` over ``n`` resamples,
    ID and OOD scores each resampled with replacement to their own size (seeded, reproducible)."""
    f = metric_function(metric, positive)
    id_s = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_s = np.asarray(ood_scores, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    draws = np.array([f(id_s[rng.integers(0, len(id_s), len(id_s))], ood_s[rng.integers(0, len(ood_s), len(ood_s))])
                      for _ in range(n)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return f(id_s, ood_s), float(low), float(high)
