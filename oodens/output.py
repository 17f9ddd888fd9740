"""Rendering eval records: the terminal table and the JSON list."""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.table import Table

from oodens.evaluate import AVERAGE

COLUMNS = [("fpr95", "FPR95 ↓"), ("auroc", "AUROC ↑"), ("aupr_in", "AUPR-In ↑"), ("aupr_out", "AUPR-Out ↑"),
           ("id_accuracy", "ID acc ↑")]

CONVENTION = {
    "id": "ID positive: FPR95 = % of OOD accepted when 95% of ID is kept",
    "ood": "OOD positive (OpenOOD): FPR95 = % of ID rejected when 95% of OOD is caught",
}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def detector_table(records: list[dict]) -> Table:
    """One table for one detector x strategy: per OOD set, a row per mode, mean ± std and the ensemble."""
    first = records[0]
    params = ", ".join(f"{k}={v}" for k, v in first["params"].items())
    title = f"{first['detector']}{f' ({params})' if params else ''} · strategy {first['strategy']}"
    table = Table(title=title, caption=CONVENTION[first["positive"]] + "; values in %, std over modes",
                  box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    table.add_column("OOD set")
    table.add_column("member")
    columns = COLUMNS + ([("ood_accuracy", "acc on set ↑")] if any("ood_accuracy" in r for r in records) else [])
    for _, head in columns:
        table.add_column(head, justify="right")
    oods = list(dict.fromkeys(r["ood"] for r in records))
    for ood in oods:
        rows = [r for r in records if r["ood"] == ood]
        by_member = {r["member"]: r for r in rows}
        shown_rows = [r for r in rows if not (r["member"] == "std" or r["member"].endswith("-std"))]
        shown = False
        for r in shown_rows:
            m = r["member"]
            if m == "mean" or m.endswith("-mean"):
                std = by_member[m[: -len("mean")] + "std"]
                cells = [f"{_pct(r[k])} ± {_pct(std[k])}" if k in r else "" for k, _ in columns]
                if m == "mean":
                    label, style = "mean ± std", "italic"
                else:
                    label, style = f"k={r['ensemble_size']} ({r['n_subsets']} subsets)", "dim"
            elif m == "ensemble":
                cells = [_pct(r[k]) if k in r else "" for k, _ in columns]
                label, style = f"ensemble ({r['n_members']})", "bold"
            else:
                cells = [_pct(r[k]) if k in r else "" for k, _ in columns]
                label, style = m, None
            first = "" if shown else (f"[bold]{ood}[/]" if r["kind"] in ("average", "shift-average") else ood)
            shown = True
            table.add_row(first, label, *cells, style=style, end_section=r is shown_rows[-1])
    return table


def print_tables(records: list[dict], console: Console) -> None:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["detector"], r["strategy"]), []).append(r)
    for recs in groups.values():
        console.print(detector_table(recs))


def summary_table(records: list[dict]) -> Table:
    """One row per detector x strategy on the OOD average (or the only OOD set): modes' mean ± std vs ensemble."""
    first = records[0]
    oods = list(dict.fromkeys(r["ood"] for r in records))
    target = AVERAGE if AVERAGE in oods else oods[-1]
    sets = list(dict.fromkeys(r["ood"] for r in records if r.get("kind") not in ("average", "shift-average")))
    table = Table(title=f"summary · {target if target != AVERAGE else 'average over ' + ', '.join(sets)}",
                  caption=CONVENTION[first["positive"]] + "; values in %, mean ± std over modes",
                  box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    for head in ("detector", "strategy", "FPR95 modes", "FPR95 ens.", "AUROC modes", "AUROC ens.",
                 "AUPR-Out modes", "AUPR-Out ens."):
        table.add_column(head, justify="left" if head in ("detector", "strategy") else "right")
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        if r["ood"] == target:
            groups.setdefault((r["detector"], r["strategy"]), {})[r["member"]] = r
    for (det, strat), rows in groups.items():
        cells = []
        for k in ("fpr95", "auroc", "aupr_out"):
            mean = f"{_pct(rows['mean'][k])} ± {_pct(rows['std'][k])}" if "mean" in rows else "—"
            cells += [mean, _pct(rows["ensemble"][k])]
        table.add_row(det, strat, *cells)
    return table


def to_json(records: list[dict]) -> str:
    return json.dumps(records, indent=2)
