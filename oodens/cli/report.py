"""``oodens report``: tables, statistics and plots from the results store (:mod:`oodens.report.tables`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from oodens.cli.options import ResultsOpt, expect_folder, names, stderr, stdout, warnings_to_stderr
from oodens.errors import OodensError
from oodens.report.tables import (DEFAULT_METRICS, GROUP_BY, TABLES, Table, bootstrap_frame, bootstrap_table,
                                  filter_frame, load_scores, ood_tables, parse_metrics, quality_tables, render_latex,
                                  plural, render_markdown, render_rich, shift_tables, size_tables, stats_frame,
                                  stats_tables, strategy_tables, to_json)
from oodens.report.figures import view_probs, write_plots
from oodens.results import VALUES, load_frame, superseded_runs, tidy
from oodens.runtime.paths import default_results_dir, mode_set_name


def report_cmd(
    results: Optional[Path] = ResultsOpt,
    detector: Optional[str] = typer.Option(None, "--detector", help="Only these detectors (comma list).",
                                           show_default=False),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Only these ensemble strategies (comma list).",
                                           show_default=False),
    modes: Optional[str] = typer.Option(None, "--modes", help="Only mode sets whose path contains this text.",
                                        show_default=False),
    ood: Optional[str] = typer.Option(None, "--ood", help="These OOD sets as columns, in this order (comma list; "
                                      "also average, near, far, C-1.., covariate-shift sets). Default: the semantic "
                                      "sets and their averages.", show_default=False),
    metric: Optional[str] = typer.Option(None, "--metric", help="Metrics (comma list of fpr95, auroc, aupr_in, "
                                         "aupr_out, detection_error). Tables default to fpr95,auroc; CSV/JSON to "
                                         "every metric.", show_default=False),
    group_by: str = typer.Option("metric", "--group-by", help="OOD tables: one per metric (rows detector x member, "
                                 "columns OOD sets) or one per detector (rows metric x OOD set, columns members)."),
    tables: Optional[str] = typer.Option(None, "--tables", help=f"Which tables (comma list of {', '.join(TABLES)}). "
                                         "Default: all that the results hold.", show_default=False),
    csv: Optional[str] = typer.Option(None, "--csv", help="Write the records in long form (one row per record and "
                                      "metric) as CSV to PATH, or '-' for stdout.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the records (long form), the ensemble-vs-modes "
                                 "statistics and any bootstrap CIs as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the tables as Markdown."),
    latex: bool = typer.Option(False, "--latex", help="Print the tables as LaTeX (booktabs tabular)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level of the Holm-corrected tests; "
                                "intervals are (1 - alpha)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write figures (PNG and PDF) to DIR: strip plots, "
                                        "ensemble-size curves, and with --scores/--views score histograms and the "
                                        "reliability diagram.", show_default=False),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Saved scores (the DIR of eval --save-scores) for "
                                          "score histograms (--plot) and --bootstrap.", show_default=False),
    member: str = typer.Option("ensemble", "--member", help="Member whose saved scores are plotted/bootstrapped "
                               "(a mode name or ensemble)."),
    bootstrap: int = typer.Option(0, "--bootstrap", min=0, help="Bootstrap resamples for CIs of the member's "
                                  "metrics from --scores (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    members: Optional[bool] = typer.Option(None, "--members/--no-members", help="List every member in the "
                                           "tables (default: up to 10; more collapse into mean ± std and min–max).",
                                           show_default=False),
    all_runs: bool = typer.Option(False, "--all-runs", help="Also show runs of mode sets that were superseded (the "
                                  "folder's modes changed since; by default only each folder's latest mode set)."),
    views: Optional[Path] = typer.Option(None, "--views", help="Exported views (the DIR of extract --export) for "
                                         "the reliability diagram (--plot).", show_default=False),
):
    """Tables, statistics and plots from the results store: per-mode rows, mean ± std, ensemble; ensemble vs
    modes tests; ID quality and calibration; accuracy under covariate shift; ensemble-size curves."""
    chosen = parse_metrics(metric)
    table_metrics = chosen or list(DEFAULT_METRICS)
    if group_by not in GROUP_BY:
        raise OodensError(f"--group-by {group_by!r}: expected one of {', '.join(GROUP_BY)}")
    kinds = names(tables) or list(TABLES)
    bad = [t for t in kinds if t not in TABLES]
    if bad:
        raise OodensError(f"--tables {bad[0]!r}: expected a comma list of {', '.join(TABLES)}")
    if not 0 < alpha < 1:
        raise OodensError(f"--alpha {alpha}: expected a level in (0, 1)")
    if bootstrap and scores is None:
        raise OodensError("--bootstrap needs --scores DIR (the folder written by `oodens eval --save-scores DIR`)")
    if views is not None and plot is None:
        raise OodensError("--views is read for the reliability diagram: add --plot DIR")
    if scores is not None and plot is None and not bootstrap:
        raise OodensError("--scores is read for score histograms (--plot DIR) and --bootstrap N: add one of them")

    results_dir = results or default_results_dir()
    expect_folder("--results", results_dir)
    expect_folder("--plot", plot)
    with warnings_to_stderr():  # a damaged run file: one warning line naming it, the others still report
        stored = load_frame(results_dir)
    old = superseded_runs(stored)
    if len(old) and not all_runs:
        for r in old.itertuples():
            stderr.print(f"note: {plural(r.runs, 'run')} of {mode_set_name(r.modes)} on {r.benchmark} with "
                         f"{plural(r.n_members, 'mode')} (last {r.created[:16].replace('T', ' ')}) "
                         f"{'is' if r.runs == 1 else 'are'} superseded by a later run of other modes; --all-runs "
                         "shows them", highlight=False)
        stored = stored[~stored["superseded"]].reset_index(drop=True)
    frame = filter_frame(stored, detector, strategy, modes, ood, where=str(results_dir))
    wanted_oods = names(ood) or None
    boot = None
    saved = None
    if scores is not None:
        saved = load_scores(scores, frame, member, names(detector) if detector and detector != "all" else None,
                            wanted_oods)
        if bootstrap:
            boot = bootstrap_frame(saved, frame, table_metrics, bootstrap, member, alpha, seed)

    built: list[Table] = []
    if "ood" in kinds:
        built += ood_tables(frame, table_metrics, wanted_oods, group_by, members)
    if "stats" in kinds:
        built += stats_tables(frame, table_metrics, wanted_oods, alpha)
    if "strategy" in kinds:
        built += strategy_tables(frame, table_metrics, wanted_oods)
    if "id" in kinds:
        built += quality_tables(frame, members)
    if "shift" in kinds:
        built += shift_tables(frame, members)
    if "size" in kinds:
        built += size_tables(frame, table_metrics, wanted_oods)
    if boot is not None:
        built.append(bootstrap_table(boot, bootstrap, alpha, seed))

    machine = markdown or latex or as_json or csv == "-"
    if markdown:
        print("\n".join(render_markdown(t) for t in built))
    if latex:
        print("\n".join(render_latex(t) for t in built))
    if as_json:
        print(to_json(tidy(frame, chosen or VALUES), stats_frame(frame, table_metrics, wanted_oods, alpha), boot))
    if csv is not None:
        long = tidy(frame, chosen or VALUES)
        if csv == "-":
            sys.stdout.write(long.to_csv(index=False))
        else:
            Path(csv).parent.mkdir(parents=True, exist_ok=True)
            long.to_csv(csv, index=False)
            stderr.print(f"wrote {len(long)} rows to {csv}")
    if not machine:
        for t in built:
            stdout.print(render_rich(t))
        if not built:
            stderr.print(f"no {', '.join(kinds)} table for these records (single modes have no statistics; shift "
                         "and size tables need eval --corruptions / --ensemble-size)")
    if plot is not None:
        probs = view_probs(views, list(dict.fromkeys(frame["benchmark"]))) if views is not None else None
        files = write_plots(plot, frame, table_metrics, wanted_oods, saved if plot else None, member, probs)
        stderr.print(f"wrote {len(files)} plot files to {plot}")
