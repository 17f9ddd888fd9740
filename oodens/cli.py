"""The ``oodens`` command line: train, extract, eval.

Errors the user can fix are one line on stderr with exit code 2 (``--debug``
anywhere on the command line shows the traceback instead).
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console

from oodens import __version__
from oodens.detectors import DETECTORS, get_detector, parse_detectors
from oodens.errors import OodensError
from oodens.metrics import POSITIVES
from oodens.paths import default_cache_dir, default_results_dir, shipped_modes_dir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Post-hoc ensemble OOD evaluation: train modes, extract views once per mode, score detectors "
    "per mode and as a mode ensemble.",
)
stdout = Console(soft_wrap=False)
if not stdout.is_terminal:  # pipes and files get the full table, not an 80-column squeeze
    stdout = Console(soft_wrap=False, width=120)
stderr = Console(stderr=True, soft_wrap=True)

ModesOpt = typer.Option(None, "--modes", help="Folder of modes (seed-*/checkpoint). Default: the shipped digits modes.",
                        show_default=False)
BenchOpt = typer.Option(None, "--benchmark", help="Benchmark to evaluate on. Default: the modes' training dataset.",
                        show_default=False)
CacheOpt = typer.Option(None, "--cache-dir", envvar="OODENS_CACHE",
                        help="View cache folder. Default: $XDG_CACHE_HOME/oodens.", show_default=False)
BatchOpt = typer.Option(256, "--batch-size", min=1, help="Extraction batch size.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")


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


def _setup(modes_dir: Optional[Path], benchmark: Optional[str], cache_dir: Optional[Path]):
    from oodens.data import get_benchmark
    from oodens.modes import discover_modes
    from oodens.views import ViewCache

    modes = discover_modes(modes_dir or shipped_modes_dir())
    bench = get_benchmark(benchmark or modes[0].dataset)
    if bench.num_classes != modes[0].num_classes:
        raise OodensError(
            f"modes in {modes_dir} have {modes[0].num_classes} classes but benchmark {bench.name!r} has "
            f"{bench.num_classes}: expected modes trained on {bench.name}"
        )
    return modes, bench, ViewCache(cache_dir or default_cache_dir())


@app.command()
def train(
    seed: int = typer.Option(1000, "--seed", help="Random seed: initialisation, data order, augmentation."),
    arch: str = typer.Option("cnn", "--arch", help="Architecture."),
    dataset: str = typer.Option("digits", "--dataset", help="Training dataset."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the dataset's recipe, 30 for digits).",
                                         show_default=False),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the recipe's).", show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the recipe's).",
                                             show_default=False),
    out: Path = typer.Option(Path("save"), "--out", help="Writes OUT/<Dataset>/<Arch>/seed-<S>/checkpoint.pth.tar."),
    device: str = DeviceOpt,
):
    """Train one mode (one seed) and save it with its JSON sidecar."""
    from oodens.train import train_mode

    path = train_mode(seed, arch, dataset, epochs, out, lr, batch_size, device)
    import json

    acc = json.loads((path.parent / "oodens.json").read_text())["test_accuracy"]
    stderr.print(f"saved {path} (ID test accuracy {100 * acc:.2f}%)")


@app.command()
def extract(
    modes_dir: Optional[Path] = ModesOpt,
    benchmark: Optional[str] = BenchOpt,
    export: Optional[Path] = typer.Option(None, "--export", help="Also write DIR/<mode>/<dataset>/<split>/"
                                          "{logits,features,labels}.npy.", show_default=False),
    cache_dir: Optional[Path] = CacheOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
):
    """Fill the view cache: one forward pass per mode and dataset split (ID train, ID test, each OOD set)."""
    from oodens.extract import export_views
    from oodens.extract import extract as run_extract

    modes, bench, cache = _setup(modes_dir, benchmark, cache_dir)
    sources = [bench.id_train, bench.id_test, *bench.ood.values()]
    ex = run_extract(modes, sources, cache, batch_size=batch_size, device=device)
    stderr.print(f"{len(modes)} modes x {len(sources)} splits: {ex.computed} views extracted, {ex.cached} from cache "
                 f"({cache.root})")
    if export:
        export_views(ex, export)
        stderr.print(f"exported views to {export}")


def eval_cmd(
    modes_dir: Optional[Path] = ModesOpt,
    detector: str = typer.Option("msp", "--detector", help=f"Detector, comma list or 'all': {', '.join(DETECTORS)}."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Comma list of OOD sets (default: all of the benchmark).",
                                      show_default=False),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Ensemble strategy (default: the detector's "
                                           "own: mean-logits for logit detectors, concat for knn/mahalanobis).",
                                           show_default=False),
    positive: str = typer.Option("id", "--positive", help="Metric convention: id (papers') or ood (OpenOOD)."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON instead of tables."),
    summary: bool = typer.Option(False, "--summary", help="Print one row per detector (OOD average: modes' "
                                 "mean ± std vs ensemble) instead of the full tables."),
    save_scores: Optional[Path] = typer.Option(None, "--save-scores", help="Write per-sample scores to "
                                               "DIR/<detector>-<strategy>/<member>/<dataset>.npy.",
                                               show_default=False),
    benchmark: Optional[str] = BenchOpt,
    cache_dir: Optional[Path] = CacheOpt,
    results: Optional[Path] = typer.Option(None, "--results", envvar="OODENS_RESULTS", help="Results store "
                                           "folder. Default: $XDG_DATA_HOME/oodens/results.", show_default=False),
    ensemble_size: Optional[str] = typer.Option(None, "--ensemble-size", help="Also score every k-of-N subset of "
                                                "the modes (k, a comma list, or 'all' for 1..N) and report mean ± std "
                                                "over subsets.", show_default=False),
    max_subsets: int = typer.Option(100, "--max-subsets", min=1, help="Most subsets per k (a seeded sample when "
                                    "there are more)."),
    subset_seed: int = typer.Option(0, "--subset-seed", help="Seed of the subset sample."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    **detector_params,
):
    """Score detectors per mode and as a mode ensemble on every OOD set: per-mode rows, mean ± std, ensemble.

    Views come from the cache (extracted once per mode and dataset); the records are also stored for
    `oodens report`.
    """
    from oodens.evaluate import evaluate_detector
    from oodens.extract import extract as run_extract
    from oodens.output import print_tables, summary_table, to_json
    from oodens.results import save_run

    if positive not in POSITIVES:
        raise OodensError(f"--positive {positive!r}: expected one of {', '.join(POSITIVES)}")
    names = parse_detectors(detector)
    explicit = detector.strip() != "all"
    if strategy is not None:  # 'all' applies --strategy where it fits and each detector's default elsewhere
        from oodens.strategies import STRATEGIES, resolve_strategy

        if strategy not in STRATEGIES:
            raise OodensError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        for n in names if explicit else []:
            resolve_strategy(get_detector(n), strategy)
    modes, bench, cache = _setup(modes_dir, benchmark, cache_dir)
    sizes = _ensemble_sizes(ensemble_size, len(modes))
    member_meta = [{**m.sidecar, "name": m.name} for m in modes]
    names = _applicable(names, member_meta, explicit)
    params = {n: {f.name: detector_params[f"{n}_{f.name}"] for f in get_detector(n).params()} for n in names}
    specs = [s for n in names for s in get_detector(n)(**params[n]).view_specs()]
    oods = bench.select_ood([s.strip() for s in ood.split(",")] if ood else None)
    sources = [bench.id_train, bench.id_test, *oods.values()]
    ex = run_extract(modes, sources, cache, batch_size=batch_size, device=device, specs=specs)
    stderr.print(f"views: {ex.computed} extracted, {ex.cached} from cache ({cache.root})")

    members = [m.name for m in modes]
    train_v = [ex.get(m, bench.id_train) for m in members]
    test_v = [ex.get(m, bench.id_test) for m in members]
    ood_v = {o: [ex.get(m, src) for m in members] for o, src in oods.items()}
    common = {
        "benchmark": bench.name,
        "modes": str((modes_dir or shipped_modes_dir()).resolve()),
        "arch": modes[0].arch,
        "checkpoints": {m.name: m.sha256 for m in modes},
    }
    all_records = []
    results_dir = results or default_results_dir()
    for n in names:
        run = evaluate_detector(n, params[n], strategy if strategy in get_detector(n).strategies else None, members,
                                train_v, test_v, ood_v, positive, sizes, max_subsets, subset_seed)
        records = [{"benchmark": bench.name, **r} for r in run.records]
        settings = {**common, "detector": n, "strategy": run.strategy, "params": run.params,
                    "positive": positive, "ood_sets": list(oods), "ensemble_sizes": sizes,
                    "max_subsets": max_subsets, "subset_seed": subset_seed}
        save_run(results_dir, settings, records)
        all_records.extend(records)
        if save_scores:
            for member, by_set in run.scores.items():
                folder = save_scores / f"{n}-{run.strategy}" / member
                folder.mkdir(parents=True, exist_ok=True)
                for dataset, s in by_set.items():
                    name = bench.name if dataset == "id" else dataset
                    np.save(folder / f"{name}.npy", np.asarray(s), allow_pickle=False)
    if as_json:
        print(to_json(all_records))
    else:
        stdout.print(f"[bold]{bench.name}[/] · {len(modes)} modes of {modes[0].arch} from {common['modes']}")
        if summary:
            stdout.print(summary_table(all_records))
        else:
            print_tables(all_records, stdout)
    stderr.print(f"results stored in {results_dir}")


def _ensemble_sizes(spec: Optional[str], n: int) -> list[int]:
    """``--ensemble-size``: None, ``k``, ``a,b`` or ``all`` -> sizes in 1..n."""
    if not spec:
        return []
    if spec.strip() == "all":
        return list(range(1, n + 1))
    try:
        sizes = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise OodensError(f"--ensemble-size {spec!r}: expected k, a comma list of k, or 'all'") from None
    bad = [k for k in sizes if not 1 <= k <= n]
    if bad or not sizes:
        raise OodensError(f"--ensemble-size {spec!r}: expected sizes in 1..{n} (the number of modes)")
    return sorted(set(sizes))


def _applicable(names: list[str], members: list[dict], explicit: bool) -> list[str]:
    """Detectors that apply to these members; a named one that does not is an error, 'all' skips it."""
    keep = []
    for n in names:
        why = get_detector(n).applies_to(members)
        if why is None:
            keep.append(n)
        elif explicit:
            raise OodensError(why)
        else:
            stderr.print(f"skipping {n}: {why}")
    return keep


def _with_detector_options(func):
    """Add ``--<detector>-<param>`` options for every registered detector hyperparameter."""
    sig = inspect.signature(func)
    fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    extra = []
    for cls in DETECTORS.values():
        hints = typing.get_type_hints(cls)
        for f in cls.params():
            flag = f"--{cls.name}-{f.name.replace('_', '-')}"
            extra.append(inspect.Parameter(
                f"{cls.name}_{f.name}", inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                default=typer.Option(f.default, flag, help=f.metadata.get("help", ""),
                                     rich_help_panel="Detector hyperparameters"),
            ))
    func.__signature__ = sig.replace(parameters=fixed + extra)
    return func


app.command("eval")(_with_detector_options(eval_cmd))


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
        stderr.print(f"[red]oodens: error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
