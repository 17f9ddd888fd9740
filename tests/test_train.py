"""oodens train: layout, sidecar, bit-identical weights for the same seed."""

import json

import torch

from oodens.cli import main
from oodens.train import train


def test_same_seed_bit_identical_other_seed_differs(tmp_path):
    a, b, c = (train(seed, epochs=2, out=tmp_path / name).paths[0] for seed, name in ((7, "a"), (7, "b"), (8, "c")))
    assert a.read_bytes() == b.read_bytes()
    sa = torch.load(a, weights_only=True)["state_dict"]
    sc = torch.load(c, weights_only=True)["state_dict"]
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_cli_train_writes_reference_layout_and_sidecar(tmp_path, capsys):
    try:
        main(["train", "--seed", "3", "--epochs", "3", "--out", str(tmp_path)])
    except SystemExit as e:
        assert e.code == 0
    folder = tmp_path / "Digits" / "CNN" / "seed-3"
    ckpt = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    assert set(ckpt) == {"state_dict"}
    assert ckpt["state_dict"]["fc.weight"].shape == (6, 128)
    side = json.loads((folder / "oodens.json").read_text())
    assert side["arch"] == "cnn" and side["dataset"] == "digits" and side["num_classes"] == 6
    assert side["seed"] == 3 and side["preset"] == "digits" and side["train"]["epochs"] == 3
    assert 0.5 < side["test_accuracy"] <= 1.0  # 3 epochs already learn digits 0-5
