"""The ``oodens`` command line: a thin shell over the library (:mod:`oodens.api`).

One module per command (``train``, ``extract``, ``eval``, ``report``), joined in :mod:`oodens.cli.commands`.
Errors the user can fix are one line on stderr with exit code 2 (``--debug`` anywhere on the command line shows
the traceback instead): the library's :class:`OodensError` and the option parser's usage errors (``--batch-size
0``, an unknown option) alike; the library names parameters (``k=500 ...``), this module names flags (``--knn-k
500 ...``). Ctrl-C at any point, imports included, prints ``interrupted`` and exits with code 130.

This module imports nothing heavy at module level: :func:`main` imports the app inside its guard.
"""

from __future__ import annotations

import os
import sys

#: exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED = 130


def __getattr__(name: str):
    """``oodens.cli.app`` (the typer app) and the consoles, imported on first use."""
    if name == "app":
        from oodens.cli.commands import app

        globals()["app"] = app
        return app
    if name in ("stderr", "stdout", "flag_of"):
        from oodens.cli import options

        return getattr(options, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def message(e) -> str:
    """The one-line message of an :class:`OodensError`: a library parameter named by its command-line flag."""
    from oodens.cli.options import flag_of
    from oodens.errors import ParameterError, format_value

    if isinstance(e, ParameterError):
        flag = flag_of(e.owner, e.param)
        if flag is not None:
            return f"{flag}: {e}" if e.value is None else f"{flag} {format_value(e.value)} {e.problem}"
    return " ".join(str(e).split())


def _click_exceptions():
    try:  # typer >= 0.20 vendors click
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older typer runs on click
        from click import exceptions
    return exceptions


def _given(args: list[str], opts: list[str]) -> str | None:
    """The value the command line gave one of ``opts`` (the last one: it wins), or None."""
    value = None
    for i, a in enumerate(args):
        for o in opts:
            if a == o and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(o + "="):
                value = a[len(o) + 1:]
    return value


def _sentence(text: str) -> str:
    """``Input should be ...`` -> ``input should be ...``: one line, lower case first, no final full stop."""
    text = " ".join(str(text).split()).rstrip(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() or len(text) == 1 else text


def usage_message(e, args: list[str]) -> str:
    """A usage error of the option parser as oodens' one line: ``--batch-size 0: input should be greater than or
    equal to 1``, ``no such option: --batch-sz (possible options: --arch, --batch-size)``."""
    ce = _click_exceptions()
    if isinstance(e, ce.BadParameter) and not isinstance(e, ce.MissingParameter):
        opts = list(getattr(e.param, "opts", None) or [])
        long = [o for o in opts if o.startswith("--")] or opts
        flag = long[0] if long else (e.param_hint if isinstance(e.param_hint, str) else None)
        if flag:
            value = _given(args, opts or [flag])
            return f"{flag}{'' if value is None else ' ' + value}: {_sentence(e.message)}"
    if isinstance(e, ce.NoSuchOption) and e.possibilities:
        return f"{_sentence(e.message)} (did you mean {' or '.join(sorted(e.possibilities))}?)"
    return _sentence(e.format_message())


def _interrupted(debug: bool) -> None:
    if debug:
        raise KeyboardInterrupt
    # SIGINT is not set to SIG_IGN here: main() also runs in-process (tests, notebooks), and children started
    # later would inherit the ignored signal
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    sys.exit(INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app, turning user errors into one line and exit code 2, Ctrl-C into
    ``interrupted`` and exit code 130."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = _run(args, debug)
    except KeyboardInterrupt:
        _interrupted(debug)
    else:
        if code == INTERRUPTED:  # typer turns Ctrl-C inside a command into Exit(130)
            _interrupted(debug)
        if code:
            sys.exit(code)


def _run(args: list[str], debug: bool) -> int:
    """Run the app; the exit code (0 when the command returned)."""
    from rich.markup import escape

    from oodens.errors import OodensError

    ce = _click_exceptions()
    from typer import Abort

    def fail(text: str) -> int:
        from oodens.cli.options import stderr

        stderr.print(f"[red]oodens: error:[/] {escape(text)}", markup=True, highlight=False, soft_wrap=True)
        return 2

    try:
        code = sys.modules[__name__].app(args=args, prog_name="oodens", standalone_mode=False)
    except OodensError as e:
        if debug:
            raise
        return fail(message(e))
    except ce.NoArgsIsHelpError:  # `oodens` alone: the help is printed already
        return 2
    except ce.UsageError as e:
        if debug:
            raise
        return fail(usage_message(e, args))
    except Abort as e:  # click turns EOFError (and, before typer 0.20, Ctrl-C) into Abort
        if isinstance(e.__cause__, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if e.__cause__ is not None:  # an EOFError is a bug: its own traceback, not a bare "Aborted."
            raise e.__cause__
        raise
    return code if isinstance(code, int) else 0


def entry() -> None:
    """The ``oodens`` program (console script and ``python -m oodens``): :func:`main`, and on Ctrl-C an exit
    with code 130 that CPython cannot turn into death by SIGINT (it does so, whatever ``sys.exit`` said, when
    the interrupt landed while an extension module ran Python code during an import, e.g. torch's)."""
    try:
        main()
    except SystemExit as e:
        if e.code == INTERRUPTED:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED)
        raise
