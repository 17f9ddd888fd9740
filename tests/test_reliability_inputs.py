"""Bad inputs found by the fault campaign (issue "Trust"): each is exit 2 with one line naming the culprit and
what was expected, and touches nothing cached or stored. Every case runs through the command line."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch


from conftest import snapshot
from datasets import write_cifar, write_images
from cli_runner import run


def _one_line_error(code, out, err, *expected) -> str:
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("oodens: error:"), err  # nothing else: no traceback, no warning
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _stores(tmp_path) -> dict:
    """Everything cached or stored: the cache given with --cache-dir and the default results store (advisory
    per-view lock files, which hold no data, aside)."""
    return {where: {k: v for k, v in snapshot(folder).items() if not k.endswith(".lock")}
            for where, folder in (("cache", tmp_path / "c"), ("results", tmp_path / "xdg-data"))}


def _bad(args, tmp_path, capsys, *expected) -> str:
    before = _stores(tmp_path)
    line = _one_line_error(*run(args + ["--cache-dir", str(tmp_path / "c")], capsys), *expected)
    assert _stores(tmp_path) == before, "a bad input touched the cache or the results store"
    return line


@pytest.fixture
def warm(two_modes, tmp_path, capsys):
    code, _, err = run(["extract", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    return two_modes


# ---------------------------------------------------------------- 1. training hyperparameters and divergence


@pytest.mark.parametrize("args, expected", [
    (["--lr", "nan"], "--lr nan: expected a finite learning rate > 0"),
    (["--lr", "inf"], "--lr inf: expected a finite learning rate > 0"),
    (["--lr", "-0.1"], "--lr -0.1: expected a finite learning rate > 0"),
    (["--lr", "0"], "--lr 0: expected a finite learning rate > 0"),
    (["--epochs", "0"], "--epochs 0: expected a whole number of epochs >= 1"),
    (["--epochs", "-3"], "--epochs -3: expected"),
    (["--batch-size", "0"], "--batch-size 0: expected a whole number of samples >= 1"),
    (["--members", "2", "--lambda", "nan"], "--lambda nan: expected a finite diversity weight >= 0"),
    (["--members", "2", "--lambda", "-1"], "--lambda -1: expected a finite diversity weight >= 0"),
    (["--members", "2", "--lambda", "inf"], "--lambda inf: expected"),
])
def test_train_refuses_non_finite_or_out_of_range_hyperparameters(tmp_path, capsys, args, expected):
    out = tmp_path / "save"
    _one_line_error(*run(["train", "--seed", "1", "--out", str(out)] + args, capsys), expected)
    assert not out.exists(), "a refused run wrote something"


def test_train_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "save"
    line = _one_line_error(*run(["train", "--seed", "1", "--epochs", "2", "--lr", "1e6", "--out", str(out)], capsys),
                           "training diverged", "epoch 1, step", "--lr 1e+06", "no checkpoint saved")
    assert "nan" in line or "inf" in line
    assert not [p for p in out.rglob("*") if p.is_file()], "a diverged run saved a checkpoint or state"


# ---------------------------------------------------------------- 2. resume state is no mode


def test_finished_training_removes_its_resume_state_and_discovery_ignores_it(tmp_path, capsys):
    out = tmp_path / "save"
    for seed in ("3", "4"):
        code, _, err = run(["train", "--seed", seed, "--epochs", "1", "--out", str(out)], capsys)
        assert code == 0, err
    set_dir = out / "Digits" / "CNN"
    assert sorted(p.name for p in set_dir.iterdir()) == ["seed-3", "seed-4"]  # no seed-S.last.pth left
    # an unfinished run's state beside the modes (as --resume needs it) is no mode and no second checkpoint
    from oodens.train.loop import train

    stopped = train(5, epochs=2, out=out, stop_after=1)
    shutil.copy(stopped.state, set_dir / "seed-6.last.pth")
    assert stopped.state.parent == set_dir and stopped.state.is_file()
    code, _, err = run(["extract", "--modes", str(set_dir), "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    assert "2 modes" in err
    # the parent folder: its CNN/ holds only resume states, which are no checkpoints of a mode
    line = _bad(["extract", "--modes", str(out / "Digits")], tmp_path, capsys, "no modes in")
    assert "several checkpoints" not in line


# ---------------------------------------------------------------- 3. sidecars


def test_sidecar_contradicting_its_path_is_an_error_naming_both(two_modes, tmp_path, capsys):
    wrong = tmp_path / "elsewhere" / "CIFAR10" / "R18"
    shutil.copytree(two_modes, wrong)  # sidecars say dataset digits, arch cnn
    side = wrong / "seed-1000" / "oodens.json"
    _bad(["eval", "--modes", str(wrong)], tmp_path, capsys, str(side), "dataset 'digits'", "says 'CIFAR10'",
         "expected them to agree")
    meta = json.loads(side.read_text())
    for s in ("seed-1000", "seed-1100"):  # the dataset agrees now, the arch still does not
        (wrong / s / "oodens.json").write_text(json.dumps({**meta, "dataset": "CIFAR10"}))
    _bad(["eval", "--modes", str(wrong)], tmp_path, capsys, str(side), "arch 'cnn'", "'R18'", "expected them to agree")


@pytest.mark.parametrize("content, expected", [
    ("[1, 2, 3]", ("is a list", "expected a JSON object")),
    ('"cnn"', ("is a string", "expected a JSON object")),
    (None, ("num_classes is \"six\" (a string)", "expected a positive integer")),
    ("arch", ("arch is 5 (an integer)", "expected a string")),
    ("kept", ("kept_classes is", "expected a list of class indices")),
    ("zero", ("num_classes is 0", "expected a positive integer")),
])
def test_sidecar_of_wrong_shape_names_file_key_and_type(two_modes, tmp_path, capsys, content, expected):
    side = two_modes / "seed-1100" / "oodens.json"
    meta = json.loads(side.read_text())
    if content is None:
        content = json.dumps({**meta, "num_classes": "six"})
    elif content == "arch":
        content = json.dumps({**meta, "arch": 5})
    elif content == "kept":
        content = json.dumps({**meta, "kept_classes": "0,1"})
    elif content == "zero":
        content = json.dumps({**meta, "num_classes": 0})
    side.write_text(content)
    _bad(["eval", "--modes", str(two_modes)], tmp_path, capsys, f"sidecar {side}", *expected)


# ---------------------------------------------------------------- 4. checkpoints


def test_non_finite_weights_name_checkpoint_tensor_and_count(warm, tmp_path, capsys):
    ckpt = warm / "seed-1000" / "checkpoint.pth.tar"
    state = torch.load(ckpt, weights_only=True)
    w = state["state_dict"]["fc.weight"]
    w.view(-1)[:3] = float("nan")
    w.view(-1)[5] = float("inf")
    torch.save(state, ckpt)
    _bad(["eval", "--modes", str(warm)], tmp_path, capsys, str(ckpt), "fc.weight", f"4 of {w.numel()}",
         "NaN or Inf", "expected finite")


def test_truncated_checkpoint_says_truncated_and_why(warm, tmp_path, capsys):
    ckpt = warm / "seed-1000" / "checkpoint.pth.tar"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 10])  # torch's own message here is only "[Errno 22] Invalid argument"
    line = _bad(["eval", "--modes", str(warm)], tmp_path, capsys, f"checkpoint {ckpt} is truncated or unreadable (",
                "expected a file written by torch.save")
    assert "Errno 22" in line or "Error" in line  # the underlying reason is kept


def test_legacy_format_checkpoint_loads_without_torch_warnings(two_modes, tmp_path, capsys, monkeypatch):
    ckpt = two_modes / "seed-1100" / "checkpoint.pth.tar"
    state = torch.load(ckpt, weights_only=True)
    torch.save(state, ckpt, _use_new_zipfile_serialization=False)
    real_load = torch.load

    def noisy_load(*a, **k):  # torch releases warn on some legacy files; make sure no such warning gets out
        warnings.warn("legacy format: torch warning", UserWarning)
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", noisy_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(["extract", "--modes", str(two_modes), "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    assert not [w for w in caught if "legacy format" in str(w.message)]
    assert "warn" not in err.lower()
    # a legacy file cut short: the one line, and still no warning
    ckpt.write_bytes(ckpt.read_bytes()[:4000])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bad(["eval", "--modes", str(two_modes)], tmp_path, capsys, "is truncated or unreadable")
    assert not [w for w in caught if "legacy format" in str(w.message)]


# ---------------------------------------------------------------- 5. CIFAR batches with bytes keys


def _resave_with_bytes_keys(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        with open(f, "wb") as fh:  # as a Python 3 script re-saving the batches writes them
            pickle.dump({k.encode(): v for k, v in d.items()}, fh)


def test_cifar_batches_with_bytes_keys_are_read(tmp_path, capsys):
    from oodens.data.sources import CifarSource

    xtr, ytr, xte, yte = write_cifar(tmp_path / "data", 10, n_train=40, n_test=10)
    _resave_with_bytes_keys(tmp_path / "data" / "CIFAR10" / "cifar-10-batches-py")
    src = CifarSource("c", "train", tmp_path / "data" / "CIFAR10", 10)
    np.testing.assert_array_equal(src.arrays[0], xtr)
    np.testing.assert_array_equal(src.labels, ytr)
    code, _, err = run(["train", "--dataset", "CIFAR10", "--arch", "R18", "--seed", "1", "--epochs", "1",
                        "--batch-size", "20", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "save"),
                        "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "save" / "CIFAR10" / "R18" / "seed-1" / "epoch150.pth").is_file()


def test_cifar_batch_without_its_keys_names_file_and_key(tmp_path, capsys):
    write_cifar(tmp_path / "data", 10, n_train=20, n_test=10)
    folder = tmp_path / "data" / "CIFAR10" / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"pixels": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, fh)
    _one_line_error(*run(["train", "--dataset", "CIFAR10", "--arch", "R18", "--seed", "1", "--epochs", "1",
                          "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "save")], capsys),
                    str(folder / "data_batch_1"), "no 'data' key", "expected data and labels")
    assert not (tmp_path / "save").exists()


# ---------------------------------------------------------------- 6. a corrupt image in a DataLoader worker


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_one_line_naming_the_file_also_from_workers(warm, tmp_path, capsys, workers):
    folder = tmp_path / "imgs"
    write_images(folder, 5, size=(8, 8))
    bad = folder / "img_002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _bad(["eval", "--modes", str(warm), "--detector", "msp", "--ood", f"noise,folder={folder}", "--preset", "digits",
          "--workers", workers], tmp_path, capsys, f"cannot read image {bad}", "expected an image file")


def test_worker_error_keeps_the_original_message_only():
    from oodens.data.sources import LoadError

    try:
        raise LoadError("cannot read image /x/y.png: broken (expected an image file PIL can decode)")
    except LoadError:
        from torch._utils import ExceptionWrapper

        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(LoadError) as e:
        wrapped.reraise()
    assert str(e.value) == "cannot read image /x/y.png: broken (expected an image file PIL can decode)"
