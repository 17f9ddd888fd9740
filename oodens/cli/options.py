"""Options shared by several commands, the consoles, and the flags -> library objects glue."""

from __future__ import annotations

import inspect
import typing
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from oodens.runtime.progress import stderr, stdout  # noqa: F401  (the commands' consoles)

ModesOpt = typer.Option(None, "--modes", help="Folder of modes (seed-*/checkpoint). Default: the shipped digits modes.",
                        show_default=False)
BenchOpt = typer.Option(None, "--benchmark", help="Benchmark to evaluate on. Default: the modes' training dataset.",
                        show_default=False)
CacheOpt = typer.Option(None, "--cache-dir", envvar="OODENS_CACHE",
                        help="View cache folder. Default: $XDG_CACHE_HOME/oodens.", show_default=False)
ResultsOpt = typer.Option(None, "--results", envvar="OODENS_RESULTS", help="Results store folder. Default: "
                          "$XDG_DATA_HOME/oodens/results.", show_default=False)
BatchOpt = typer.Option(256, "--batch-size", min=1, help="Extraction batch size.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DATA = "Modes and data"
ArchOpt = typer.Option(None, "--arch", help="Architecture of the modes when neither sidecar nor path says.",
                       show_default=False, rich_help_panel=DATA)
ClassesOpt = typer.Option(None, "--num-classes", help="Class count when neither sidecar nor path says.",
                          show_default=False, rich_help_panel=DATA)
PresetOpt = typer.Option(None, "--preset", help="Preprocessing preset (digits, cifar, cifar-dice, cifar-eloc, "
                         "imagenet); overrides the modes'.", show_default=False, rich_help_panel=DATA)
RootOpt = typer.Option(None, "--data-root", help="Dataset root (else $OODENS_DATA, else data_root in "
                       "$XDG_CONFIG_HOME/oodens/config.toml).", show_default=False, rich_help_panel=DATA)
OodOpt = typer.Option(None, "--ood", help="Comma list of the benchmark's OOD sets to use (default: all present), "
                      "and/or NAME=PATH for another set (image folder, OpenOOD image list .txt, or .mat).",
                      show_default=False, rich_help_panel=DATA)
ImglistOpt = typer.Option(None, "--imglist", help="An OpenOOD image list (\"relative/path label\" lines) to use "
                          "as an OOD set named after the file; repeatable.", show_default=False,
                          rich_help_panel=DATA)
ImglistRootOpt = typer.Option(None, "--imglist-root", help="Folder the image-list paths are relative to "
                              "(default: the data root, else the list's folder).", show_default=False,
                              rich_help_panel=DATA)
CorruptOpt = typer.Option(None, "--corruptions", help="Covariate-shift sets: corrupted ID test copies, 'all' or "
                          "a comma list of NAME or NAME:SEVERITY (gaussian_noise, shot_noise, impulse_noise, "
                          "gaussian_blur, brightness, contrast, pixelate, jpeg; severities 1-5).",
                          show_default=False, rich_help_panel=DATA)
FitOpt = typer.Option(1.0, "--fit-fraction", help="Seeded fraction of the ID training split used to fit "
                      "knn/mahalanobis/dice/react/vim.", rich_help_panel=DATA)
WorkersOpt = typer.Option(0, "--workers", min=0, help="DataLoader worker processes for extraction.")
PrecisionOpt = typer.Option("fp32", "--precision", help="Forward-pass precision: fp32, bf16 or fp16 (autocast); "
                            "part of the view cache key.")
ChannelsLastOpt = typer.Option(False, "--channels-last", help="Run the network in channels_last memory format.")
CompileOpt = typer.Option(False, "--compile", help="torch.compile the network for extraction.")
ModesAtOnceOpt = typer.Option(None, "--modes-at-once", min=1, help="Extraction: networks loaded and run on each "
                              "decoded batch together (default: all the modes; each split is read once per group).",
                              show_default=False)
DecodeOpt = typer.Option("cpu", "--decode", help="Where image lists' JPEGs are decoded: cpu (Pillow's pixels, "
                         "as published results), gpu (batched nvJPEG on the CUDA device: other pixels, other "
                         "cached views) or auto (gpu on a CUDA device).")
KnnMemoryOpt = typer.Option(None, "--knn-memory", help="Memory cap of each knn/nnguide/relation train bank, e.g. "
                            "8GB (GPU banks too): a larger bank is written to <cache-dir>/banks and searched block "
                            "by block on the CPU (same scores). Default: no cap.", show_default=False)


def names(spec: Optional[str]) -> list[str]:
    """A comma list -> its stripped, non-empty items."""
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


#: the options that describe an :class:`oodens.Experiment` (mode set, benchmark and data, cache, how networks run)
EXPERIMENT_OPTIONS = {
    "modes_dir": (Optional[Path], ModesOpt),
    "benchmark": (Optional[str], BenchOpt),
    "ood": (Optional[str], OodOpt),
    "arch": (Optional[str], ArchOpt),
    "num_classes": (Optional[int], ClassesOpt),
    "preset": (Optional[str], PresetOpt),
    "data_root": (Optional[Path], RootOpt),
    "imglist": (Optional[list[Path]], ImglistOpt),
    "imglist_root": (Optional[Path], ImglistRootOpt),
    "corruptions": (Optional[str], CorruptOpt),
    "fit_fraction": (float, FitOpt),
    "cache_dir": (Optional[Path], CacheOpt),
    "batch_size": (int, BatchOpt),
    "workers": (int, WorkersOpt),
    "device": (str, DeviceOpt),
    "precision": (str, PrecisionOpt),
    "channels_last": (bool, ChannelsLastOpt),
    "compile": (bool, CompileOpt),
    "modes_at_once": (Optional[int], ModesAtOnceOpt),
    "decode": (str, DecodeOpt),
    "knn_memory": (Optional[str], KnnMemoryOpt),
}


def experiment(options: dict):
    """The :class:`oodens.Experiment` the :data:`EXPERIMENT_OPTIONS` in ``options`` describe."""
    from oodens.api import Experiment, get_benchmark, load_modes
    from oodens.data import BENCHMARKS
    from oodens.errors import OodensError, ParameterError

    o = {k: options[k] for k in EXPERIMENT_OPTIONS}
    if o["benchmark"] is not None and o["benchmark"].lower() not in BENCHMARKS:
        raise OodensError(f"unknown benchmark {o['benchmark']!r}: expected one of {', '.join(BENCHMARKS)}")
    if not 0 < o["fit_fraction"] <= 1:  # before any work (the library checks it again)
        raise ParameterError("experiment", "fit_fraction", o["fit_fraction"], "is not a fraction in (0, 1]")
    modes = load_modes(o["modes_dir"], arch=o["arch"], num_classes=o["num_classes"], preset=o["preset"],
                       dataset=o["benchmark"])
    bench = get_benchmark(o["benchmark"] or modes.dataset, o["data_root"], ood=names(o["ood"]),
                          imglist=o["imglist"] or [], imglist_root=o["imglist_root"], corruptions=o["corruptions"],
                          val_ood=names(options.get("val_ood")))
    from oodens.detectors.feature import parse_size, set_bank_device, set_bank_memory

    memory = parse_size(o["knn_memory"]) if o["knn_memory"] else None  # before any work
    exp = Experiment(modes, bench, cache_dir=o["cache_dir"], device=o["device"], fit_fraction=o["fit_fraction"],
                     batch_size=o["batch_size"], workers=o["workers"], precision=o["precision"],
                     channels_last=o["channels_last"], compile=o["compile"], modes_at_once=o["modes_at_once"],
                     decode=o["decode"])
    set_bank_memory(memory, exp.cache.root / "banks")
    set_bank_device(o["device"])  # knn/nnguide banks on the GPUs with a CUDA device (float16, sharded)
    return exp


def _add_options(func, extra: list[inspect.Parameter]):
    sig = inspect.signature(func)
    fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    func.__signature__ = sig.replace(parameters=fixed + extra)
    return func


def with_experiment_options(func):
    """Add the :data:`EXPERIMENT_OPTIONS` to a command taking ``**options``."""
    return _add_options(func, [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=opt)
                               for name, (ann, opt) in EXPERIMENT_OPTIONS.items()])


@contextmanager
def warnings_to_stderr():
    """The library's :class:`OodensWarning` s as one ``warning:`` line each on stderr."""
    from oodens.errors import OodensWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, OodensWarning):
            stderr.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)
        else:
            previous(message, category, filename, lineno, file, line)

    previous = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", OodensWarning)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = previous


def _scalar_type(hint):
    """``int`` for ``int`` and ``int | None``; the type a flag's values are parsed with."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def grid_capable(hint) -> bool:
    """Hyperparameters whose flag takes a value or a comma list of values (a grid): numbers and words.
    Boolean switches stay ``--flag/--no-flag``."""
    return _scalar_type(hint) in (int, float, str)


def with_detector_options(func):
    """Add ``--<detector>-<param>`` options for every registered detector hyperparameter (to a command
    taking ``**options``). A number or word hyperparameter takes one value or a comma list (a grid for
    ``--select``), parsed by :func:`parse_grid`; not given, it is None and the detector gets its default (the
    benchmark's paper default where one is set, :mod:`oodens.detectors.defaults`), both shown in ``--help``."""
    from oodens.detectors import DETECTORS
    from oodens.detectors.defaults import describe

    extra = []
    for cls in DETECTORS.values():
        hints = typing.get_type_hints(cls)
        for f in cls.params():
            flag, help_text = detector_flag(cls.name, f.name), f.metadata.get("help", "")
            if grid_capable(hints[f.name]):
                per_bench = describe(cls.name, f.name)
                default = f"\\[default: {f.default}{'; ' + per_bench if per_bench else ''}]"  # \[: not rich markup
                option = typer.Option(None, flag, help=f"{help_text} (a comma list: a grid for --select) {default}",
                                      rich_help_panel="Detector hyperparameters", show_default=False)
                annotation = Optional[str]
            else:
                option = typer.Option(f.default, flag, help=help_text, rich_help_panel="Detector hyperparameters")
                annotation = hints[f.name]
            extra.append(inspect.Parameter(detector_option_name(cls.name, f.name), inspect.Parameter.KEYWORD_ONLY,
                                           annotation=annotation, default=option))
    return _add_options(func, extra)


_KINDS = {int: "an integer", float: "a number", str: "a word"}


def parse_grid(flag: str, text: Optional[str], hint, default) -> list:
    """``--knn-k 10,50`` -> ``[10, 50]``: the flag's value or comma list parsed with the hyperparameter's type
    (``none`` allowed where the hyperparameter may be None); not given -> ``[default]``. A bad value is a
    one-line :class:`OodensError` naming the flag."""
    from oodens.errors import OodensError

    if text is None or not grid_capable(hint):
        return [default if text is None else text]
    kind = _scalar_type(hint)
    expected = f"{_KINDS[kind]}{' or none' if _optional(hint) else ''}, or a comma list of them"
    values = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            raise OodensError(f"{flag} {text}: an empty value: expected {expected}")
        if _optional(hint) and item.lower() == "none":
            values.append(None)
            continue
        try:
            values.append(kind(item))
        except ValueError:
            raise OodensError(f"{flag} {text}: {item!r} is not {_KINDS[kind]}: expected {expected}") from None
    if len(set(map(repr, values))) != len(values):
        raise OodensError(f"{flag} {text}: a value is given twice: expected distinct values")
    return values


def detector_flag(detector: str, param: str) -> str:
    return f"--{detector}-{param.replace('_', '-')}"


def detector_option_name(detector: str, param: str) -> str:
    """The Python name of a ``--<detector>-<param>`` option (``ash-p``'s ``p`` -> ``ash_p_p``)."""
    return f"{detector.replace('-', '_')}_{param}"


def flag_of(owner: str, param: str) -> Optional[str]:
    """The command-line flag of a library parameter: ``--<detector>-<param>`` for a detector's
    hyperparameter, ``--<param>`` for an experiment's (``fit_fraction`` -> ``--fit-fraction``)."""
    from oodens.detectors import DETECTORS

    if owner in DETECTORS and param in {f.name for f in DETECTORS[owner].params()}:
        return detector_flag(owner, param)
    if owner == "experiment":
        return {"ensemble_sizes": "--ensemble-size", "val_ood": "--val-ood"}.get(param, f"--{param.replace('_', '-')}")
    return None



def expect_folder(flag: str, path) -> None:
    """A one-line error when a folder option points at a file (or below one), before any work:
    ``--results out.json: it is a file, expected a folder``."""
    from oodens.errors import OodensError

    if path is None:
        return
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            where = "it" if p == path else str(p)
            raise OodensError(f"{flag} {path}: {where} is a file, expected a folder")
