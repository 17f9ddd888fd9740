"""The report: tables from the results store (:mod:`oodens.report.tables`) and plots
(:mod:`oodens.report.plots`, matplotlib, imported when plots are asked for)."""

from oodens.report.tables import (DEFAULT_METRICS, GROUP_BY, TABLES, Table, bootstrap_frame, bootstrap_table,
                                  detector_tables, filter_frame, ood_tables, parse_metrics, quality_tables,
                                  render_latex, render_markdown, render_rich, shift_tables, size_tables,
                                  stats_frame, stats_tables, strategy_tables, summary_table, to_json)
from oodens.report.figures import view_probs, write_plots

__all__ = ["DEFAULT_METRICS", "GROUP_BY", "TABLES", "Table", "bootstrap_frame", "bootstrap_table",
           "detector_tables", "filter_frame", "ood_tables", "parse_metrics", "quality_tables", "render_latex",
           "render_markdown", "render_rich", "shift_tables", "size_tables", "stats_frame", "stats_tables",
           "strategy_tables", "summary_table", "to_json", "view_probs", "write_plots"]
