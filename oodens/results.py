"""The results store that ``oodens report`` reads.

One JSON file per eval setting (mode set, benchmark, detector, strategy, hyperparameters,
convention): ``<results>/runs/<settings sha256[:16]>.json`` holding ``{"settings", "records"}``.
Re-running the same setting replaces its file (atomically) instead of duplicating records.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from oodens.checkpoints import atomic_write_bytes


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_run(results_dir: Path, settings: dict, records: list[dict]) -> Path:
    path = Path(results_dir) / "runs" / f"{settings_key(settings)}.json"
    payload = {"settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "records": records}
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())
    return path


def load_records(results_dir: Path) -> list[dict]:
    """Every stored record, each with its run's settings merged in."""
    out = []
    for f in sorted((Path(results_dir) / "runs").glob("*.json")):
        run = json.loads(f.read_text())
        out.extend({**run["settings"], **r} for r in run["records"])
    return out
