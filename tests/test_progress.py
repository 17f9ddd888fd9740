"""Progress everywhere: plain flushed lines when stderr is not a terminal (training per epoch, extraction per
view with rate and ETA), a rich bar that keeps its count and ETA whole on an 80-column terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

from rich.console import Console

from oodens.runtime.progress import ProgressBar, ProgressLines, progress_bar

from conftest import REPO


def _oodens(*args: str) -> subprocess.CompletedProcess:
    """``python -m oodens ARGS`` with stderr a pipe (not a terminal)."""
    proc = subprocess.run([sys.executable, "-m", "oodens", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_non_tty_training_prints_a_line_per_epoch(tmp_path):
    err = _oodens("train", "--seed", "3", "--epochs", "3", "--out", str(tmp_path)).stderr
    lines = [ln for ln in err.splitlines() if re.match(r"epoch \d+/3:", ln)]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], err
    for ln in lines:
        assert re.search(r"loss \d+\.\d+", ln) and re.search(r"acc \d+\.\d%", ln), ln
        assert re.search(r"\d+\.\d s/epoch, ETA \d+ (s|min)", ln), ln
    assert "━" not in err and "\r" not in err  # no bar drawn into a pipe


def test_non_tty_extraction_prints_a_line_per_split_with_rate(two_modes, tmp_path):
    """Extraction reads each split once for all modes (decode once): one line per split and group of modes."""
    err = _oodens("extract", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c")).stderr
    lines = [ln for ln in err.splitlines() if ln.startswith("extracting ")]
    views = re.search(r"(\d+) views extracted", err)
    assert views and len(lines) >= int(views.group(1)) // 2 > 0, err  # 2 modes share each split's pass
    for split in ("digits-train", "digits-test", "letters-test"):
        assert any(f"extracting 2 modes / {split} / base:" in ln for ln in lines), err
    for ln in lines:
        assert re.search(r"\d+ batches (in|so far).*\(\d+(\.\d)? images/s\); \d+/\d+ batches, ETA \d+", ln), ln


def test_lines_every_n_batches_within_a_long_part():
    out = io.StringIO()
    bar = ProgressLines(Console(file=out), every_s=1e9)
    with bar:
        task = bar.add_task("extracting", total=100, info="", unit="batches", rate_unit="images", scale=10,
                            log_every=0.1)
        bar.update(task, info="m / long / base")
        for _ in range(100):
            bar.advance(task)
            time.sleep(0.012)  # a line needs 1 s since the last one as well as 10 % of the batches
    lines = out.getvalue().splitlines()
    assert any("so far" in ln for ln in lines) and lines[-1].startswith("extracting m / long / base: 100 batches in")
    assert "100/100 batches" in lines[-1]


def test_disabled_lines_print_nothing():
    out = io.StringIO()
    with ProgressLines(Console(file=out), disable=True) as bar:
        task = bar.add_task("train", total=3, info="")
        bar.advance(task)
        bar.update(task, info="epoch 1/3: loss 1.0, acc 50.0%", milestone="epoch")
    assert out.getvalue() == ""


def test_terminal_bar_fits_80_columns_with_count_and_eta_whole():
    console = Console(force_terminal=True, width=80, file=io.StringIO(), color_system=None)
    bar = progress_bar(console=console)
    assert isinstance(bar, ProgressBar)
    task = bar.add_task("train resnet18 x5 (ensemble, negative-correlation) seed 7", total=12000,
                        info="epoch 3/30: loss 0.412, acc 91.2% and a long tail of text that cannot fit")
    bar.advance(task, 1000)
    time.sleep(0.2)
    bar.advance(task, 234)  # two samples: a speed, so an ETA
    remaining = bar.tasks[0].time_remaining
    assert remaining is not None
    console.print(bar.make_tasks_table(bar.tasks))
    rendered = console.file.getvalue().rstrip("\n").splitlines()
    assert len(rendered) == 1 and len(rendered[0]) <= 80, rendered  # one line, not wrapped
    line = rendered[0]
    assert "1234/12000" in line, line
    h, rest = divmod(int(remaining), 3600)
    assert f"{h}:{rest // 60:02d}:{rest % 60:02d}" in line, line
    assert "…" in line  # the description or info gave way instead


def test_progress_bar_is_lines_when_not_a_terminal():
    assert isinstance(progress_bar(console=Console(file=io.StringIO())), ProgressLines)
