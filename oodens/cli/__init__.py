"""The ``oodens`` command line: a thin shell over the library (:mod:`oodens.api`).

One module per command (``train``, ``extract``, ``eval``, ``report``), joined here. Errors the user
can fix are one line on stderr with exit code 2 (``--debug`` anywhere on the command line shows the
traceback instead); the library names parameters (``k=500 ...``), this module names flags (``--knn-k 500 ...``).
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from oodens.cli.options import flag_of, stderr, stdout  # noqa: F401  (stdout: the commands' console)
from oodens.errors import OodensError, ParameterError, format_value
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


from oodens.cli import eval as _eval, extract as _extract, report as _report, train as _train  # noqa: E402

app.command("train")(_train.train_cmd)
app.command("extract")(_extract.extract_cmd)
app.command("eval")(_eval.eval_cmd)
app.command("report")(_report.report_cmd)


def message(e: OodensError) -> str:
    """The one-line message: a library parameter named by its command-line flag."""
    if isinstance(e, ParameterError):
        flag = flag_of(e.owner, e.param)
        if flag is not None:
            return f"{flag}: {e}" if e.value is None else f"{flag} {format_value(e.value)} {e.problem}"
    return str(e)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app, turning user errors into one line and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="oodens")
    except OodensError as e:
        if debug:
            raise
        stderr.print(f"[red]oodens: error:[/] {escape(message(e))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
