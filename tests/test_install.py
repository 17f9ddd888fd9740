"""A normal (non-editable) install carries the shipped modes: `oodens eval` works from any folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_modes_and_evaluates_from_another_folder(tmp_path):
    pytest.importorskip("hatchling")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True)
    wheel = next((tmp_path / "dist").glob("oodens-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True)
    shipped = tmp_path / "site" / "oodens" / "_checkpoints" / "Digits" / "CNN"
    assert sorted(p.name for p in shipped.iterdir()) == [f"seed-{s}" for s in (1000, 1100, 1200, 1300, 1400)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "oodens", "eval", "--detector", "maxlogit", "--ood", "noise",
                          "--json"], cwd=work, env=env, capture_output=True, text=True, check=True)
    recs = json.loads(out.stdout)
    assert {r["member"] for r in recs} == {f"seed-{s}" for s in (1000, 1100, 1200, 1300, 1400)} | {
        "mean", "std", "ensemble"}
    code = "import oodens, oodens.runtime.paths as p; print(oodens.__file__); print(p.shipped_modes_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(w.startswith(str(tmp_path / "site")) for w in where)
