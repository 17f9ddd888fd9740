"""The results store and its one reader: records -> DataFrame.

Store: one JSON file per eval setting (mode set, benchmark, detector, strategy, hyperparameters,
convention), ``<results>/runs/<settings sha256[:16]>.json`` holding ``{"settings", "created", "records"}``.
Re-running the same setting replaces its file (atomically) instead of duplicating records.

Frame (:func:`records_frame`): one row per record with the settings merged in: the :data:`KEYS`
columns (``role``, ``k`` and ``stat`` say what a row is, see :mod:`oodens.ensemble.evaluate`) and one column per
metric (fractions; NaN where a record has none). :func:`tidy` is the long form, one row per record
and metric, which ``Results.frame()``, ``report --csv`` and ``report --json`` give.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import pandas as pd

from oodens.errors import OodensError
from oodens.metrics.ood import METRICS
from oodens.modes.checkpoints import atomic_write_bytes

#: every metric a record can carry: OOD metrics, ID quality, accuracy under shift
VALUES = tuple(METRICS)
#: one set of tables per mode set, benchmark and metric convention
FAMILY = ["benchmark", "modes", "positive"]
KEYS = ["benchmark", "modes", "arch", "positive", "detector", "strategy", "params", "fit_fraction", "setting",
        "n_members", "member", "role", "k", "stat", "ood", "kind", "n_subsets", "leave_out"]
#: what tells two rows of one family apart
ROW = FAMILY + ["setting", "role", "member", "k", "stat", "ood"]


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_run(results_dir: Path, settings: dict, records: list[dict]) -> Path:
    path = Path(results_dir) / "runs" / f"{settings_key(settings)}.json"
    payload = {"settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "records": records}
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())
    return path


def setting_name(detector: str, strategy: str, params: dict, fit_fraction: float = 1.0) -> str:
    """``knn · concat (k=50)``: what tells two evaluations of a mode set apart."""
    extra = [f"{k}={v}" for k, v in sorted(params.items())] + ([f"fit={fit_fraction:g}"] if fit_fraction != 1 else [])
    return f"{detector} · {strategy}" + (f" ({', '.join(extra)})" if extra else "")


def _row_identity(r: dict) -> tuple[str, float, str | None]:
    """(role, k, stat) of a record. Stores written before records carried ``role`` named the row in
    ``member`` only (``mean``, ``std``, ``ensemble``, ``subsets-<k>-<stat>`` or a mode name)."""
    if "role" in r:
        k = r.get("k")
        return r["role"], float(k) if k is not None else math.nan, r.get("stat")
    member = r["member"]
    if member.startswith("subsets-"):
        _, k, stat = member.split("-")
        return "subsets", float(k), stat
    if member in ("mean", "std"):
        return member, math.nan, None
    if member == "ensemble":
        return "ensemble", float(r["n_members"]), None
    return "member", 1.0, None


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: the KEYS columns and every metric. Duplicate rows keep the last one."""
    rows = []
    for r in records:
        params = r.get("params") or {}
        fit = float(r.get("fit_fraction", 1.0))
        role, k, stat = _row_identity(r)
        row = {"benchmark": r.get("benchmark", ""), "modes": r.get("modes", ""), "arch": r.get("arch", ""),
               "positive": r.get("positive", "id"), "detector": r["detector"], "strategy": r["strategy"],
               "params": json.dumps(params), "fit_fraction": fit,
               "setting": setting_name(r["detector"], r["strategy"], params, fit), "n_members": int(r["n_members"]),
               "member": "subsets" if role == "subsets" else r["member"], "role": role, "k": k, "stat": stat,
               "ood": r["ood"], "kind": r["kind"], "n_subsets": float(r.get("n_subsets", math.nan)),
               "leave_out": bool(r.get("leave_out", False))}
        row.update({m: float(r[m]) if r.get(m) is not None else math.nan for m in VALUES})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=KEYS + list(VALUES))
    return frame.drop_duplicates(ROW, keep="last").reset_index(drop=True)


def load_frame(results_dir: Path) -> pd.DataFrame:
    """Every record in ``results_dir/runs/*.json`` (oldest run first, so a newer run of the same setting wins)."""
    files = sorted((Path(results_dir) / "runs").glob("*.json"))
    if not files:
        raise OodensError(f"no results in {results_dir}: run `oodens eval` first (or point --results at the folder "
                          "it wrote)")
    runs = []
    for f in files:
        try:
            run = json.loads(f.read_text())
            runs.append((run.get("created", ""), records_frame([{**run["settings"], **r} for r in run["records"]])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise OodensError(f"cannot read results file {f}: {type(e).__name__}: {e} (expected a run written by "
                              "`oodens eval`)") from e
    runs.sort(key=lambda r: r[0])
    frame = pd.concat([r[1] for r in runs], ignore_index=True)
    return frame.drop_duplicates(ROW, keep="last").reset_index(drop=True)


def tidy(frame: pd.DataFrame, metrics=None) -> pd.DataFrame:
    """Long form: one row per record and metric (``metric``, ``value``), records without the metric dropped."""
    long = frame.melt(id_vars=KEYS, value_vars=list(metrics or VALUES), var_name="metric", value_name="value")
    return long.dropna(subset=["value"]).reset_index(drop=True)
