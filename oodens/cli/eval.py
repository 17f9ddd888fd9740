"""``oodens eval``: :meth:`oodens.Experiment.evaluate`, printed and stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oodens.cli.options import (ResultsOpt, expect_folder, experiment, names, stderr, stdout, warnings_to_stderr,
                                with_detector_options, with_experiment_options)
from oodens.detectors import DETECTORS


def _detectors(spec: str, flags: dict, benchmark: str | None = None, fit_fraction: float = 1.0) -> tuple[list, dict]:
    """``--detector`` (a name, a comma list or 'all') -> (instances with their ``--<detector>-<param>`` values,
    the grids: detector -> parameter -> values, for the flags given a comma list). A hyperparameter whose flag is
    not given takes the detector's default for ``benchmark`` (:func:`oodens.api.make_detector`)."""
    import typing

    from oodens.api import detector_list, make_detector
    from oodens.cli.options import detector_flag, detector_option_name, parse_grid

    wanted = names(spec)
    picked = list(DETECTORS) if wanted == ["all"] else wanted
    detector_list(",".join(picked))  # validates the names (one-line error naming an unknown one)
    dets, grids = [], {}
    for n in dict.fromkeys(picked):
        cls, hints = DETECTORS[n], typing.get_type_hints(DETECTORS[n])
        given = {f.name: flags[detector_option_name(n, f.name)] for f in cls.params()}
        values = {p: parse_grid(detector_flag(n, p), text, hints[p], None) for p, text in given.items()
                  if text is not None}
        base = make_detector(n, benchmark, fit_fraction).settings()
        dets.append(cls(**{**base, **{p: v[0] for p, v in values.items()}}))
        grid = {p: v for p, v in values.items() if len(v) > 1}
        if grid:
            grids[n] = grid
    for d in dets:
        d.validate()
    return dets, grids


def _check_grids(grids: dict, select: Optional[str]) -> None:
    """A grid without ``--select`` is a one-line error naming its flag."""
    from oodens.cli.options import detector_flag
    from oodens.errors import OodensError

    if select is not None or not grids:
        return
    n, grid = next(iter(grids.items()))
    p, values = next(iter(grid.items()))
    raise OodensError(f"{detector_flag(n, p)} {','.join(map(str, values))} is a grid: expected --select auroc or "
                      "fpr95 to choose among its values on validation data (or one value)")


def eval_cmd(
    detector: str = typer.Option("msp", "--detector", help=f"Detector, comma list or 'all': {', '.join(DETECTORS)}."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Ensemble strategy (default: the detector's "
                                           "own: mean-logits for logit detectors, concat for knn/mahalanobis); "
                                           "every per-member detector also takes mean-scores, median, min, max, std, "
                                           "and, standardised on the ID validation split, rank, zscore, fisher, "
                                           "simes; 'all': every strategy each detector supports.",
                                           show_default=False),
    select: Optional[str] = typer.Option(None, "--select", help="Choose each detector's hyperparameters (the "
                                         "values of --<detector>-<param> A,B,C grids) per mode, for the ensemble "
                                         "and per subset by this metric on validation data: auroc or fpr95 of "
                                         "the ID validation split against the OOD validation sets.",
                                         show_default=False),
    val_ood: Optional[str] = typer.Option(None, "--val-ood", help="OOD validation sets for --select: a comma "
                                          "list of the benchmark's (digits: letters-val, noise-val; default all) "
                                          "and/or NAME=PATH; never an evaluated set.", show_default=False),
    positive: str = typer.Option("id", "--positive", help="Metric convention: id (papers') or ood (OpenOOD)."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON instead of tables."),
    summary: bool = typer.Option(False, "--summary", help="Print one row per detector (OOD average: modes' "
                                 "mean ± std vs ensemble) instead of the full tables."),
    save_scores: Optional[Path] = typer.Option(None, "--save-scores", help="Write per-sample scores to "
                                               "DIR/<detector>-<strategy>/<member>/<dataset>.npy.",
                                               show_default=False),
    members: Optional[bool] = typer.Option(None, "--members/--no-members", help="List every member in the "
                                           "tables (default: up to 10; more collapse into mean ± std and min–max).",
                                           show_default=False),
    results: Optional[Path] = ResultsOpt,
    ensemble_size: Optional[str] = typer.Option(None, "--ensemble-size", help="Also score every k-of-N subset of "
                                                "the modes (k, a comma list, or 'all' for 1..N) and report mean ± std "
                                                "over subsets.", show_default=False),
    max_subsets: int = typer.Option(100, "--max-subsets", min=1, help="Most subsets per k (a seeded sample when "
                                    "there are more)."),
    subset_seed: int = typer.Option(0, "--subset-seed", help="Seed of the subset sample."),
    **options,
):
    """Score detectors per mode and as a mode ensemble on every OOD set: per-mode rows, mean ± std, ensemble.

    Views come from the cache (extracted once per mode and dataset); the records are also stored for
    `oodens report`. With --select, a strategy standardised on validation (rank, zscore, fisher, simes) or a detector fitted on
    validation data (tempscale), detectors fit on ID train minus a validation hold-out (10%, at most 5,000,
    class-stratified, seed 0) unless the benchmark names its own validation split.
    """
    from oodens.errors import OodensError
    from oodens.report.tables import detector_tables, render_rich, summary_table
    from oodens.runtime.paths import default_cache_dir, default_results_dir, mode_set_name

    results_dir = results or default_results_dir()
    for flag, path in (("--cache-dir", options["cache_dir"] or default_cache_dir()), ("--results", results_dir),
                       ("--save-scores", save_scores)):
        expect_folder(flag, path)  # before any work
    _, grids = _detectors(detector, options)  # hyperparameters checked before any work
    _check_grids(grids, select)
    with warnings_to_stderr():
        exp = experiment({**options, "val_ood": val_ood})
        # the same flags, with the benchmark's paper defaults for the hyperparameters not given
        dets, grids = _detectors(detector, options, exp.benchmark.name, exp.fit_fraction)
        res = exp.evaluate(dets, strategy=strategy, positive=positive, ensemble_sizes=ensemble_size,
                           max_subsets=max_subsets, subset_seed=subset_seed, skip_inapplicable=names(detector) == ["all"],
                           select=select, grid=grids)
    stderr.print(f"views: {res.extraction['computed']} extracted, {res.extraction['cached']} from cache "
                 f"({res.extraction['cache']})")
    # the output first: when the results cannot be stored (a full disk, a read-only folder) the work still shows
    if as_json:
        print(json.dumps(res.records, indent=2), flush=True)
    else:
        n = len(exp.modes)
        stdout.print(f"[bold]{exp.benchmark.name}[/] · {mode_set_name(exp.modes.path)} ({n} mode{'s' if n != 1 else ''} "
                     f"of {exp.modes.arch})", highlight=False)
        frame = res.wide()
        for table in [summary_table(frame)] if summary else detector_tables(frame, members):
            stdout.print(render_rich(table))
    failed = []
    try:
        res.save(results_dir)
        stderr.print(f"results stored in {results_dir}")
    except OodensError as e:  # one line naming the file and the reason, exit code 2 (after the scores)
        failed.append(str(e))
    if save_scores:
        try:
            res.save_scores(save_scores)
        except OSError as e:
            failed.append(f"scores not stored: cannot write {e.filename or save_scores}: "
                          f"{e.strerror or type(e).__name__}")
    if failed:
        raise OodensError("; ".join(failed))


eval_cmd = with_detector_options(with_experiment_options(eval_cmd))
