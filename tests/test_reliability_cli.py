"""Reliability of the command line and the results store (issue "Trust"): each test injects one fault and
asserts the one-line message, the exit code, and that the cache and the results store are untouched.

- a damaged results file (a value edited, truncated JSON) is reported by name and skipped by ``report``;
- results that cannot be stored (ENOSPC injected, a read-only folder): ``eval`` still prints its output, then
  one line naming the file and the reason, exit code 2, no temp file left, the stored run unchanged;
- folder options pointing at a file: exit 2 before any work;
- option type/range errors: one line, exit 2 (``--help``/``--version`` exit 0);
- Ctrl-C (SIGINT) at start-up and during the work: ``interrupted``, exit 130, no traceback;
- non-finite logits or scores: one line naming the detector, the mode (or ensemble), the set and the count.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from oodens.cli import main
from oodens.errors import OodensError
from oodens.modes.checkpoints import atomic_write_bytes
from oodens.runtime.paths import shipped_modes_dir

from conftest import REPO, snapshot
from cli_runner import messages, run


def one_error(err: str) -> str:
    """The single ``oodens: error:`` line, which is the last line of stderr."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("oodens: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err and "╭" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two shipped modes, a warm cache and a results store holding an msp run and an energy run."""
    root = tmp_path_factory.mktemp("rel-cli")
    modes = root / "modes" / "Digits" / "CNN"
    for name in ("seed-1000", "seed-1100"):
        shutil.copytree(shipped_modes_dir() / name, modes / name)
    cache, results = root / "cache", root / "results"
    for det in ("msp", "energy"):
        try:
            main(["eval", "--modes", str(modes), "--detector", det, "--json", "--cache-dir", str(cache),
                  "--results", str(results)])
        except SystemExit as e:
            assert not e.code, e
    return {"modes": modes, "cache": cache, "results": results}


@pytest.fixture
def env(base, tmp_path):
    """This test's own copy of the store (the cache is shared: every test asserts it is untouched)."""
    results = tmp_path / "results"
    shutil.copytree(base["results"], results)
    return {**base, "results": results}


def _run_file(results: Path, detector: str) -> Path:
    for f in sorted((results / "runs").glob("*.json")):
        if json.loads(f.read_text())["settings"]["detector"] == detector:
            return f
    raise AssertionError(f"no {detector} run in {results}")


# --------------------------------------------------------------------------- 1. results store integrity

def _edit_a_member_value(f: Path) -> None:
    run = json.loads(f.read_text())
    rec = next(r for r in run["records"] if r["member"] == "seed-1000" and r["ood"] == "letters")
    rec["fpr95"] = 0.995  # 0.0x -> 99.5 % in the table, the average column untouched
    f.write_text(json.dumps(run, indent=1) + "\n")


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:200])


@pytest.mark.parametrize("damage, why", [(_edit_a_member_value, "checksum mismatch"), (_truncate, "not valid JSON")])
def test_a_damaged_results_file_is_named_and_skipped(env, capsys, damage, why):
    msp = _run_file(env["results"], "msp")
    damage(msp)
    before, cache = snapshot(env["results"]), snapshot(env["cache"])
    code, out, err = run(["report", "--results", str(env["results"]), "--json"], capsys)
    assert code == 0, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: skipping damaged results file"), err
    assert str(msp) in " ".join(err.split()) and why in lines[0]
    detectors = {r["detector"] for r in json.loads(out)["records"]}
    assert detectors == {"energy"}  # the other run still reports; the damaged one is not used
    assert snapshot(env["results"]) == before and snapshot(env["cache"]) == cache


def test_every_run_file_damaged_is_one_error_line(env, capsys):
    for f in (env["results"] / "runs").glob("*.json"):
        _truncate(f)
    before = snapshot(env["results"])
    code, _, err = run(["report", "--results", str(env["results"])], capsys)
    assert code == 2
    line = " ".join(one_error(err).split())
    assert "no readable results" in line and "2 run files are damaged" in line
    assert snapshot(env["results"]) == before


def test_a_run_file_without_checksum_is_accepted(env, capsys):
    """Run files written before checksums existed carry none: they are read as they are."""
    f = _run_file(env["results"], "msp")
    run_ = json.loads(f.read_text())
    assert len(run_.pop("sha256")) == 64
    f.write_text(json.dumps(run_, indent=1) + "\n")
    code, out, err = run(["report", "--results", str(env["results"]), "--json"], capsys)
    assert code == 0 and "warning" not in err, err
    assert {r["detector"] for r in json.loads(out)["records"]} == {"msp", "energy"}


# --------------------------------------------------------------------------- 2. results that cannot be stored

def test_atomic_write_removes_its_temp_file_and_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"] and target.read_bytes() == b"old"


def _fsync_full_under(monkeypatch, folder: Path):
    """os.fsync raises ENOSPC for files under ``folder`` (after the bytes went into the temp file)."""
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell the results file apart")
@pytest.mark.parametrize("as_json", [False, True])
def test_full_disk_still_prints_the_output_then_one_line(env, capsys, monkeypatch, as_json):
    _fsync_full_under(monkeypatch, env["results"])
    before, cache = snapshot(env["results"]), snapshot(env["cache"])
    args = ["eval", "--modes", str(env["modes"]), "--cache-dir", str(env["cache"]), "--results",
            str(env["results"])] + (["--json"] if as_json else [])
    code, out, err = run(args, capsys)
    assert code == 2, err
    line = " ".join(one_error(err).split())
    path = _run_file(env["results"], "msp")
    assert f"results not stored: cannot write {path}: No space left on device (ENOSPC: " in line
    assert line.endswith("bytes needed)")
    if as_json:
        assert {r["member"] for r in json.loads(out)} == {"seed-1000", "seed-1100", "mean", "std", "ensemble"}
    else:
        assert "ensemble (2)" in out and "FPR95" in out
    assert "results stored" not in err
    assert snapshot(env["results"]) == before, "a failed store changed the stored run or left a temp file"
    assert snapshot(env["cache"]) == cache


def test_read_only_results_folder(env, capsys):
    runs = env["results"] / "runs"
    runs.chmod(0o555)
    try:
        if os.access(runs, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        before = snapshot(env["results"])
        code, out, err = run(["eval", "--modes", str(env["modes"]), "--cache-dir", str(env["cache"]),
                              "--results", str(env["results"])], capsys)
        assert code == 2 and "ensemble (2)" in out
        assert "results not stored" in one_error(err) and "Permission denied" in err
        assert snapshot(env["results"]) == before
    finally:
        runs.chmod(0o755)


# --------------------------------------------------------------------------- 3. folder options pointing at a file

@pytest.mark.parametrize("command, flag", [("eval", "--cache-dir"), ("eval", "--results"), ("eval", "--save-scores"),
                                           ("extract", "--cache-dir"), ("extract", "--export"), ("train", "--out"),
                                           ("report", "--plot"), ("report", "--results")])
@pytest.mark.parametrize("below", [False, True])
def test_a_folder_option_pointing_at_a_file(env, tmp_path, capsys, command, flag, below):
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    path = f / "sub" if below else f
    args = [command, flag, str(path)]
    if command in ("eval", "extract"):
        args += ["--modes", str(env["modes"])] + ([] if flag == "--cache-dir" else ["--cache-dir", str(env["cache"])])
    if command == "report" and flag != "--results":
        args += ["--results", str(env["results"])]
    before, cache = snapshot(env["results"]), snapshot(env["cache"])
    t = time.monotonic()
    code, _, err = run(args, capsys)
    assert code == 2
    line = " ".join(one_error(err).split())
    assert f"{flag} {path}:" in line and line.endswith("is a file, expected a folder")
    assert (f"{f} is a file" if below else "it is a file") in line
    assert time.monotonic() - t < 20, "the check must come before any work"
    assert f.read_text() == "not a folder"
    assert snapshot(env["results"]) == before and snapshot(env["cache"]) == cache


# --------------------------------------------------------------------------- 4. usage errors, Ctrl-C

@pytest.mark.parametrize("args, expected", [
    (["eval", "--batch-size", "0"], "oodens: error: --batch-size 0: input should be greater than or equal to 1"),
    (["eval", "--batch-size=x"], "oodens: error: --batch-size x: input should be a valid integer"),
    (["eval", "--max-subsets", "0"], "oodens: error: --max-subsets 0: input should be greater than or equal to 1"),
    (["report", "--alpha", "abc"], "oodens: error: --alpha abc: input should be a valid number"),
    (["train", "--workers", "-1"], "oodens: error: --workers -1: input should be greater than or equal to 0"),
    (["eval", "--batch-sz", "3"], "oodens: error: no such option: --batch-sz (did you mean"),
    (["eval", "--modes"], "oodens: error: option '--modes' requires an argument"),
    (["evaluate"], "oodens: error: no such command 'evaluate'"),
])
def test_option_type_and_range_errors_are_one_line(args, expected, capsys):
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    assert " ".join(one_error(err).split()).startswith(expected), err
    assert len(messages(err)) == 1, err


def test_help_and_version_still_exit_0(capsys):
    for args in (["--help"], ["eval", "--help"], ["report", "--help"], ["--version"]):
        code, out, err = run(args, capsys)
        assert code == 0 and out and not err, (args, err)


def test_ctrl_c_during_a_command_is_one_line(env, capsys, monkeypatch):
    """typer turns KeyboardInterrupt inside a command into a silent exit 130: oodens says so."""
    import oodens.api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(oodens.api.Experiment, "evaluate", interrupted)
    before = snapshot(env["results"])
    code, out, err = run(["eval", "--modes", str(env["modes"]), "--cache-dir", str(env["cache"]),
                          "--results", str(env["results"])], capsys)
    assert code == 130 and err == "interrupted\n" and out == ""
    assert snapshot(env["results"]) == before


def _sigint(args, delay=None, until=None, env=None) -> tuple[int, str]:
    """Run ``python -m oodens ARGS``, send SIGINT after ``delay`` s or once ``until()`` holds; (code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "oodens", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    t = time.monotonic()
    while (until is not None and not until()) or (delay is not None and time.monotonic() - t < delay):
        assert proc.poll() is None, "finished before it could be interrupted: " + proc.stderr.read()
        assert time.monotonic() - t < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _eager_package_import() -> bool:
    """Whether ``import oodens`` imports torch (then Ctrl-C during it happens before any oodens code runs)."""
    out = subprocess.run([sys.executable, "-c", "import sys, oodens; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=REPO).stdout
    return out.strip() == "True"


@pytest.mark.parametrize("delay", [0.3, 2.0])
def test_sigint_at_start_up(delay, tmp_path):
    assert not _eager_package_import()  # else a SIGINT during `import oodens` comes before main() can catch it
    code, err = _sigint(["eval", "--cache-dir", str(tmp_path / "c"), "--results", str(tmp_path / "r")], delay=delay,
                        env={"XDG_CACHE_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)})
    assert code == 130 and messages(err) == ["interrupted"] and err.endswith("interrupted\n"), err
    assert not (tmp_path / "r").exists()


def test_sigint_during_extraction(base, tmp_path):
    cache = tmp_path / "cold"
    # --corruptions all: 40 more views, so the work goes on for a while after the first view is written
    code, err = _sigint(["eval", "--modes", str(base["modes"]), "--detector", "knn", "--corruptions", "all",
                         "--cache-dir", str(cache), "--results", str(tmp_path / "r")],
                        until=lambda: cache.exists() and any(cache.rglob("*")))
    assert code == 130 and messages(err) == ["interrupted"] and err.endswith("interrupted\n"), err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 5. non-finite scores

def test_non_finite_scores_name_detector_mode_set_and_count():
    from oodens.detectors import DETECTORS
    from oodens.ensemble.evaluate import MemberSet, evaluate_detector
    from oodens.views.types import Views

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)

    def views(n, bad=0):
        z = rng.normal(size=(n, 3))
        z[:bad, 0] = np.inf  # energy +inf
        z[bad:2 * bad] = np.nan  # energy NaN
        return Views(logits=z, labels=labels if n == 40 else np.full(n, -1))

    sets = MemberSet(["seed-1", "seed-2"], [None, None], [views(40), views(40)],
                     {"noise": [views(720), views(720)], "letters": [views(720), views(720, bad=6)]})
    with pytest.raises(OodensError) as info:
        evaluate_detector(DETECTORS["energy"](), sets)
    assert str(info.value) == ("energy scores of mode seed-2 on letters: 12 of 720 are not finite (expected finite "
                               "scores: check the mode's weights and energy's hyperparameters)")


def test_energy_temperature_that_overflows_is_one_line(env, capsys):
    before, cache = snapshot(env["results"]), snapshot(env["cache"])
    code, _, err = run(["eval", "--modes", str(env["modes"]), "--cache-dir", str(env["cache"]), "--results",
                        str(env["results"]), "--detector", "energy", "--energy-temperature", "1e-310"], capsys)
    assert code == 2
    line = " ".join(one_error(err).split())
    assert line == ("oodens: error: energy scores of mode seed-1000 on the ID test split: 325 of 325 are not finite "
                    "(expected finite scores: check the mode's weights and energy's hyperparameters)")
    assert len(messages(err)) == 1, err
    assert snapshot(env["results"]) == before and snapshot(env["cache"]) == cache


def test_weights_whose_logits_overflow_name_the_mode(env, tmp_path, capsys):
    modes = tmp_path / "modes" / "Digits" / "CNN"
    shutil.copytree(env["modes"], modes)
    ckpt = modes / "seed-1100" / "checkpoint.pth.tar"
    state = torch.load(ckpt, weights_only=True)
    w = state["state_dict"]["fc.weight"]
    state["state_dict"]["fc.weight"] = torch.sign(w) * 3e38  # finite weights, logits beyond float32
    torch.save(state, ckpt)
    before = snapshot(env["results"])
    code, _, err = run(["eval", "--modes", str(modes), "--cache-dir", str(tmp_path / "c"), "--results",
                        str(env["results"])], capsys)
    assert code == 2
    line = " ".join(one_error(err).split())
    assert line.startswith("oodens: error: logits of mode seed-1100 on the ID test split: ")
    assert "are not finite (expected finite logits: check the mode's weights)" in line
    assert len(messages(err)) == 1, err
    assert snapshot(env["results"]) == before
