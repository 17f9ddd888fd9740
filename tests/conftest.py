"""Shared fixtures: isolated cache/results/data folders and small copies of the shipped modes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from oodens.runtime.paths import shipped_modes_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Never touch the user's real cache or results store."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("OODENS_RESULTS", raising=False)
    monkeypatch.delenv("OODENS_CACHE", raising=False)


@pytest.fixture(autouse=True)
def _host_banks():
    """knn/nnguide banks on the host (float32, faiss) in every test, whatever GPU the machine has: the tests' exact
    expectations are the host's; the GPU bank is tested on its own (tests/test_gpu_paths.py)."""
    from oodens.detectors import feature

    feature.set_bank_device("cpu")
    yield
    feature.set_bank_device("cpu")


@pytest.fixture
def two_modes(tmp_path) -> Path:
    """A mode set with two of the shipped digits modes (seed-1000, seed-1100)."""
    dst = tmp_path / "modes" / "Digits" / "CNN"
    for name in ("seed-1000", "seed-1100"):
        shutil.copytree(shipped_modes_dir() / name, dst / name)
    return dst


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder`` with its size, mtime and content."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out
