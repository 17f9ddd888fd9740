"""The results store and its one reader: records -> DataFrame.

Store: one JSON file per eval setting (mode set, benchmark, detector, strategy, hyperparameters,
convention), ``<results>/runs/<settings sha256[:16]>.json`` holding ``{"settings", "created", "records"}``.
Re-running the same setting replaces its file (atomically) instead of duplicating records. Each file also
holds ``"sha256"``, the checksum of the rest of its content (:func:`run_checksum`); :func:`load_frame` verifies
it and skips a damaged file (checksum mismatch, unreadable or not a run) with one warning naming it, so the
other runs still report.

Runs know their mode set: the settings hold every member's checkpoint sha256, and :func:`modeset_id` turns
them into a short id (column ``modeset``). Records of different mode sets are never one table: ``modeset`` is
part of :data:`FAMILY`. When a folder's modes change (a mode added, one retrained), its latest run's mode set
is current and the older runs of that folder (same benchmark) with another mode set are *superseded*
(column ``superseded``): ``oodens report`` leaves them out and names them, ``--all-runs`` shows them as
their own tables.

Why JSON files and not SQLite: a run is one file written by an atomic rename, so concurrent ``oodens eval``
processes (a cluster array job) never share a file or a lock, and the store works on network file systems
where SQLite's locking is unreliable; a damaged file costs that run only; supersession and filtering are
queries on the frame the files load into, small at any realistic count of runs.

Frame (:func:`records_frame`): one row per record with the settings merged in: the :data:`KEYS`
columns (``role``, ``k`` and ``stat`` say what a row is, see :mod:`oodens.ensemble.evaluate`) and one column per
metric (fractions; NaN where a record has none). :func:`tidy` is the long form, one row per record
and metric, which ``Results.frame()``, ``report --csv`` and ``report --json`` give.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from oodens.errors import OodensError, OodensWarning
from oodens.metrics.ood import METRICS
from oodens.modes.checkpoints import atomic_write_bytes

#: every metric a record can carry: OOD metrics, ID quality, accuracy under shift
VALUES = tuple(METRICS)
#: one set of tables per benchmark, mode set (its folder and its checkpoints) and metric convention
FAMILY = ["benchmark", "modes", "modeset", "positive"]
KEYS = ["benchmark", "modes", "modeset", "created", "superseded", "arch", "positive", "detector", "strategy", "params",
        "fit_fraction", "setting", "n_members", "member", "role", "k", "stat", "ood", "kind", "n_subsets", "leave_out"]
#: what tells two rows of one family apart
ROW = FAMILY + ["setting", "role", "member", "k", "stat", "ood"]


def modeset_id(checkpoints: dict | None) -> str:
    """A mode set's identity: sha256[:12] of its members' names and checkpoint sha256s ("" when a store written
    before runs recorded them has none)."""
    if not checkpoints:
        return ""
    return hashlib.sha256(json.dumps(checkpoints, sort_keys=True).encode()).hexdigest()[:12]


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


#: the key of a run file's checksum
CHECKSUM = "sha256"


def run_checksum(run: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a run file's content less its checksum.
    JSON round-trips floats exactly, so the checksum of the file as read equals the one written."""
    body = {k: v for k, v in run.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_run(results_dir: Path, settings: dict, records: list[dict]) -> Path:
    """Write one run file atomically (with its checksum). A write that fails (full disk, read-only folder)
    leaves no temp file and raises an :class:`OodensError` naming the file, the reason and, for a full disk,
    the bytes needed; an earlier file of the same settings stays as it was."""
    path = Path(results_dir) / "runs" / f"{settings_key(settings)}.json"
    created = datetime.now(timezone.utc).isoformat(timespec="microseconds")  # one clock for every node
    payload = {"settings": settings, "created": created, "records": records}
    payload[CHECKSUM] = run_checksum(payload)
    data = (json.dumps(payload, indent=1) + "\n").encode()
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e) or type(e).__name__)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += f" (ENOSPC: {len(data)} bytes needed)"
        raise OodensError(f"results not stored: cannot write {path}: {reason}") from e
    return path


def setting_name(detector: str, strategy: str, params: dict, fit_fraction: float = 1.0,
                 validation: dict | None = None) -> str:
    """``knn · concat (k=50)``: what tells two evaluations of a mode set apart; a run with validation in use says
    so (``fit=train-val`` when detectors fitted on ID train minus the validation hold-out, ``select=auroc``)."""
    validation = validation or {}
    held_out = bool((validation.get("fit_on") or {}).get("holdout"))
    extra = ([f"{k}={v}" for k, v in sorted(params.items())] + ([f"fit={fit_fraction:g}"] if fit_fraction != 1 else [])
             + (["fit=train-val"] if held_out else [])
             + ([f"select={validation['select']}"] if validation.get("select") else []))
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
        row = {"benchmark": r.get("benchmark", ""), "modes": r.get("modes", ""),
               "modeset": modeset_id(r.get("checkpoints")), "created": r.get("created", ""), "superseded": False,
               "arch": r.get("arch", ""),
               "positive": r.get("positive", "id"), "detector": r["detector"], "strategy": r["strategy"],
               "params": json.dumps(params), "fit_fraction": fit,
               "setting": setting_name(r["detector"], r["strategy"], params, fit, r.get("validation")),
               "n_members": int(r["n_members"]),
               "member": "subsets" if role == "subsets" else r["member"], "role": role, "k": k, "stat": stat,
               "ood": r["ood"], "kind": r["kind"], "n_subsets": float(r.get("n_subsets", math.nan)),
               "leave_out": bool(r.get("leave_out", False))}
        row.update({m: float(r[m]) if r.get(m) is not None else math.nan for m in VALUES})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=KEYS + list(VALUES))
    return frame.drop_duplicates(ROW, keep="last").reset_index(drop=True)


def _read_run(f: Path) -> tuple[str, pd.DataFrame]:
    """(created, frame) of one run file; ValueError saying why it cannot be trusted."""
    try:
        run = json.loads(f.read_bytes())
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror or type(e).__name__})") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not valid JSON ({' '.join(str(e).split())})") from e
    if not isinstance(run, dict) or not isinstance(run.get("settings"), dict) or not isinstance(run.get("records"),
                                                                                                 list):
        raise ValueError("not a run (expected settings and records)")
    # Files written before run files carried a checksum have none: they are accepted as they are.
    if CHECKSUM in run and run[CHECKSUM] != run_checksum(run):
        raise ValueError("checksum mismatch: its content changed after `oodens eval` wrote it")
    try:
        created = str(run.get("created", ""))
        frame = records_frame([{**run["settings"], "created": created, **r} for r in run["records"]])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"a record is malformed ({type(e).__name__}: {e})") from e
    return created, frame


def created_time(created) -> pd.Series:
    """Run times as UTC timestamps, whatever offset or format a run file wrote (unparsable: NaT, sorted first)."""
    return pd.to_datetime(pd.Series(created, dtype=object), utc=True, format="ISO8601", errors="coerce")


def mark_superseded(frame: pd.DataFrame) -> pd.DataFrame:
    """Set ``superseded`` on the rows of runs whose mode set is not the one of their folder's latest run on
    that benchmark (the folder's modes changed since). Runs without checkpoint hashes are never superseded."""
    frame = frame.copy()
    known = frame[frame["modeset"] != ""]
    latest = (known.assign(_t=created_time(known["created"])).sort_values("_t", kind="stable")
              .groupby(["benchmark", "modes"])["modeset"].last() if len(known) else pd.Series(dtype=object))
    current = frame.set_index(["benchmark", "modes"]).index.map(lambda key: latest.get(key, ""))
    frame["superseded"] = (frame["modeset"] != "") & (frame["modeset"].to_numpy() != np.asarray(current, dtype=object))
    return frame


def superseded_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per superseded mode set of ``frame``: benchmark, modes, modeset, n_members, runs (settings), created
    (the latest of its runs)."""
    old = frame[frame["superseded"]]
    return (old.groupby(["benchmark", "modes", "modeset"], sort=False)
            .agg(n_members=("n_members", "max"), runs=("setting", "nunique"), created=("created", "max"))
            .reset_index())


def load_frame(results_dir: Path) -> pd.DataFrame:
    """Every record in ``results_dir/runs/*.json`` (oldest run first, so a newer run of the same setting wins),
    with ``superseded`` marked (:func:`mark_superseded`).

    A damaged file (checksum mismatch, unreadable, not a run) is skipped with one
    :class:`oodens.errors.OodensWarning` naming it; when every file is damaged it is an :class:`OodensError`."""
    files = sorted((Path(results_dir) / "runs").glob("*.json"))
    if not files:
        raise OodensError(f"no results in {results_dir}: run `oodens eval` first (or point --results at the folder "
                          "it wrote)")
    runs, damaged = [], []
    for f in files:
        try:
            runs.append(_read_run(f))
        except ValueError as e:
            damaged.append(f)
            warnings.warn(f"skipping damaged results file {f}: {e} (rerun its `oodens eval` to replace it)",
                          OodensWarning, stacklevel=2)
    if not runs:
        raise OodensError(f"no readable results in {results_dir}: all {len(damaged)} run files are damaged (rerun "
                          "`oodens eval`)")
    times = created_time([r[0] for r in runs]).fillna(pd.Timestamp.min.tz_localize("UTC"))  # oldest first
    runs = [runs[i] for i in sorted(range(len(runs)), key=lambda i: times[i])]
    frame = pd.concat([r[1] for r in runs], ignore_index=True)
    return mark_superseded(frame.drop_duplicates(ROW, keep="last").reset_index(drop=True))


def tidy(frame: pd.DataFrame, metrics=None) -> pd.DataFrame:
    """Long form: one row per record and metric (``metric``, ``value``), records without the metric dropped."""
    long = frame.melt(id_vars=KEYS, value_vars=list(metrics or VALUES), var_name="metric", value_name="value")
    return long.dropna(subset=["value"]).reset_index(drop=True)
