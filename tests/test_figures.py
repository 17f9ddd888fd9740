"""Figures of ``oodens report --plot``: page width with many detectors, names from the content (not the
order runs were stored in), the metric convention in titles, legends outside the data, and the reliability
diagram's bars against a brute-force per-bin computation. Records are synthetic run files (no model runs)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from oodens import results
from oodens.detectors import DETECTORS
from oodens.metrics import calibration as cal
from oodens.report import figures, plots
from oodens.runtime.paths import shipped_modes_dir

OODS = [("near-a", "near"), ("near-b", "near"), ("far-a", "far"), ("far-b", "far"), ("average", "average")]
METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out", "detection_error")
N_MODES = 5
MAX_PX = round(plots.PAGE_WIDTH * plots.DPI)  # 2100
MAX_PY = round(plots.MAX_HEIGHT * plots.DPI)


def _record(rng, detector, strategy, params, positive, ood, kind, **row):
    return {"detector": detector, "strategy": strategy, "params": params, "positive": positive,
            "n_members": N_MODES, "ood": ood, "kind": kind, **row,
            **{m: float(rng.uniform(0.01, 0.99)) for m in METRICS}}


def save_setting(store: Path, modes: str, detector: str, params: dict, positive: str = "id", subsets: bool = True):
    """One synthetic run file: every mode, mean, std, ensemble and (``subsets``) k-of-N rows, on 5 OOD columns."""
    strategy = "mean-logits"
    rng = np.random.default_rng(zlib.crc32(repr((modes, detector, params, positive)).encode()))
    recs = []
    for ood, kind in OODS:
        def one(**row):
            recs.append(_record(rng, detector, strategy, params, positive, ood, kind, **row))

        for i in range(N_MODES):
            one(member=f"seed-{i}", role="member", k=1)
        one(member="mean", role="mean")
        one(member="std", role="std")
        one(member="ensemble", role="ensemble", k=N_MODES)
        for k in range(1, N_MODES + 1) if subsets else ():
            for stat in ("mean", "std"):
                one(member="subsets", role="subsets", k=k, stat=stat, n_subsets=5)
    settings = {"benchmark": "digits", "modes": modes, "arch": "cnn", "fit_fraction": 1.0, "detector": detector,
                "strategy": strategy, "params": params, "positive": positive,
                "ood_sets": [o for o, k in OODS if k != "average"], "leave_out": False}
    results.save_run(store, settings, recs)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def settings_list(n_variants: int):
    """Every registered detector, plus ``n_variants`` parameter variants spread over them."""
    names = list(DETECTORS)
    out = [(d, {}) for d in names]
    out += [(names[i % len(names)], {"variant": i}) for i in range(n_variants)]
    return out


def test_many_detectors_stay_within_a_page(tmp_path, monkeypatch):
    store, modes = tmp_path / "res", str(tmp_path / "m" / "Digits" / "CNN")
    settings = settings_list(max(0, 45 - len(DETECTORS)))  # --detector all and then some: 45 rows x 5 OOD sets
    assert len(settings) >= 45 and len(DETECTORS) >= 16
    for det, params in settings:
        save_setting(store, modes, det, params)
    sizes, real = {}, plots.save

    def measure(fig, stem):  # the saved PNG is the figure's size at DPI (no tight bbox): rendered once below
        sizes[Path(stem).name] = fig
        return [Path(str(stem) + ".png")]

    monkeypatch.setattr(plots, "save", measure)
    figures.write_plots(tmp_path / "out", results.load_frame(store), ["fpr95"])
    for name, fig in sizes.items():
        w, h = fig.get_size_inches() * plots.DPI
        assert w <= MAX_PX and h <= MAX_PY, (name, w, h)
    strips = sorted(n for n in sizes if "-strip-" in n)
    # 45 rows do not fit one page-high figure: split by detector family, names say which
    assert len(strips) > 1 and not any("-all-strip-" in n for n in strips)
    families = {getattr(c, "family", "other") for c in DETECTORS.values()}
    for n in strips:
        group = n.split("-")[2]
        assert group in families or group.rsplit("_", 1)[0] in families, n
    # ensemble-size figures: one per family (more when a family has more than MAX_SERIES rows)
    size_figs = [n for n in sizes if "-size-" in n]
    assert len(size_figs) >= len(families)
    for n in size_figs:
        assert len(sizes[n].legends or [a.get_legend() for a in sizes[n].axes if a.get_legend()]) == 1
    tallest = max(strips, key=lambda n: sizes[n].get_figheight())
    (png, _) = real(sizes[tallest], tmp_path / "real" / tallest)
    assert png_size(png) == tuple(round(v) for v in sizes[tallest].get_size_inches() * plots.DPI)


def test_all_sixteen_detectors_fit_one_strip_figure(tmp_path):
    store, modes = tmp_path / "res", str(tmp_path / "m" / "Digits" / "CNN")
    for det, params in settings_list(0):
        save_setting(store, modes, det, params, subsets=False)
    files = figures.write_plots(tmp_path / "out", results.load_frame(store), ["fpr95"])
    (strip,) = [f for f in files if f.suffix == ".png"]
    assert strip.name == "digits-Digits_CNN-all-strip-fpr95-idpos.png"
    w, h = png_size(strip)
    assert w <= MAX_PX and h <= MAX_PY


def _fill(store: Path, order: list):
    for modes, det, positive in order:
        save_setting(store, modes, det, {}, positive)


def test_names_do_not_depend_on_storage_order(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "save", lambda fig, stem: [Path(str(stem) + ".png"), Path(str(stem) + ".pdf")])
    # two mode sets whose last two folders agree, both conventions, three detectors of two families
    a, b = str(tmp_path / "x" / "Digits" / "CNN"), str(tmp_path / "y" / "Digits" / "CNN")
    order = [(m, d, p) for m in (a, b) for d in ("msp", "energy", "knn") for p in ("id", "ood")]
    _fill(tmp_path / "one", order)
    _fill(tmp_path / "two", order[::-1])
    f1 = results.load_frame(tmp_path / "one")
    f2 = results.load_frame(tmp_path / "two")
    assert list(f1["modes"].drop_duplicates()) != list(f2["modes"].drop_duplicates())  # really another order
    names = []
    for frame in (f1, f2):
        names.append(sorted(p.name for p in figures.write_plots(tmp_path / "out", frame, ["fpr95", "auroc"])))
    assert names[0] == names[1]
    strips = [n for n in names[0] if "-strip-" in n and n.endswith(".png")]
    # 2 mode sets x 2 conventions x 2 metrics, none overwriting another
    assert len(strips) == len(set(strips)) == 8
    assert len({n.split("-all-")[0] for n in strips}) == 2
    assert {n.rsplit("-", 1)[1] for n in strips} == {"idpos.png", "oodpos.png"}
    sizes = {n for n in names[0] if "-size-" in n and n.endswith(".png")}
    assert len(sizes) == 2 * 2 * 2 * 2  # mode sets x conventions x metrics x families (logit, feature)
    assert any("-logit-size-" in n for n in sizes) and any("-feature-size-" in n for n in sizes)


def test_mode_slugs_are_short_distinct_and_order_free(tmp_path):
    shipped = str(shipped_modes_dir())
    a, b, c = (str(tmp_path / p / "Digits" / "CNN") for p in ("x", "y", "z"))
    got = figures.mode_slugs([a, shipped, b])
    assert got == figures.mode_slugs([b, a, shipped])
    assert got[shipped] == "shipped" and got[a] != got[b]
    assert figures.mode_slugs([c])[c] == "Digits_CNN"
    # names that only differ in characters a file name cannot keep
    d, e = str(tmp_path / "p q" / "r"), str(tmp_path / "p_q" / "r")
    got = figures.mode_slugs([d, e])
    assert got[d] != got[e]


def test_titles_carry_the_convention_and_no_install_path(tmp_path, monkeypatch):
    titles = {}

    def grab(fig, stem):
        titles[Path(stem).name] = fig._suptitle.get_text()
        return [Path(str(stem) + ".png")]

    monkeypatch.setattr(plots, "save", grab)
    shipped = str(shipped_modes_dir())
    for positive in ("id", "ood"):
        save_setting(tmp_path / "res", shipped, "msp", {}, positive)
    figures.write_plots(tmp_path / "out", results.load_frame(tmp_path / "res"), ["fpr95", "auroc"])
    for kind, group in (("strip", "all"), ("size", "logit")):
        for m in ("fpr95", "auroc"):
            t_id, t_ood = (titles[f"digits-shipped-{group}-{kind}-{m}-{c}"] for c in ("idpos", "oodpos"))
            assert "ID positive" in t_id and "OOD positive" in t_ood
            assert t_id != t_ood
            for t in (t_id, t_ood):
                assert "mode set shipped" in t and "5 modes" in t and shipped not in t.replace("\n", "")
                assert ("↓" if m == "fpr95" else "↑") in t
    assert "95% of ID is kept" in titles["digits-shipped-all-strip-fpr95-idpos"]
    assert "95% of OOD is caught" in titles["digits-shipped-all-strip-fpr95-oodpos"]


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_are_outside_the_data():
    rng = np.random.default_rng(0)
    strip = {o: {f"det{i}": (rng.uniform(0, 100, 5), 50.0) for i in range(16)} for o, _ in OODS}
    size = {o: {f"det{i}": ([1, 2, 3], [30, 20, 10], [5, 4, 0]) for i in range(8)} for o, _ in OODS}
    hist = {o: rng.normal(size=200) for o, _ in OODS[:4]}
    with plots.style():
        figs = [plots.strip_figure(strip, "FPR95 (%)", "t"), plots.ensemble_size_figure(size, "FPR95 (%)", "t"),
                plots.score_histogram_figure(rng.normal(1, size=300), hist, "t")]
    for fig in figs:
        FigureCanvasAgg(fig).draw()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends
        data_axes = [ax for ax in fig.axes if ax.axison]
        for leg in legends:
            box = leg.get_window_extent()
            assert not any(_overlap(box, ax.get_window_extent()) for ax in data_axes)
        assert fig.get_figwidth() <= plots.PAGE_WIDTH


def brute_force_bins(probs, labels, n_bins):
    """Per bin (lo, hi]: (count, accuracy) by looping over the samples."""
    counts, right = [0] * n_bins, [0] * n_bins
    for p, y in zip(probs, labels):
        c = max(p)
        b = next(i for i in range(n_bins) if c <= (i + 1) / n_bins)
        counts[b] += 1
        right[b] += int(list(p).index(c) == y)
    return {b: (counts[b], right[b] / counts[b]) for b in range(n_bins) if counts[b]}


def test_reliability_bars_are_per_bin_accuracy_with_counts():
    rng = np.random.default_rng(3)
    n, classes = 600, 10
    labels = rng.integers(0, classes, n)
    modes = {}
    for i in range(4):
        logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 6, (n, 1))
        logits[np.arange(n), labels] += rng.uniform(0, 4, n)
        modes[f"seed-{i}"] = cal.probs(logits)
    ens = np.mean(list(modes.values()), axis=0)
    truth = brute_force_bins(ens, labels, cal.ECE_BINS)
    assert len(truth) < cal.ECE_BINS  # some bins are empty (confidence >= 1/classes)
    fig = plots.reliability_figure(cal.reliability(ens, labels), {k: cal.reliability(p, labels) for k, p in
                                                                  modes.items()},
                                   cal.ece(ens, labels), {k: cal.ece(p, labels) for k, p in modes.items()}, "t")
    (ax,) = [a for a in fig.axes if a.axison]
    width = 1 / cal.ECE_BINS
    bars = {round(p.get_x() / width): p for p in ax.patches if p.get_gid() == "ensemble-bar"}
    assert set(bars) == set(truth)  # empty bins have no bar
    for b, (count, acc) in truth.items():
        assert bars[b].get_height() == pytest.approx(acc)
        assert bars[b].get_width() == pytest.approx(width) and bars[b].get_x() == pytest.approx(b * width)
    counts = {round((t.get_position()[0] - width / 2) / width): int(t.get_text()) for t in ax.texts
              if t.get_gid() == "bin-count"}
    assert counts == {b: c for b, (c, _) in truth.items()}
    # the modes: per bin with enough samples in every contributing mode, mean and range of their accuracies
    (modes_bar,) = [c for c in ax.containers if c not in (ax.containers[0],)]
    centers = modes_bar.lines[0].get_xdata()
    for x, y in zip(centers, modes_bar.lines[0].get_ydata()):
        b = round((x - width / 2) / width)
        accs = [a for bins in (brute_force_bins(p, labels, cal.ECE_BINS) for p in modes.values())
                if b in bins and bins[b][0] >= plots.MIN_BIN_COUNT for a in [bins[b][1]]]
        assert y == pytest.approx(np.mean(accs))
    title = fig._suptitle.get_text() + " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert f"ECE {100 * cal.ece(ens, labels):.2f}%" in title
    assert fig.get_figwidth() <= plots.PAGE_WIDTH


def test_score_histogram_names_keep_hyphenated_detectors(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "save", lambda fig, stem: [Path(str(stem) + ".png")])
    save_setting(tmp_path / "res", str(tmp_path / "m" / "Digits" / "CNN"), "mahalanobis-ml", {}, subsets=False)
    rng = np.random.default_rng(0)
    saved = {"mahalanobis-ml-mean-logits": (rng.normal(size=50), {"far-a": rng.normal(size=40)})}
    files = figures.write_plots(tmp_path / "out", results.load_frame(tmp_path / "res"), [], scores=saved)
    assert [f.name for f in files] == ["digits-Digits_CNN-mahalanobis_ml-mean_logits-scores-ensemble.png"]
