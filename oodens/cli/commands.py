"""The typer app: the ``oodens`` command group and its commands (one module per command).

Imported by :func:`oodens.cli.main` inside its guard, so that Ctrl-C while these (heavy) imports run
is one line too.
"""

from __future__ import annotations

import typer

from oodens.cli import eval as _eval, extract as _extract, heads as _heads, report as _report, train as _train
from oodens.version import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Post-hoc ensemble OOD evaluation: train modes, extract views once per mode, score detectors "
    "per mode and as a mode ensemble.",
)


def _version(value: bool):
    if value:
        print(f"oodens {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (accepted anywhere)."),
):
    pass


app.command("train")(_train.train_cmd)
app.command("extract")(_extract.extract_cmd)
app.command("eval")(_eval.eval_cmd)
app.command("report")(_report.report_cmd)
app.command("train-heads")(_heads.train_heads_cmd)
