"""Running the command line in-process from tests."""

from oodens.cli import main


def run(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def messages(err: str) -> list[str]:
    """stderr's lines without the progress lines that runs log when stderr is not a terminal
    (``extracting ...`` per view, ``epoch k/N: ...`` per epoch)."""
    return [line for line in err.strip().splitlines() if not line.startswith(("extracting ", "epoch "))]
