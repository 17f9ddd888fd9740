"""The terminal: the two consoles (tables on stdout, messages on stderr) and progress on stderr. A runtime
helper beside the data flow: every layer may print through these, and this module depends on nothing of
oodens.

Progress is one object, :func:`progress_bar`, with rich's ``Progress`` interface as the callers use it
(``add_task``, ``update``, ``advance``, ``disable``, a context manager). On a terminal it is a rich bar
that fits 80 columns (the description and the info text are cut, never the count or the ETA); when
stderr is not a terminal (a pipe, a file, a batch scheduler, nohup) it logs plain lines, flushed at once:

- ``update(task, info=..., milestone="epoch")``: one line per milestone (``epoch 3/30: loss 0.412,
  acc 91.2%, 2.1 s/epoch, ETA 57 s``);
- ``update(task, info=label)`` (no milestone): the label names the part of the work now starting (a
  view); a line when it ends, with its rate and the overall ETA;
- ``advance``: a line every ``log_every`` of the total (a fraction, a task field) or every 30 s.

Task fields: ``unit`` names what ``advance`` counts (``batches``), ``rate_unit`` and ``scale`` what the
rate counts (``rate_unit="images", scale=batch_size``: images/s, the last short batch counted whole)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column
from rich.text import Text

stdout = Console(soft_wrap=False)
if not stdout.is_terminal:  # pipes and files get the full table, not an 80-column squeeze
    stdout = Console(soft_wrap=False, width=140)
stderr = Console(stderr=True, soft_wrap=True)

LINE_EVERY_S = 30.0  # a log line at least this often while work advances (not on a terminal)
REFRESH_PER_SECOND = 4  # frames of the bar on a terminal
_OWN_FIELDS = ("milestone", "unit", "rate_unit", "scale", "log_every")  # read here, never passed to rich


def _fields(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _OWN_FIELDS}


def duration(seconds: float) -> str:
    """``57 s``, ``4 min 12 s``, ``2.5 h``: a log line's ETA."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{s / 3600:.1f} h"


def _rate(n: float, seconds: float) -> str:
    r = n / seconds if seconds > 0 else float("inf")
    return f"{r:.0f}" if r >= 100 or r == float("inf") else f"{r:.1f}"


@dataclass
class _Task:
    description: str
    total: float
    completed: float
    info: str = ""
    unit: str = "steps"
    rate_unit: str = ""
    scale: float = 1.0
    log_every: float | None = None
    started: float = field(default_factory=time.monotonic)
    start_completed: float = 0.0
    # the segment (a view, an epoch) since the last label or milestone, and the last line printed
    seg_started: float = field(default_factory=time.monotonic)
    seg_completed: float = 0.0
    line_at: float = field(default_factory=time.monotonic)
    line_completed: float = 0.0

    def eta(self, now: float) -> str:
        done = self.completed - self.start_completed
        if done <= 0 or not self.total:
            return "?"
        return duration((self.total - self.completed) * (now - self.started) / done)

    def overall(self, now: float) -> str:
        return f"{self.completed:.0f}/{self.total:.0f} {self.unit}, ETA {self.eta(now)}"

    def rate(self, n: float, seconds: float) -> str:
        return f"{_rate(n * self.scale, seconds)} {self.rate_unit or self.unit}/s"


class ProgressLines:
    """What :func:`progress_bar` gives when stderr is not a terminal: rich's ``Progress`` interface (as
    oodens uses it), printing plain lines instead of a bar."""

    def __init__(self, console: Console, disable: bool = False, every_s: float = LINE_EVERY_S):
        self.console, self.disable, self.every_s = console, disable, every_s
        self._tasks: dict[int, _Task] = {}

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # the last part's line; none after an error (its line says what failed)
            for task_id in self._tasks:
                self._end_segment(task_id, time.monotonic())

    def _print(self, line: str) -> None:
        if self.disable:
            return
        f = self.console.file
        f.write(line + "\n")
        f.flush()

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, info: str = "",
                 unit: str = "steps", rate_unit: str = "", scale: float = 1.0, log_every: float | None = None,
                 **_fields) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = _Task(description, float(total or 0), float(completed), info, unit, rate_unit,
                                     float(scale), log_every, start_completed=float(completed), seg_completed=float(completed),
                                     line_completed=float(completed))
        return task_id

    def _what(self, t: _Task) -> str:
        return f"{t.description} {t.info}".strip() if t.info else t.description

    def _end_segment(self, task_id: int, now: float) -> None:
        t = self._tasks[task_id]
        n = t.completed - t.seg_completed
        if n > 0:
            secs = now - t.seg_started
            self._print(f"{self._what(t)}: {n:.0f} {t.unit} in {secs:.1f} s ({t.rate(n, secs)}); "
                        f"{t.overall(now)}")
            t.line_at, t.line_completed = now, t.completed
        t.seg_started, t.seg_completed = now, t.completed

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, info: str | None = None,
               milestone: str | None = None, **_fields) -> None:
        t = self._tasks[task_id]
        now = time.monotonic()
        if total is not None:
            t.total = float(total)
        if completed is not None:
            t.completed = float(completed)
        if advance:
            t.completed += advance
        if description is not None:
            t.description = description
        if milestone is not None:  # the info summarises the part just done: its line now
            secs = now - t.seg_started
            self._print(f"{info if info is not None else self._what(t)}, {secs:.1f} s/{milestone}, "
                        f"ETA {t.eta(now)}")
            t.info = info if info is not None else t.info
            t.seg_started, t.seg_completed = now, t.completed
            t.line_at, t.line_completed = now, t.completed
        elif info is not None and info != t.info:  # a new part starts: the last one's line
            self._end_segment(task_id, now)
            t.info = info

    def advance(self, task_id: int, advance: float = 1) -> None:
        t = self._tasks[task_id]
        t.completed += advance
        now = time.monotonic()
        since = now - t.line_at
        step = (t.log_every or 0) * t.total
        if since >= self.every_s or (step > 0 and t.completed - t.line_completed >= step and since >= 1.0):
            n, secs = t.completed - t.seg_completed, now - t.seg_started
            self._print(f"{self._what(t)}: {n:.0f} {t.unit} so far ({t.rate(n, secs)}); {t.overall(now)}")
            t.line_at, t.line_completed = now, t.completed


class _CutText(ProgressColumn):
    """A task's text, cut with an ellipsis to the width ``width(task)`` leaves it."""

    def __init__(self, text, width, style: str = ""):
        super().__init__(table_column=Column(no_wrap=True))
        self.text, self.width, self.style = text, width, style

    def render(self, task) -> Text:
        out = Text(str(self.text(task)), style=self.style, no_wrap=True)
        out.truncate(max(0, self.width(task)), overflow="ellipsis")
        return out


class ProgressBar(Progress):
    """What :func:`progress_bar` gives on a terminal: rich's bar, whose description and info text give way
    (cut with an ellipsis) so that the count, the elapsed time and the ETA stay whole on an 80-column
    terminal."""

    CLOCK = 8  # h:mm:ss up to 99 h, or -:--:--

    def __init__(self, console: Console, transient: bool = True, disable: bool = False):
        w = console.width
        self._desc_w, self._bar_w = (10, 6) if w < 80 else (20, 12) if w < 120 else (36, 24)
        super().__init__(
            _CutText(lambda task: task.description, lambda task: self._desc_w, style="bold"),
            BarColumn(bar_width=self._bar_w, table_column=Column(no_wrap=True)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            _CutText(lambda task: task.fields.get("info", ""), self._info_width),
            console=console, transient=transient, disable=disable, expand=False,
            # its clocks tick in seconds: 4 frames a second (rich's default, 10, renders on a thread that takes the
            # GIL from the forward passes each time)
            refresh_per_second=REFRESH_PER_SECOND,
        )

    def _info_width(self, task) -> int:
        """What the fixed columns (and the grid's one-space gaps) leave of the console's width."""
        count = max((2 * len(str(int(t.total or 0))) + 1 for t in self.tasks), default=3)
        fixed = self._desc_w + self._bar_w + count + 2 * self.CLOCK + 5
        return self.console.width - fixed - 1

    def add_task(self, description, start=True, total=100.0, completed=0, visible=True, **fields) -> int:
        fields.setdefault("info", "")
        return super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                **_fields(fields))

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **_fields(kwargs))


def progress_bar(transient: bool = True, disable: bool = False,
                 console: Console | None = None) -> ProgressBar | ProgressLines:
    """Progress on ``console`` (stderr): a bar on a terminal, plain log lines otherwise."""
    console = console or stderr
    if console.is_terminal:
        return ProgressBar(console, transient=transient, disable=disable)
    return ProgressLines(console, disable=disable)
