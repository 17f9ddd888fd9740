"""SED on oodens: heads on one frozen backbone (oodens.modes.heads), their training (oodens.train.heads), the
ensemble-only scores distinct and ensemble-confidence, the soup row, and class masks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import oodens
from oodens.data.classes import packaged_mask, resolve_masks
from oodens.detectors import MSP, Distinct, EnsembleConfidence
from oodens.ensemble.evaluate import MemberSet, Quality, evaluate_detector, mask_views
from oodens.errors import OodensError
from oodens.modes.discovery import Mode
from oodens.modes.heads import save_heads
from oodens.train.heads import EPS, a2d_term, ensemble_weights, fit_heads, heads_loss, init_heads
from oodens.views.types import Views

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "Digits" / "CNN" / "seed-1000"
CKPT = SHIPPED / "checkpoint.pth.tar"


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------- the objective


def test_a2d_term_equals_a_naive_per_sample_loop():
    rng = np.random.default_rng(0)
    r, b, c = 4, 7, 5
    probs = softmax(rng.normal(size=(r, b, c)) * 2)
    for m in range(r):
        got = a2d_term(torch.tensor(probs), m).numpy()
        want = np.zeros(b)
        for s in range(b):
            for i in range(r):
                if i == m:
                    continue
                k = int(np.argmax(probs[i, s]))
                pi, pm = probs[i, s, k], probs[m, s, k]
                want[s] += -math.log(pi * (1 - pm) + pm * (1 - pi) + EPS)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_the_loss_weights_a2d_by_the_ensembles_ce_on_each_sample():
    rng = np.random.default_rng(1)
    n_heads, c, d, bsz = 5, 4, 3, 6
    x, y = torch.tensor(rng.normal(size=(bsz, d))), torch.tensor(rng.integers(0, c, bsz))
    weight = [torch.tensor(rng.normal(size=(c, d))) for _ in range(n_heads)]
    bias = [torch.tensor(rng.normal(size=c)) for _ in range(n_heads)]
    selected, m, lam = [1, 3], 1, 0.5
    loss, z = heads_loss(x, y, weight, bias, selected, m, lam, 1.0)
    xs, ys = x.numpy(), y.numpy()
    zs = [xs @ weight[i].numpy().T + bias[i].numpy() for i in range(n_heads)]
    ce = np.mean([-np.log(softmax(zs[i])[np.arange(bsz), ys]) for i in selected])
    p_ens = np.mean([softmax(zk) for zk in zs], axis=0)
    ce_ens = -np.log(p_ens[np.arange(bsz), ys])
    w = ce_ens / ce_ens.sum()
    p = [softmax(zs[i]) for i in selected]
    a2d = 0.0
    for s in range(bsz):  # head m = selected[1] = 3 against head selected[0] = 1
        k = int(np.argmax(p[0][s]))
        a2d += w[s] * -math.log(p[0][s, k] * (1 - p[1][s, k]) + p[1][s, k] * (1 - p[0][s, k]) + EPS)
    assert float(loss) == pytest.approx((1 - lam) * ce + lam * a2d, rel=1e-10)
    np.testing.assert_allclose(ensemble_weights(torch.tensor(np.stack(zs)), y).numpy(), w, rtol=1e-10)
    # --diversity none: the same CE weight, no diversity term
    assert float(heads_loss(x, y, weight, bias, selected, m, lam, 0.0)[0]) == pytest.approx((1 - lam) * ce, rel=1e-10)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_random_select_steps_exactly_two_heads(optimizer):
    rng = np.random.default_rng(2)
    feats, labels = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 3, 40)
    # one batch, one step: two heads move, the other eight (weight decay included) stay bit for bit
    res = fit_heads(feats, labels, 3, 10, seed=7, epochs=1, batch_size=40, optimizer=optimizer, lr=0.1,
                    weight_decay=0.01, progress=False)
    _, w0, b0 = init_heads(10, 3, 8, 7)
    moved = [i for i in range(10) if not (np.array_equal(res.weight[i], w0[i]) and np.array_equal(res.bias[i], b0[i]))]
    assert len(moved) == 2
    # several steps: every step two heads; the same seed gives the same heads, whatever the diversity draws
    a = fit_heads(feats, labels, 3, 10, seed=7, epochs=3, batch_size=8, progress=False)
    b = fit_heads(feats, labels, 3, 10, seed=7, epochs=3, batch_size=8, progress=False)
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)


# --------------------------------------------------------------------------- heads folders


def heads_folder(path: Path, n: int, seed: int = 0, features: Path | None = None) -> Path:
    """A heads folder of n random heads on the shipped digits CNN (or on precomputed features)."""
    mode = oodens.load_modes(SHIPPED)[0]
    rng = np.random.default_rng(seed)
    d = mode.load().classifier.in_features
    w, b = rng.normal(size=(n, 6, d)).astype(np.float32) * 0.3, rng.normal(size=(n, 6)).astype(np.float32)
    side = {"format": "oodens-heads", "version": 1, "dataset": "digits", "num_classes": 6,
            "feature_layer": "penultimate",
            "backbone": None if features else {"checkpoint": str(CKPT), "sha256": mode.sha256},
            "features": str(features) if features else None, "arch": "cnn", "preset": "digits",
            "heads": [{"name": f"head-{i:02d}", "seed": i, "objective": {"diversity": "none"}} for i in range(n)]}
    save_heads(path, w, b, side)
    return path


def count_head_passes(monkeypatch) -> list[int]:
    """Images through every loaded network's classifier (one per forward pass of the backbone)."""
    seen: list[int] = []
    load = Mode.load

    def counted(self):
        model = load(self)
        model.classifier.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
        return model

    monkeypatch.setattr(Mode, "load", counted)
    return seen


def test_one_backbone_pass_per_image_whatever_the_number_of_heads(tmp_path, monkeypatch):
    seen = count_head_passes(monkeypatch)
    bench = lambda: oodens.get_benchmark("digits", ood=["noise"])  # noqa: E731
    images = {}
    for n in (2, 12):
        exp = oodens.Experiment(oodens.load_modes(heads_folder(tmp_path / f"h{n}", n)), bench(),
                                cache_dir=tmp_path / f"cache{n}")
        assert len(exp.modes) == n and exp.modes.names[0] == "head-00"
        seen.clear()
        res = exp.evaluate(["msp", "pds"])
        images[n] = sum(seen)
        # the members' logits are h W_i^T + b_i of the backbone's features
        v = exp.views()
        w, b = exp.modes.heads.head(n - 1)
        last = v[f"head-{n - 1:02d}"].test
        np.testing.assert_allclose(last.logits, np.asarray(last.features) @ w.T + b, rtol=1e-6)
        assert {r["role"] for r in res.records if r["detector"] == "msp"} == {"member", "mean", "std", "soup",
                                                                              "ensemble"}
        assert not any(r["role"] == "soup" for r in res.records if r["detector"] == "pds")
    assert images[2] == images[12] == 325 + 720  # ID test + noise, each image once


def test_the_soup_is_the_averaged_head_scored_as_its_own_row(tmp_path):
    exp = oodens.Experiment(oodens.load_modes(heads_folder(tmp_path / "h", 3)),
                            oodens.get_benchmark("digits", ood=["noise"]), cache_dir=tmp_path / "cache")
    res = exp.evaluate("energy")
    soup = res.runs[0].scores["soup"]["id"]
    bank = exp.modes.heads
    h = np.asarray(exp.views()["head-00"].test.features, dtype=np.float64)
    z = h @ bank.weight.mean(0).T + bank.bias.mean(0)
    np.testing.assert_allclose(soup, np.log(np.exp(z).sum(1)), rtol=1e-5)
    rows = [r for r in res.records if r["role"] == "soup"]
    assert rows and all(r["member"] == "soup" and r["k"] == 1 for r in rows)


def export_features(exp, root: Path) -> None:
    """Every split the experiment reads as ``root/<dataset>/<split>/{features,labels}.npy``."""
    ex = exp.extract([], train=True)
    for src in exp.sources(train=True):
        v = ex.get(exp.modes.heads.key, src)
        folder = root / src.name / src.split
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "features.npy", np.asarray(v.features), allow_pickle=False)
        np.save(folder / "labels.npy", np.asarray(v.labels), allow_pickle=False)


def test_heads_on_precomputed_features_evaluate_like_heads_on_the_backbone(tmp_path):
    bench = lambda: oodens.get_benchmark("digits", ood=["noise", "letters"])  # noqa: E731
    on_backbone = oodens.Experiment(oodens.load_modes(heads_folder(tmp_path / "bb", 3, seed=5)), bench(),
                                    cache_dir=tmp_path / "cache")
    export_features(on_backbone, tmp_path / "feats")
    files = heads_folder(tmp_path / "ff", 3, seed=5, features=tmp_path / "feats")
    on_files = oodens.Experiment(oodens.load_modes(files), bench(), cache_dir=tmp_path / "cache2")
    dets = ["msp", "knn", "pds", "distinct"]
    a, b = on_backbone.evaluate(dets).records, on_files.evaluate(dets).records
    assert not list((tmp_path / "cache2").rglob("*.npy"))  # no network ran for the features
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        assert (ra["detector"], ra["member"], ra["ood"]) == (rb["detector"], rb["member"], rb["ood"])
        for k in ("auroc", "fpr95", "id_accuracy"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-9), (ra["detector"], ra["member"], ra["ood"], k)
    h5py = pytest.importorskip("h5py")
    for split in ("train", "test"):  # the HDF5 form of the same files
        with h5py.File(tmp_path / "feats" / "digits" / f"{split}.h5", "w") as f:
            f["features"] = np.load(tmp_path / "feats" / "digits" / split / "features.npy")
            f["labels"] = np.load(tmp_path / "feats" / "digits" / split / "labels.npy")
        (tmp_path / "feats" / "digits" / split / "features.npy").unlink()
    c = oodens.Experiment(oodens.load_modes(tmp_path / "ff"), bench(), cache_dir=tmp_path / "cache3").evaluate(dets)
    assert [r["auroc"] for r in c.records] == pytest.approx([r["auroc"] for r in a], abs=1e-9)


def test_heads_refuse_views_that_need_each_members_network(tmp_path):
    exp = oodens.Experiment(oodens.load_modes(heads_folder(tmp_path / "h", 2)),
                            oodens.get_benchmark("digits", ood=["noise"]), cache_dir=tmp_path / "cache")
    with pytest.raises(OodensError, match=r"odin reads the odin\[.*one shared backbone"):
        exp.evaluate("odin")
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_a_damaged_heads_folder_is_one_line_naming_it(tmp_path):
    folder = heads_folder(tmp_path / "h", 2)
    (folder / "heads.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(OodensError, match="cannot read heads file .*heads.safetensors"):
        oodens.load_modes(folder)


def test_train_heads_command_writes_a_folder_eval_reads(tmp_path, monkeypatch, capsys):
    from oodens.cli import main

    monkeypatch.setenv("OODENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OODENS_RESULTS", str(tmp_path / "results"))
    for out in ("a", "b"):
        main(["train-heads", "--backbone", str(SHIPPED), "--heads", "4", "--epochs", "3", "--out", str(tmp_path / out)])
    assert (tmp_path / "a" / "heads.safetensors").read_bytes() == (tmp_path / "b" / "heads.safetensors").read_bytes()
    side = json.loads((tmp_path / "a" / "heads.json").read_text())
    assert [h["seed"] for h in side["heads"]] == [1000000, 1000001, 1000002, 1000003]
    assert side["heads"][0]["objective"]["diversity"] == "a2d"
    assert side["backbone"]["checkpoint"].startswith("backbone/")
    capsys.readouterr()
    main(["eval", "--modes", str(tmp_path / "a"), "--detector", "msp,pds,distinct", "--ood", "noise", "--json"])
    records = json.loads(capsys.readouterr().out)
    assert {(r["detector"], r["role"]) for r in records} >= {
        ("msp", "soup"), ("msp", "ensemble"), ("pds", "ensemble"), ("distinct", "ensemble"), ("msp", "mean")}
    with pytest.raises(SystemExit) as e:
        main(["train-heads", "--backbone", str(SHIPPED), "--diversity", "dbat", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "--diversity dbat: expected one of a2d, none" in capsys.readouterr().err


# --------------------------------------------------------------------------- ensemble-only scores


def test_distinct_and_ensemble_confidence_against_hand_computations():
    z = [np.array([[2.0, 0, 0], [0, 1, 0], [0, 0, 3]]),
         np.array([[1.0, 0, 0], [0, 0, 1], [3, 0, 0]]),
         np.array([[5.0, 0, 0], [1, 0, 0], [0, 3, 0]])]
    members = [Views(logits=zk) for zk in z]
    # sample 0: all say 0 -> 1; sample 1: 1, 2, 0 -> 3; sample 2: 2, 0, 1 -> 3
    np.testing.assert_array_equal(Distinct().score_ensemble(members), [-1, -3, -3])
    p_bar = np.mean([softmax(zk) for zk in z], axis=0)
    np.testing.assert_allclose(EnsembleConfidence().score_ensemble(members), p_bar.max(1), rtol=1e-12)
    assert EnsembleConfidence().score_ensemble(members)[0] == pytest.approx(
        np.mean([np.exp(a) / (np.exp(a) + 2) for a in (2.0, 1.0, 5.0)]))


# --------------------------------------------------------------------------- class masks


def test_masking_restricts_argmax_and_scores_to_the_kept_classes():
    rng = np.random.default_rng(3)
    kept = np.array([1, 3, 4])

    def views(n, labels):
        return [Views(logits=rng.normal(size=(n, 6)) * 3, features=rng.normal(size=(n, 4)), labels=labels,
                      weight=rng.normal(size=(6, 4)), bias=rng.normal(size=6)) for _ in range(2)]

    test_labels = rng.integers(0, 6, 50)
    test = views(50, test_labels)
    shifted = views(40, rng.integers(0, 3, 40))  # labels: positions in the kept list (as ImageNet-R's)
    for a, b in zip(test, shifted):
        b.weight, b.bias = a.weight, a.bias
    masks = resolve_masks(["shifted-1"], 6, {"shifted-1": list(kept)})
    masked = {"shifted-1": [mask_views(v, kept, "shifted-1") for v in shifted]}
    sets = MemberSet(["m0", "m1"], [None, None], test, masked, {"shifted-1": "shift"}, masks=masks)
    run = evaluate_detector(MSP(), sets)
    for i, m in enumerate(["m0", "m1"]):
        np.testing.assert_allclose(run.scores[m]["shifted-1"], softmax(shifted[i].logits[:, kept]).max(1), rtol=1e-12)
        # the ID side of that set's metrics: the ID test split on the same classes
        np.testing.assert_allclose(run.scores[m]["id@shifted-1"], softmax(test[i].logits[:, kept]).max(1), rtol=1e-12)
        np.testing.assert_allclose(run.scores[m]["id"], softmax(test[i].logits).max(1), rtol=1e-12)
    q = Quality(sets)
    want = np.mean(shifted[0].logits[:, kept].argmax(1) == shifted[0].labels)
    assert q.shift["m0"]["shifted-1"] == pytest.approx(want)
    mean_logits = np.mean([v.logits[:, kept] for v in shifted], axis=0)
    assert q.shift["ensemble"]["shifted-1"] == pytest.approx(np.mean(mean_logits.argmax(1) == shifted[0].labels))
    rec = next(r for r in run.records if r["member"] == "m0" and r["ood"] == "shifted-1")
    assert rec["ood_accuracy"] == pytest.approx(want)
    masked_id = mask_views(test[0], kept, labels_are_positions=False)  # ID labels mapped into the kept classes
    assert set(np.unique(masked_id.labels)) <= {-1, 0, 1, 2} and masked_id.weight.shape == (3, 4)
    with pytest.raises(OodensError, match="labels of bad include 3, outside its 3 kept classes"):
        mask_views(Views(logits=np.zeros((2, 6)), labels=np.array([0, 3])), kept, "bad")


def test_imagenet_a_and_r_class_lists_ship_with_the_package():
    a, r = packaged_mask("ImageNet-A", 1000), packaged_mask("imagenet_r", 1000)
    assert len(a) == len(r) == 200 and len(set(a)) == len(set(r)) == 200
    assert list(a[:5]) == [6, 11, 13, 15, 17] and list(r[:5]) == [1, 2, 4, 6, 8]
    assert packaged_mask("imagenet-r", 6) is None
    assert set(resolve_masks(["imagenet-r", "Textures"], 1000)) == {"imagenet-r"}
    with pytest.raises(OodensError, match="class mask for 'nope', which is not an evaluated OOD set"):
        resolve_masks(["imagenet-r"], 1000, {"nope": [1]})
