"""The ``oodens`` command line: train, extract, eval.

Errors the user can fix are one line on stderr with exit code 2 (``--debug``
anywhere on the command line shows the traceback instead).
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console

from oodens import __version__
from oodens.detectors import DETECTORS, get_detector, parse_detectors
from oodens.errors import OodensError
from oodens.metrics import POSITIVES
from oodens.paths import default_cache_dir, default_results_dir, safe_name, shipped_modes_dir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Post-hoc ensemble OOD evaluation: train modes, extract views once per mode, score detectors "
    "per mode and as a mode ensemble.",
)
stdout = Console(soft_wrap=False)
if not stdout.is_terminal:  # pipes and files get the full table, not an 80-column squeeze
    stdout = Console(soft_wrap=False, width=140)
stderr = Console(stderr=True, soft_wrap=True)

ModesOpt = typer.Option(None, "--modes", help="Folder of modes (seed-*/checkpoint). Default: the shipped digits modes.",
                        show_default=False)
BenchOpt = typer.Option(None, "--benchmark", help="Benchmark to evaluate on. Default: the modes' training dataset.",
                        show_default=False)
CacheOpt = typer.Option(None, "--cache-dir", envvar="OODENS_CACHE",
                        help="View cache folder. Default: $XDG_CACHE_HOME/oodens.", show_default=False)
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


@dataclass
class Plan:
    """What a command works on: the modes, the benchmark, the OOD sets, the cache."""

    modes: list
    bench: object
    cache: object
    oods: dict
    fit_fraction: float = 1.0
    _train: object = None

    @property
    def train(self):
        """The ID training source used for fitting (a seeded subsample with --fit-fraction); built on first use,
        so commands whose detectors fit nothing never list the training split."""
        if self._train is None:
            from oodens.data.sources import SubsetSource

            full = self.bench.id_train
            self._train = full if self.fit_fraction >= 1 else SubsetSource(full, self.fit_fraction)
        return self._train


def _plan(modes_dir, benchmark, arch, num_classes, preset, data_root, ood, imglist, imglist_root, corruptions,
          fit_fraction, cache_dir) -> Plan:
    from oodens.data import BENCHMARKS, get_benchmark, get_preset, source_from_path
    from oodens.data import data_root as resolve_root
    from oodens.modes import ModeFlags, discover_modes
    from oodens.views import ViewCache

    if preset is not None:
        get_preset(preset)
    if benchmark is not None and benchmark.lower() not in BENCHMARKS:
        raise OodensError(f"unknown benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    if not 0 < fit_fraction <= 1:
        raise OodensError(f"--fit-fraction {fit_fraction}: expected a fraction in (0, 1]")
    modes = discover_modes(modes_dir or shipped_modes_dir(), ModeFlags(arch, num_classes, preset, benchmark))
    root = resolve_root(data_root)
    bench = get_benchmark(benchmark or modes[0].dataset, root)
    if bench.num_classes != modes[0].num_classes:
        raise OodensError(
            f"modes in {modes_dir or shipped_modes_dir()} have {modes[0].num_classes} classes but benchmark "
            f"{bench.name!r} has {bench.num_classes}: expected modes trained on {bench.name}"
        )
    selected, added = [], []  # the benchmark's sets picked by name; sets defined on the command line
    for entry in (e.strip() for e in (ood or "").split(",") if e.strip()):
        name, eq, path = entry.partition("=")
        if eq:
            bench.add_ood(name, source_from_path(name, Path(path), imglist_root or root))
            added.append(name)
        else:
            selected.append(name)
    for lst in imglist or []:
        bench.add_ood(Path(lst).stem, source_from_path(Path(lst).stem, Path(lst), imglist_root or root))
        added.append(Path(lst).stem)
    before = set(bench.ood_factories)
    bench.add_corruptions(corruptions)
    added += [n for n in bench.ood_factories if n not in before]
    if not selected and bench.missing:
        stderr.print("[yellow]warning:[/] OOD sets not on disk, skipped: "
                     + "; ".join(f"{n} (expected {p})" for n, p in bench.missing.items()))
    oods = bench.select_ood(selected + added if selected else None)
    return Plan(modes, bench, ViewCache(cache_dir or default_cache_dir()), oods, fit_fraction)


@app.command()
def train(
    seed: int = typer.Option(1000, "--seed", help="Random seed: initialisation, data order, augmentation."),
    arch: str = typer.Option("cnn", "--arch", help="Architecture (digits: cnn; CIFAR: R18, WRN28X10, DNBC100; "
                             "ImageNet: R50, DN121)."),
    dataset: str = typer.Option("digits", "--dataset", help="Training dataset: digits, CIFAR10, CIFAR100, ImageNet "
                                "(its benchmark's ID train split)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the recipe's: digits 30, CIFAR 150, "
                                         "ImageNet 90, SDDE/ELOC on CIFAR 100).", show_default=False),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the recipe's).", show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size, split over torchrun "
                                             "processes (default: the recipe's).", show_default=False),
    out: Path = typer.Option(Path("save"), "--out", help="Writes OUT/<Dataset>/<Arch>/seed-<S>/<checkpoint> "
                             "(SDDE: <Arch>-sdde-<D>/seed-<S>-m<n>; ELOC: <Arch>-eloc-<K>/seed-<S>-m<k>)."),
    device: str = DeviceOpt,
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic algorithms and cuDNN flags "
                                       "(always on for the digits recipes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/.../seed-<S>.last.pth (model, "
                                "optimiser, scheduler, RNG states), saved after every epoch."),
    members: Optional[int] = typer.Option(None, "--members", help="SDDE: train N members jointly (default 5 with "
                                          "--diversity).", show_default=False),
    diversity: Optional[str] = typer.Option(None, "--diversity", help="SDDE diversity loss: gradcam, input-grad, "
                                            "ncl, adp, oe (default gradcam with --members).", show_default=False),
    lam: Optional[float] = typer.Option(None, "--lambda", help="SDDE diversity weight (default: gradcam 0.005, "
                                        "input-grad 0.005, ncl 0.1, adp 0.1, oe 0.5).", show_default=False),
    outliers: Optional[str] = typer.Option(None, "--outliers", help="Training outliers for --diversity oe: a named "
                                           "set (digits: letters-lower) or an image folder/list/.mat; never an "
                                           "evaluation OOD set.", show_default=False),
    leave_out: Optional[int] = typer.Option(None, "--leave-out", help="ELOC: K members, member k leaves out the "
                                            "k-th of K class groups.", show_default=False),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (else $OODENS_DATA, else "
                                             "data_root in $XDG_CONFIG_HOME/oodens/config.toml).",
                                             show_default=False),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes for training."),
):
    """Train one mode (one seed), an SDDE ensemble (--members/--diversity) or an ELOC ensemble (--leave-out),
    and save every member as a mode with its JSON sidecar. Under torchrun: DistributedDataParallel, rank 0 saves."""
    from oodens.train import train as run_train

    result = run_train(seed, arch, dataset, epochs, out, lr, batch_size, device, members=members,
                       diversity=diversity, lam=lam, outliers=outliers, leave_out=leave_out, data_root=data_root,
                       workers=workers, deterministic=deterministic, resume=resume)
    if result.main:
        for path, acc in zip(result.paths, result.accuracies):
            stderr.print(f"saved {path} (ID test accuracy {100 * acc:.2f}%)")


@app.command()
def extract(
    modes_dir: Optional[Path] = ModesOpt,
    benchmark: Optional[str] = BenchOpt,
    export: Optional[Path] = typer.Option(None, "--export", help="Also write DIR/<mode>/<dataset>/<split>/"
                                          "{logits,features,labels}.npy.", show_default=False),
    arch: Optional[str] = ArchOpt,
    num_classes: Optional[int] = ClassesOpt,
    preset: Optional[str] = PresetOpt,
    data_root: Optional[Path] = RootOpt,
    ood: Optional[str] = OodOpt,
    imglist: Optional[list[Path]] = ImglistOpt,
    imglist_root: Optional[Path] = ImglistRootOpt,
    corruptions: Optional[str] = CorruptOpt,
    fit_fraction: float = FitOpt,
    cache_dir: Optional[Path] = CacheOpt,
    batch_size: int = BatchOpt,
    workers: int = WorkersOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    channels_last: bool = ChannelsLastOpt,
    compile: bool = CompileOpt,
):
    """Fill the view cache: one forward pass per mode and dataset split (ID train, ID test, each OOD set).

    Under `torchrun --nproc_per_node N -m oodens extract ...` the ranks share each pass (whole batches) and
    rank 0 writes the views: the same views as one process.
    """
    from oodens.extract import export_views
    from oodens.extract import extract as run_extract

    plan = _plan(modes_dir, benchmark, arch, num_classes, preset, data_root, ood, imglist, imglist_root,
                 corruptions, fit_fraction, cache_dir)
    sources = [plan.train, plan.bench.id_test, *plan.oods.values()]
    from oodens.distributed import process_group

    with process_group(device) as (ctx, dev):  # under torchrun: ranks share the work, rank 0 writes the views
        ex = run_extract(plan.modes, sources, plan.cache, batch_size=batch_size, device=dev, workers=workers,
                         precision=precision, channels_last=channels_last, compile=compile)
    if not ctx.is_main:
        return
    stderr.print(f"{len(plan.modes)} modes x {len(sources)} splits: {ex.computed} views extracted, {ex.cached} "
                 f"from cache ({plan.cache.root})")
    if export:
        export_views(ex, export)
        stderr.print(f"exported views to {export}")


def eval_cmd(
    modes_dir: Optional[Path] = ModesOpt,
    detector: str = typer.Option("msp", "--detector", help=f"Detector, comma list or 'all': {', '.join(DETECTORS)}."),
    ood: Optional[str] = OodOpt,
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
    arch: Optional[str] = ArchOpt,
    num_classes: Optional[int] = ClassesOpt,
    preset: Optional[str] = PresetOpt,
    data_root: Optional[Path] = RootOpt,
    imglist: Optional[list[Path]] = ImglistOpt,
    imglist_root: Optional[Path] = ImglistRootOpt,
    corruptions: Optional[str] = CorruptOpt,
    fit_fraction: float = FitOpt,
    batch_size: int = BatchOpt,
    workers: int = WorkersOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    channels_last: bool = ChannelsLastOpt,
    compile: bool = CompileOpt,
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
    plan = _plan(modes_dir, benchmark, arch, num_classes, preset, data_root, ood, imglist, imglist_root,
                 corruptions, fit_fraction, cache_dir)
    modes, bench, oods = plan.modes, plan.bench, plan.oods
    sizes = _ensemble_sizes(ensemble_size, len(modes))
    member_meta = [{**m.sidecar, "name": m.name} for m in modes]
    names = _applicable(names, member_meta, explicit)
    params = {n: {f.name: detector_params[f"{n}_{f.name}"] for f in get_detector(n).params()} for n in names}
    specs = [s for n in names for s in get_detector(n)(**params[n]).view_specs()]
    need_train = any(get_detector(n).needs_fit for n in names)
    sources = [*([plan.train] if need_train else []), bench.id_test, *oods.values()]
    ex = run_extract(modes, sources, plan.cache, batch_size=batch_size, device=device, specs=specs, workers=workers,
                     base_only=[plan.train] if need_train else [], precision=precision,
                     channels_last=channels_last, compile=compile)
    stderr.print(f"views: {ex.computed} extracted, {ex.cached} from cache ({plan.cache.root})")

    members = [m.name for m in modes]
    train_v = [ex.get(m, plan.train) if need_train else None for m in members]
    test_v = [ex.get(m, bench.id_test) for m in members]
    ood_v = {o: [ex.get(m, src) for m in members] for o, src in oods.items()}
    common = {
        "benchmark": bench.name,
        "modes": str((modes_dir or shipped_modes_dir()).resolve()),
        "arch": modes[0].arch,
        "checkpoints": {m.name: m.sha256 for m in modes},
        "preset": modes[0].preset,
        "fit_fraction": fit_fraction,
        "precision": precision,
        "leave_out": any(v.classes is not None for v in test_v),
    }
    all_records = []
    results_dir = results or default_results_dir()
    for n in names:
        run = evaluate_detector(n, params[n], strategy if strategy in get_detector(n).strategies else None, members,
                                train_v, test_v, ood_v, positive, sizes, max_subsets, subset_seed,
                                kinds={o: bench.kinds.get(o, "semantic") for o in oods})
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
                    name = bench.name if dataset == "id" else safe_name(dataset)
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


from oodens.report import report_cmd  # noqa: E402
app.command("report")(report_cmd)


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
