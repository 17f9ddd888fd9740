"""End to end on real on-disk formats: reference-layout checkpoints, CIFAR/SVHN/folders, the DICE fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from oodens.archs import create_model
from oodens.data import get_preset
from oodens.detectors.shaping import dice_mask
from oodens.modes.checkpoints import read_state_dict

from datasets import write_cifar, write_cifar_benchmark, write_images
from cli_runner import run

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dice-densenet-bc100-cifar10"


def _save_reference_modes(root: Path, arch: str, dataset: str, num_classes: int, name: str, prefix: str = ""):
    """Random-weight modes in the mode-ensemble paper's layout (no sidecar)."""
    for seed in (1000, 1100):
        torch.manual_seed(seed)
        model = create_model(arch, num_classes).eval()
        folder = root / dataset / arch / f"seed-{seed}"
        folder.mkdir(parents=True)
        state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, "epoch": 150}, folder / name)
    return root / dataset / arch


def test_cifar10_r18_reference_layout_end_to_end(tmp_path, capsys):
    write_cifar_benchmark(tmp_path / "data", ("SVHN", "LSUN", "Texture"))
    modes = _save_reference_modes(tmp_path / "save", "R18", "CIFAR10", 10, "epoch150.pth")
    args = ["--modes", str(modes), "--benchmark", "cifar10", "--data-root", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "c"), "--batch-size", "16"]
    code, out, err = run(["eval", *args, "--detector", "msp,knn", "--knn-k", "5", "--json"], capsys)
    assert code == 0, err
    assert "not on disk, skipped" in err and "LSUN_resize" in err and "iSUN" in err and "places365" in err
    recs = json.loads(out)
    assert {r["ood"] for r in recs} == {"SVHN", "LSUN", "Texture", "average"}
    assert {r["member"] for r in recs} == {"seed-1000", "seed-1100", "mean", "std", "ensemble"}
    assert all(np.isfinite(r["auroc"]) for r in recs)
    # the views are what the network computes on the images, normalised by hand with the cifar preset
    code, _, err = run(["extract", *args, "--export", str(tmp_path / "v")], capsys)
    assert code == 0, err
    _, _, xte, yte = write_cifar(tmp_path / "again", 10)  # same seed: the same test images
    p = get_preset("cifar")
    x = torch.tensor((xte[:8] / 255.0 - np.array(p.mean)) / np.array(p.std), dtype=torch.float32).permute(0, 3, 1, 2)
    torch.manual_seed(1100)
    model = create_model("R18", 10).eval()
    model.load_state_dict(read_state_dict(modes / "seed-1100" / "epoch150.pth"))
    with torch.no_grad():
        z = model(x).numpy()
    got = np.load(tmp_path / "v" / "seed-1100" / "cifar10" / "test" / "logits.npy")
    np.testing.assert_allclose(got[:8], z, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.load(tmp_path / "v" / "seed-1100" / "cifar10" / "test" / "labels.npy"), yte)
    assert np.load(tmp_path / "v" / "seed-1000" / "SVHN" / "test" / "features.npy").shape == (20, 512)


def test_imagenet_folders_with_dataparallel_checkpoints(tmp_path, capsys):
    data = tmp_path / "data"
    write_images(data / "imagenet" / "val", 6, size=(80, 64), classes=["n01", "n02", "n03"], suffix=".jpg")
    write_images(data / "ood_data" / "iNaturalist" / "images", 4, size=(70, 90), suffix=".jpg")
    modes = _save_reference_modes(tmp_path / "save", "R50", "ImageNet", 1000, "checkpoint.pth.tar", "module.")
    code, out, err = run(["eval", "--modes", str(modes), "--data-root", str(data), "--detector", "energy,odin",
                          "--odin-temperature", "500", "--json", "--cache-dir", str(tmp_path / "c"), "--batch-size", "4"], capsys)
    assert code == 0, err
    recs = json.loads(out)
    assert {r["ood"] for r in recs} == {"iNaturalist"} and recs[0]["benchmark"] == "imagenet"
    assert "SUN" in err and "Places" in err  # the missing sets are named once
    # ImageNet's paper defaults (DESIGN.md section 5): ODIN's perturbation off; a flag given explicitly wins
    params = {r["detector"]: r["params"] for r in recs}
    assert params["odin"]["eps"] == 0.0 and params["odin"]["temperature"] == 500.0


def test_dice_fixture_through_the_extraction_path(tmp_path, capsys):
    if not FIXTURE.is_dir():
        pytest.skip("../shared/fixtures is not here (a user's clone)")
    write_cifar_benchmark(tmp_path / "data", ("SVHN",))
    args = ["--modes", str(FIXTURE), "--arch", "DNBC100", "--num-classes", "10", "--preset", "cifar-dice",
            "--benchmark", "cifar10", "--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c"),
            "--batch-size", "32"]
    code, _, err = run(["extract", *args, "--export", str(tmp_path / "v")], capsys)
    assert code == 0, err
    feats = np.load(tmp_path / "v" / FIXTURE.name / "cifar10" / "test" / "features.npy")
    assert feats.shape == (30, 342) and (feats >= 0).all()
    # the head cached by extraction is the checkpoint's fc; with the published train-feature mean
    # it gives DICE's published threshold and mask
    head = next(p for p in (tmp_path / "c").rglob("weight.npy"))
    w = np.load(head)
    np.testing.assert_array_equal(w, read_state_dict(FIXTURE / "checkpoint_100.pth.tar")["fc.weight"].numpy())
    mask, threshold = dice_mask(np.load(FIXTURE / "train_feature_mean.npy"), w, 90)
    assert abs(threshold - 0.015367) < 5e-7 and mask.sum() == 342
    assert mask.sum(axis=1).tolist() == [39, 32, 36, 40, 38, 38, 31, 29, 26, 33]
    code, out, err = run(["eval", *args, "--detector", "dice,energy", "--json"], capsys)
    assert code == 0, err
    assert {r["detector"] for r in json.loads(out)} == {"dice", "energy"}


def test_contradicting_flag_and_unknown_arch_are_errors(tmp_path, capsys):
    modes = _save_reference_modes(tmp_path / "save", "R18", "CIFAR10", 10, "epoch150.pth")
    code, _, err = run(["eval", "--modes", str(modes), "--arch", "WRN28X10"], capsys)
    assert code == 2 and "--arch WRN28X10 contradicts the path" in err
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save({"state_dict": create_model("R18", 10).state_dict()}, lone / "model.pt")
    code, _, err = run(["eval", "--modes", str(lone)], capsys)
    assert code == 2 and "cannot tell the architecture" in err and "--arch" in err
