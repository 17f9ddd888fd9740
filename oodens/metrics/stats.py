"""Statistics over modes for ``oodens report``.

- :func:`t_interval`: the t-interval of the mean of the modes' values; for metrics bounded in [0, 1]
  (``METRICS[m].percent``) on the logit scale, back-transformed, so that it stays inside [0, 1].
- :func:`ensemble_test`: does the ensemble beat the modes? A one-sided one-sample t-test of the
  modes' values against the ensemble's value (H1: the modes' mean is worse than the ensemble).
- :func:`holm`: Holm's step-down correction (statsmodels) over a family of such tests.
- :func:`mode_stats`: all of the above, plus spread (std, min, max), for every detector x OOD set; the Holm
  family is the independent (detector setting, OOD set) cells only: rows that average other rows (kind
  ``"average"``: near/far/average; ``"shift-average"``: C-s) are descriptive (uncorrected p, no p_holm).
- :func:`beat_probability`: the probability that the ensemble beats a mode drawn at random (the share of
  modes worse than the ensemble, ties counting half), from the per-mode values;
- :func:`ensemble_gain`: the ensemble's gain over the modes' mean (positive = better), with a paired
  t-interval over the independent OOD sets (each set pairs the ensemble's value with the modes' mean);
- :func:`bootstrap_ci`: a seeded percentile bootstrap CI over samples for one member's metric,
  from its per-sample scores (ID and OOD resampled separately).

Values are fractions, as in the records. Which way is "better", and how a metric is computed from
scores, come from the registry ``oodens.metrics.ood.METRICS``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from oodens.metrics.ood import METRICS, OOD_METRICS


LOGIT_EPS = 1e-4  # bounded metrics' values are clipped to [eps, 1 - eps] before the logit
DERIVED_KINDS = ("average", "shift-average")  # rows averaging other rows: not independent tests


def bounded(metric: str) -> bool:
    """Whether the metric lies in [0, 1]: every metric shown in % (OOD metrics, accuracy, ECE); not NLL or Brier."""
    return METRICS[metric].percent


def t_interval(values, level: float = 0.95, logit: bool = False) -> tuple[float, float]:
    """Two-sided t-interval of the mean: mean ± t_{(1+level)/2, n-1} · s / sqrt(n) (s: sample std).

    ``logit=True`` (values in [0, 1]): the same interval for the mean of logit(clip(values, eps, 1 - eps)),
    eps = :data:`LOGIT_EPS`, mapped back with the logistic function, so it stays inside [0, 1].
    NaN for fewer than two values; a zero-width interval when all values are equal.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    if logit:
        from scipy.special import expit, logit as to_logit

        low, high = t_interval(to_logit(np.clip(x, LOGIT_EPS, 1 - LOGIT_EPS)), level)
        return float(expit(low)), float(expit(high))
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
    alternative = "less" if METRICS[metric].higher_is_better else "greater"
    if np.all(x == x[0]):
        worse = x[0] > ensemble if alternative == "greater" else x[0] < ensemble
        t = math.copysign(math.inf, x[0] - ensemble) if x[0] != ensemble else math.nan
        return t, 0.0 if worse else 1.0
    res = stats.ttest_1samp(x, ensemble, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def beat_probability(values, ensemble: float, metric: str) -> float:
    """P(ensemble better than a mode drawn uniformly from ``values``): the share of modes whose value is worse
    than the ensemble's, a tie counting half. NaN without modes."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0 or not np.isfinite(ensemble):
        return math.nan
    worse = x < ensemble if METRICS[metric].higher_is_better else x > ensemble
    return float((np.count_nonzero(worse) + 0.5 * np.count_nonzero(x == ensemble)) / len(x))


def gain(mean: float, ensemble: float, metric: str) -> float:
    """The ensemble's improvement over the modes' mean in the metric's better direction (positive = better)."""
    return (ensemble - mean) if METRICS[metric].higher_is_better else (mean - ensemble)


def ensemble_gain(cells: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per detector setting: the mean gain of the ensemble over the modes' mean across the independent OOD sets
    that every setting of ``cells`` has (:func:`mode_stats` rows with ``in_family`` and a semantic kind: near, far, semantic), its
    paired t-interval over those sets (NaN for one set) and the mean over sets of :func:`beat_probability`."""
    rows = []
    sets = cells[cells["in_family"] & cells["kind"].isin(("near", "far", "semantic"))]
    if len(sets):  # the sets every setting has: each row's gain averages the same sets (--ood may have changed)
        common = set.intersection(*sets.groupby("setting")["ood"].agg(set))
        sets = sets[sets["ood"].isin(common)]
    for setting, part in sets.groupby("setting", sort=False):
        g = np.array([gain(r.mean, r.ensemble, r.metric) for r in part.itertuples()])
        low, high = t_interval(g, level)
        rows.append({"setting": setting, "detector": part["detector"].iloc[0], "strategy": part["strategy"].iloc[0],
                     "metric": part["metric"].iloc[0], "n_sets": len(g), "oods": list(part["ood"]),
                     "gain": float(g.mean()), "gain_low": low, "gain_high": high,
                     "p_beat": float(part["p_beat"].mean())})
    return pd.DataFrame(rows, columns=["setting", "detector", "strategy", "metric", "n_sets", "oods", "gain",
                                       "gain_low", "gain_high", "p_beat"])


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
    against the modes; ``p_beat``: :func:`beat_probability`. The t-interval is on the logit scale for metrics bounded in [0, 1] (:func:`bounded`).
    Holm's correction runs over the independent cells only: rows whose ``kind`` is an OOD set (near, far,
    semantic, shift); rows averaging others (kind ``"average"`` or ``"shift-average"``) keep their uncorrected
    ``p`` as a description, with ``p_holm`` NaN and ``ensemble_better`` False; ``in_family`` says which is which.

    ``frame`` is oodens.report.tables's records frame: one row per record with columns ``setting`` (detector,
    strategy, parameters), ``role`` (``"member"`` and ``"ensemble"`` rows are used), ``ood``, ``kind`` and the metric.
    Settings with fewer than two modes (nothing to test) or without an ensemble row are left out.
    """
    rows = []
    modes = frame[frame["role"] == "member"]
    ensemble = frame[frame["role"] == "ensemble"]
    for (setting, ood), ens in ensemble.groupby(["setting", "ood"], sort=False):
        values = modes.loc[(modes["setting"] == setting) & (modes["ood"] == ood), metric].dropna().to_numpy()
        ens_value = float(ens[metric].iloc[0])
        if len(values) < 2 or not np.isfinite(ens_value):
            continue  # ensemble-only detectors and single modes: nothing to compare
        low, high = t_interval(values, level, logit=bounded(metric))
        t, p = ensemble_test(values, ens_value, metric)
        rows.append({"setting": setting, "detector": ens["detector"].iloc[0], "strategy": ens["strategy"].iloc[0],
                     "ood": ood, "kind": ens["kind"].iloc[0], "metric": metric, "n_modes": len(values),
                     "mean": float(values.mean()),
                     "std": float(values.std(ddof=1)), "min": float(values.min()),
                     "max": float(values.max()), "ci_low": low, "ci_high": high, "ensemble": ens_value,
                     "t": t, "p": p, "p_beat": beat_probability(values, ens_value, metric)})
    out = pd.DataFrame(rows, columns=["setting", "detector", "strategy", "ood", "kind", "metric", "n_modes", "mean",
                                      "std", "min", "max", "ci_low", "ci_high", "ensemble", "t", "p", "p_beat"])
    out["in_family"] = ~out["kind"].isin(DERIVED_KINDS)
    p_holm = np.full(len(out), np.nan)
    if out["in_family"].any():
        p_holm[out["in_family"].to_numpy()] = holm(out.loc[out["in_family"], "p"].to_numpy())
    out["p_holm"] = p_holm
    out["ensemble_better"] = out["p_holm"] < alpha
    return out


def bootstrap_ci(id_scores, ood_scores, metric: str, n: int = 1000, level: float = 0.95, seed: int = 0,
                 positive: str = "id") -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap interval of ``metric`` over ``n`` resamples,
    ID and OOD scores each resampled with replacement to their own size (seeded, reproducible)."""
    spec = METRICS.get(metric)
    if spec is None or spec.fn is None:
        raise ValueError(f"no per-sample metric {metric!r}: expected one of {', '.join(OOD_METRICS)}")
    point = spec(id_scores, ood_scores, positive)  # validates the scores and the convention
    id_s = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_s = np.asarray(ood_scores, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    draws = np.array([spec.fn(id_s[rng.integers(0, len(id_s), len(id_s))],
                              ood_s[rng.integers(0, len(ood_s), len(ood_s))], positive) for _ in range(n)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return point, float(low), float(high)
