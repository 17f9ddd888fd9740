"""The terminal: the two consoles (tables on stdout, messages on stderr) and progress bars on stderr
(rich), silent when stderr is not a terminal. A runtime helper beside the data flow: every layer may
print through these, and this module depends on nothing of oodens."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stdout = Console(soft_wrap=False)
if not stdout.is_terminal:  # pipes and files get the full table, not an 80-column squeeze
    stdout = Console(soft_wrap=False, width=140)
stderr = Console(stderr=True, soft_wrap=True)


def progress_bar(transient: bool = True, disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr,
        transient=transient,
        disable=disable or not stderr.is_terminal,
    )
