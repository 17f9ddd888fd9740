"""The command line: eval output, JSON, saved scores, results store, and every bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.special import softmax

from oodens.archs import ARCH_FOLDERS, ARCHS
from oodens.cli import main
from oodens.metrics.ood import ood_metrics

from conftest import snapshot
from evaluation import row
from cli_runner import run

RECORD_KEYS = {"detector", "strategy", "member", "ood", "fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"}


def test_eval_table_names_modes_mean_std_ensemble_and_convention(two_modes, tmp_path, capsys):
    code, out, err = run(["eval", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    for text in ("seed-1000", "seed-1100", "mean ± std", "ensemble (2)", "digits-6789", "letters", "noise",
                 "average", "FPR95", "AUROC", "AUPR-In", "AUPR-Out", "ID acc", "ID positive"):
        assert text in out
    assert "8 extracted" in err  # msp needs no ID-train view: 2 modes x (ID test + 3 OOD sets)


def test_eval_json_records_save_scores_and_results_store(two_modes, tmp_path, capsys):
    args = ["eval", "--modes", str(two_modes), "--detector", "msp", "--json", "--cache-dir", str(tmp_path / "c"),
            "--save-scores", str(tmp_path / "scores"), "--results", str(tmp_path / "res")]
    code, out, err = run(args, capsys)
    assert code == 0, err
    recs = json.loads(out)
    assert all(RECORD_KEYS <= r.keys() for r in recs)
    members = {r["member"] for r in recs}
    assert members == {"seed-1000", "seed-1100", "mean", "std", "ensemble"}
    assert {r["ood"] for r in recs} == {"digits-6789", "letters", "noise", "average", "far"}
    assert all(0.0 <= r[k] <= 1.0 for r in recs for k in ("fpr95", "auroc", "aupr_in", "aupr_out"))

    # ensemble scores = max softmax of the averaged logits, recomputed from exported views
    code, _, _ = run(["extract", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c"),
                      "--export", str(tmp_path / "views")], capsys)
    assert code == 0
    v = tmp_path / "views"
    for ds, split in (("digits", "test"), ("noise", "test")):
        z = np.mean([np.load(v / m / ds / split / "logits.npy").astype(np.float64)
                     for m in ("seed-1000", "seed-1100")], axis=0)
        saved = np.load(tmp_path / "scores" / "msp-mean-logits" / "ensemble" / f"{ds}.npy")
        np.testing.assert_allclose(saved, softmax(z, axis=1).max(1), rtol=1e-6)
    ens = next(r for r in recs if r["member"] == "ensemble" and r["ood"] == "noise")
    ref = ood_metrics(softmax(np.mean([np.load(v / m / "digits" / "test" / "logits.npy").astype(np.float64)
                                       for m in ("seed-1000", "seed-1100")], 0), axis=1).max(1),
                      np.load(tmp_path / "scores" / "msp-mean-logits" / "ensemble" / "noise.npy"))
    assert ens["auroc"] == pytest.approx(ref["auroc"]) and ens["fpr95"] == pytest.approx(ref["fpr95"])
    # ID quality of the ensemble: its distribution is the mean of the members' softmax
    y = np.load(v / "seed-1000" / "digits" / "test" / "labels.npy")
    p_bar = np.mean([softmax(np.load(v / m / "digits" / "test" / "logits.npy").astype(np.float64), axis=1)
                     for m in ("seed-1000", "seed-1100")], axis=0)
    assert ens["id_nll"] == pytest.approx(-np.mean(np.log(p_bar[np.arange(len(y)), y])))
    assert ens["id_brier"] == pytest.approx(np.mean(((p_bar - np.eye(6)[y]) ** 2).sum(1)))

    # the results store holds this run; the same settings again replace it instead of duplicating
    runs = list((tmp_path / "res" / "runs").glob("*.json"))
    assert len(runs) == 1
    assert json.loads(runs[0].read_text())["records"][0]["detector"] == "msp"
    run(args, capsys)
    assert len(list((tmp_path / "res" / "runs").glob("*.json"))) == 1
    run(args[:4] + ["knn"] + args[5:], capsys)
    assert len(list((tmp_path / "res" / "runs").glob("*.json"))) == 2


def test_eval_defaults_use_xdg_locations(two_modes, tmp_path, capsys):
    code, _, err = run(["eval", "--modes", str(two_modes), "--detector", "energy", "--ood", "noise"], capsys)
    assert code == 0, err
    assert list((tmp_path / "xdg-cache" / "oodens" / "views").rglob("meta.json"))
    assert list((tmp_path / "xdg-data" / "oodens" / "results" / "runs").glob("*.json"))


def test_positive_ood_changes_only_fpr95(two_modes, tmp_path, capsys):
    base = ["eval", "--modes", str(two_modes), "--json", "--detector", "energy", "--cache-dir", str(tmp_path / "c")]
    _, a, _ = run(base, capsys)
    _, b, _ = run(base + ["--positive", "ood"], capsys)
    ra, rb = json.loads(a), json.loads(b)
    assert [r["auroc"] for r in ra] == [r["auroc"] for r in rb]
    assert [r["fpr95"] for r in ra] != [r["fpr95"] for r in rb]
    assert all(r["positive"] == "ood" for r in rb)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def warm_cache(two_modes, tmp_path, capsys):
    cache = tmp_path / "c"
    code, _, err = run(["extract", "--modes", str(two_modes), "--cache-dir", str(cache)], capsys)
    assert code == 0, err
    return cache


def _bad(args, cache, capsys, *expected):
    before = snapshot(cache)
    code, out, err = run(args + ["--cache-dir", str(cache)], capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("oodens: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one line, the last thing printed
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]
    assert snapshot(cache) == before, "a bad input touched the cache"
    return errors[0]


def test_missing_folder(warm_cache, tmp_path, capsys):
    _bad(["eval", "--modes", str(tmp_path / "nope")], warm_cache, capsys, "nope", "does not exist")


def test_folder_without_modes(warm_cache, tmp_path, capsys):
    (tmp_path / "empty" / "seed-1").mkdir(parents=True)
    _bad(["eval", "--modes", str(tmp_path / "empty")], warm_cache, capsys, "no modes in", "checkpoint.pth.tar")


def test_unreadable_checkpoint(warm_cache, two_modes, capsys):
    ckpt = two_modes / "seed-1100" / "checkpoint.pth.tar"
    ckpt.write_bytes(b"this is not a checkpoint at all")
    _bad(["eval", "--modes", str(two_modes)], warm_cache, capsys, f"checkpoint {ckpt} is truncated or unreadable",
         "expected a file written by torch.save")


def test_truncated_checkpoint(warm_cache, two_modes, capsys):
    ckpt = two_modes / "seed-1000" / "checkpoint.pth.tar"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    _bad(["extract", "--modes", str(two_modes)], warm_cache, capsys, f"checkpoint {ckpt} is truncated or unreadable",
         "expected a file written by torch.save")


def test_checkpoint_of_wrong_shape(warm_cache, two_modes, capsys):
    ckpt = two_modes / "seed-1000" / "checkpoint.pth.tar"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["fc.weight"] = torch.zeros(6, 64)
    torch.save(state, ckpt)
    _bad(["eval", "--modes", str(two_modes)], warm_cache, capsys, "does not fit architecture", "fc.weight")


def test_modes_with_different_class_counts(warm_cache, two_modes, capsys):
    side = two_modes / "seed-1100" / "oodens.json"
    meta = json.loads(side.read_text())
    meta["num_classes"] = 10
    side.write_text(json.dumps(meta))
    _bad(["eval", "--modes", str(two_modes)], warm_cache, capsys, "seed-1100", "num_classes", "10", "6")


def test_modes_with_different_architectures(warm_cache, two_modes, capsys, monkeypatch):
    monkeypatch.setitem(ARCHS, "other", ARCHS["cnn"])
    monkeypatch.setitem(ARCH_FOLDERS, "OTHER", "other")
    side = two_modes / "seed-1100" / "oodens.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "arch": "other"}))
    _bad(["eval", "--modes", str(two_modes)], warm_cache, capsys, "seed-1100", "arch", "'other'", "'cnn'")


def test_several_checkpoints_in_one_mode_folder(warm_cache, two_modes, capsys):
    shutil.copy(two_modes / "seed-1000" / "checkpoint.pth.tar", two_modes / "seed-1000" / "other.pt")
    shutil.copy(two_modes / "seed-1000" / "checkpoint.pth.tar", two_modes / "seed-1000" / "more.pth")
    (two_modes / "seed-1000" / "checkpoint.pth.tar").unlink()
    _bad(["eval", "--modes", str(two_modes)], warm_cache, capsys, "several checkpoints", "seed-1000")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--detector", "nosuch"], ("unknown detector 'nosuch'", "msp")),
        (["--detector", "msp,nosuch"], ("unknown detector 'nosuch'",)),
        (["--strategy", "bogus"], ("unknown strategy 'bogus'", "mean-logits")),
        (["--detector", "knn", "--strategy", "mean-logits"], ("'mean-logits' does not apply to detector 'knn'",
                                                               "concat")),
        (["--ood", "noise,mnist"], ("unknown OOD set 'mnist'", "digits-6789")),
        (["--positive", "both"], ("--positive", "id, ood")),
        (["--benchmark", "imagenet21k"], ("unknown benchmark 'imagenet21k'", "digits")),
        (["--knn-k", "100000", "--detector", "knn"], ("--knn-k 100000", "1..")),
    ],
)
def test_bad_eval_options(warm_cache, two_modes, capsys, args, expected):
    _bad(["eval", "--modes", str(two_modes)] + args, warm_cache, capsys, *expected)


def test_debug_shows_the_traceback(tmp_path):
    from oodens.errors import OodensError

    with pytest.raises(OodensError):
        main(["eval", "--modes", str(tmp_path / "nope"), "--debug"])


def test_help_lists_detector_hyperparameters(capsys):
    code, out, _ = run(["eval", "--help"], capsys)
    assert code == 0
    assert "--knn-k" in out and "--energy-temperature" in out


# ---------------------------------------------------------------- the full detector suite


def _extracted(err: str) -> int:
    return int(err.split("views: ")[1].split(" extracted")[0])


def test_detector_all_gives_finite_metrics_for_every_detector(two_modes, tmp_path, capsys):
    from oodens.detectors import DETECTORS

    code, out, err = run(["eval", "--modes", str(two_modes), "--detector", "all", "--json",
                          "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    recs = json.loads(out)
    expected = set(DETECTORS) - {"eloc"}  # shipped modes are no leave-out members
    assert {r["detector"] for r in recs} == expected
    assert "skipping eloc" in err and "kept_classes" in err
    for r in recs:
        assert all(np.isfinite(r[k]) for k in ("fpr95", "auroc", "aupr_in", "aupr_out", "detection_error")), r
    for d in expected:
        members = {r["member"] for r in recs if r["detector"] == d}
        assert "ensemble" in members
        if not DETECTORS[d].ensemble_only:
            assert {"seed-1000", "seed-1100", "mean", "std"} <= members


def test_odin_and_rankfeat_views_are_computed_lazily_once_with_params_in_the_key(two_modes, tmp_path, capsys):
    cache = tmp_path / "c"
    base = ["eval", "--modes", str(two_modes), "--cache-dir", str(cache), "--json"]
    code, _, err = run(base + ["--detector", "msp"], capsys)
    assert code == 0 and _extracted(err) == 8  # base views: 2 modes x (ID test + 3 OOD sets); no fit, no train
    _, _, err = run(base + ["--detector", "odin"], capsys)
    assert _extracted(err) == 8  # the odin view, computed on first use
    _, _, err = run(base + ["--detector", "odin,msp,knn"], capsys)
    assert _extracted(err) == 2  # only knn's ID-train base views are new
    _, _, err = run(base + ["--detector", "odin,msp,knn"], capsys)
    assert _extracted(err) == 0
    _, _, err = run(base + ["--detector", "odin", "--odin-eps", "0"], capsys)
    assert _extracted(err) == 8  # other parameters, other views
    _, _, err = run(base + ["--detector", "rankfeat", "--rankfeat-power-iters", "20"], capsys)
    assert _extracted(err) == 8
    metas = [json.loads(p.read_text()) for p in cache.rglob("meta.json")]
    odin = [m["view"]["params"] for m in metas if m["view"]["kind"] == "odin"]
    assert sorted({(p["eps"], p["temperature"]) for p in odin}) == [(0.0, 1000.0), (0.0014, 1000.0)]
    assert {m["view"]["params"]["power_iters"] for m in metas if m["view"]["kind"] == "rankfeat"} == {20}


def test_odin_eps_zero_equals_temperature_scaled_msp(two_modes, tmp_path, capsys):
    """With eps = 0 ODIN is max softmax(z / T) of the plain logits: check against the exported views."""
    base = ["--modes", str(two_modes), "--cache-dir", str(tmp_path / "c")]
    run(["extract", *base, "--export", str(tmp_path / "v")], capsys)
    code, _, err = run(["eval", *base, "--detector", "odin", "--odin-eps", "0", "--odin-temperature", "10",
                        "--save-scores", str(tmp_path / "s"), "--ood", "letters"], capsys)
    assert code == 0, err
    z = np.load(tmp_path / "v" / "seed-1100" / "letters" / "test" / "logits.npy").astype(np.float64)
    got = np.load(tmp_path / "s" / "odin-mean-logits" / "seed-1100" / "letters.npy")
    np.testing.assert_allclose(got, softmax(z / 10, axis=1).max(1), rtol=1e-5)


def test_eloc_on_ordinary_modes_is_a_clear_error(warm_cache, two_modes, capsys):
    _bad(["eval", "--modes", str(two_modes), "--detector", "eloc"], warm_cache, capsys,
         "eloc needs leave-out members", "kept_classes")


def test_ensemble_size_sweep_rows(two_modes, tmp_path, capsys):
    code, out, err = run(["eval", "--modes", str(two_modes), "--detector", "energy,mi", "--ensemble-size", "all",
                          "--json", "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    recs = json.loads(out)
    energy = {(row(r), r["ood"]): r for r in recs if r["detector"] == "energy"}
    # k = 1: the two single modes; k = 2: the one full ensemble
    for ood in ("noise", "letters"):
        singles = [energy[(m, ood)]["auroc"] for m in ("seed-1000", "seed-1100")]
        assert energy[("subsets-1-mean", ood)]["auroc"] == pytest.approx(np.mean(singles))
        assert energy[("subsets-1-std", ood)]["auroc"] == pytest.approx(np.std(singles, ddof=1))
        assert energy[("subsets-2-mean", ood)]["auroc"] == pytest.approx(energy[("ensemble", ood)]["auroc"])
        assert energy[("subsets-2-mean", ood)]["n_subsets"] == 1
    mi_members = {row(r) for r in recs if r["detector"] == "mi"}
    assert mi_members == {"ensemble", "subsets-2-mean", "subsets-2-std"}  # no k = 1 for an ensemble-only score
    code, out, _ = run(["eval", "--modes", str(two_modes), "--ensemble-size", "2", "--cache-dir",
                        str(tmp_path / "c")], capsys)
    assert code == 0 and "± —" in next(line for line in out.splitlines() if "k=2 (1 subset)" in line)  # no std


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--ensemble-size", "3"], ("--ensemble-size 3", "1..2")),
        (["--ensemble-size", "two"], ("--ensemble-size two", "'all'")),
        (["--detector", "vim", "--vim-dim", "500"], ("--vim-dim 500", "1..127")),
        (["--detector", "dice", "--dice-p", "100"], ("--dice-p 100", "[0, 100)")),
    ],
)
def test_bad_suite_options(warm_cache, two_modes, capsys, args, expected):
    _bad(["eval", "--modes", str(two_modes)] + args, warm_cache, capsys, *expected)


def test_detector_all_with_a_strategy_applies_it_where_it_fits(two_modes, tmp_path, capsys):
    code, out, err = run(["eval", "--modes", str(two_modes), "--detector", "all", "--strategy", "mean-scores",
                          "--json", "--ood", "noise", "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    strat = {r["detector"]: r["strategy"] for r in json.loads(out)}
    assert strat["knn"] == strat["msp"] == strat["vim"] == "mean-scores"
    assert strat["pds"] == "ensemble"


# ---------------------------------------------------------------- covariate shift, fit fraction, extra sets


def test_corruptions_give_shift_rows_accuracy_and_severity_averages(two_modes, tmp_path, capsys):
    base = ["--modes", str(two_modes), "--cache-dir", str(tmp_path / "c"), "--corruptions", "contrast:1,jpeg:1,jpeg:5"]
    code, out, err = run(["eval", *base, "--detector", "energy", "--json", "--ood", "noise"], capsys)
    assert code == 0, err
    recs = {(row(r), r["ood"]): r for r in json.loads(out)}
    c1 = ["digits-C/contrast-1", "digits-C/jpeg-1"]
    for member in ("seed-1000", "ensemble"):
        for k in ("auroc", "fpr95", "ood_accuracy"):
            assert recs[(member, "C-1")][k] == pytest.approx(np.mean([recs[(member, o)][k] for o in c1]))
        assert recs[(member, "C-5")]["auroc"] == pytest.approx(recs[(member, "digits-C/jpeg-5")]["auroc"])
    assert recs[("ensemble", "noise")]["kind"] == "far" and "ood_accuracy" not in recs[("ensemble", "noise")]
    assert ("ensemble", "average") not in recs  # one semantic set: no average row
    # accuracy under shift, recomputed from the exported views of the corrupted set
    run(["extract", *base, "--export", str(tmp_path / "v")], capsys)
    folder = tmp_path / "v" / "{m}" / "digits-C_jpeg-5" / "test"
    zs = [np.load(str(folder).format(m=m) + "/logits.npy") for m in ("seed-1000", "seed-1100")]
    y = np.load(str(folder).format(m="seed-1000") + "/labels.npy")
    assert recs[("seed-1100", "digits-C/jpeg-5")]["ood_accuracy"] == pytest.approx(np.mean(zs[1].argmax(1) == y))
    assert recs[("ensemble", "digits-C/jpeg-5")]["ood_accuracy"] == pytest.approx(
        np.mean(np.mean(zs, axis=0).argmax(1) == y))
    code, out, _ = run(["eval", *base, "--detector", "energy", "--ood", "noise"], capsys)
    assert "acc on set" in out and "C-5" in out


def test_fit_fraction_fits_on_a_subsample(two_modes, tmp_path, capsys):
    base = ["eval", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c"), "--detector", "knn", "--json",
            "--knn-k", "5", "--ood", "noise"]
    _, full, _ = run(base, capsys)
    code, half, err = run(base + ["--fit-fraction", "0.5"], capsys)
    assert code == 0 and _extracted(err) == 2  # the subsample is a view of its own
    assert json.loads(full) != json.loads(half)
    metas = [json.loads(p.read_text()) for p in (tmp_path / "c").rglob("meta.json")]
    fractions = {m["dataset"].get("fraction") for m in metas if m["dataset"]["split"] == "train"}
    assert fractions == {None, 0.5}
    _bad(["eval", "--modes", str(two_modes), "--fit-fraction", "0", "--detector", "knn"], tmp_path / "c", capsys,
         "--fit-fraction 0")


def test_extra_ood_sets_from_a_folder_and_an_image_list(two_modes, tmp_path, capsys):
    from datasets import write_images

    paths = write_images(tmp_path / "imgs" / "x", 7, size=(8, 8))
    lst = tmp_path / "mine.txt"
    lst.write_text("".join(f"x/{p.name} 0\n" for p in paths[:4]))
    code, out, err = run(["eval", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c"), "--json",
                          "--ood", f"noise,folder={tmp_path / 'imgs'}", "--imglist", str(lst), "--imglist-root",
                          str(tmp_path / "imgs"), "--preset", "digits"], capsys)
    assert code == 0, err
    assert {r["ood"] for r in json.loads(out)} == {"noise", "folder", "mine", "average"}
    _bad(["eval", "--modes", str(two_modes), "--ood", f"gone={tmp_path / 'nope'}"], tmp_path / "c", capsys,
         "no such file or folder")
