"""Datasets in their real on-disk formats, benchmarks, corruptions and the data flags."""

from __future__ import annotations

import colorsys
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from oodens.data import get_benchmark, get_preset
from oodens.data.corruptions import CORRUPTIONS, CorruptedSource, parse_corruptions
from oodens.data.sources import ArraySource, CifarSource, SubsetSource, SvhnSource, image_folder, image_list
from oodens.errors import OodensError

from datasets import write_cifar, write_cifar_benchmark, write_images, write_svhn


def _batch(source, preset_name):
    x, y = next(iter(source.loader(get_preset(preset_name), batch_size=10_000)))
    return x.numpy(), y.numpy()


def _by_hand(img_hwc_uint8, preset_name):
    p = get_preset(preset_name)
    x = img_hwc_uint8.astype(np.float64) / 255.0
    return ((x - np.array(p.mean)) / np.array(p.std)).transpose(2, 0, 1)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_python_format_reads_back_pixel_exact(tmp_path, num_classes):
    xtr, ytr, xte, yte = write_cifar(tmp_path, num_classes)
    folder = tmp_path / f"CIFAR{num_classes}"
    train = CifarSource("c", "train", folder, num_classes)
    test = CifarSource("c", "test", folder, num_classes)
    assert len(train) == len(xtr) and len(test) == len(xte)
    np.testing.assert_array_equal(train.labels, ytr)
    x, y = _batch(test, "cifar")
    np.testing.assert_array_equal(y, yte)
    for i in (0, 7, len(xte) - 1):
        np.testing.assert_allclose(x[i], _by_hand(xte[i], "cifar"), atol=1e-5)


def test_cifar_reader_refuses_code_in_a_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": Evil(), "labels": []}, f)
    src = CifarSource("c", "test", tmp_path, 10)
    with pytest.raises(OodensError, match="not allowed"):
        len(src)
    assert not (tmp_path / "pwned").exists()


def test_svhn_mat_is_transposed_to_images(tmp_path):
    x = write_svhn(tmp_path / "test_32x32.mat", n=9)
    src = SvhnSource("SVHN", "test", tmp_path / "test_32x32.mat")
    assert len(src) == 9 and (src.labels == -1).all()
    xb, _ = _batch(src, "cifar")
    np.testing.assert_allclose(xb[4], _by_hand(x[4], "cifar"), atol=1e-5)


def test_image_folder_sorted_labelled_and_preset_geometry(tmp_path):
    paths = write_images(tmp_path / "val", 6, size=(300, 260), classes=["n01", "n02"], suffix=".jpg")
    src = image_folder("imagenet", "test", tmp_path / "val", labelled=True)
    assert [p for p, _ in src.items] == sorted(paths)
    assert [lab for _, lab in src.items] == [0 if p.parent.name == "n01" else 1 for p in sorted(paths)]
    xb, _ = _batch(src, "imagenet")
    assert xb.shape == (6, 3, 224, 224)
    # by hand: resize shorter side to 256, center crop 224 (PIL bilinear), normalise
    with Image.open(sorted(paths)[0]) as im:
        w, h = im.size
        s = 256 / min(w, h)
        r = im.convert("RGB").resize((round(w * s), round(h * s)), Image.BILINEAR)
        left, top = round((r.size[0] - 224) / 2), round((r.size[1] - 224) / 2)
        ref = np.asarray(r.crop((left, top, left + 224, top + 224)))
    np.testing.assert_allclose(xb[0], _by_hand(ref, "imagenet"), atol=1e-5)
    unlabelled = image_folder("LSUN", "test", tmp_path / "val", labelled=False)
    assert (unlabelled.labels == -1).all()


def test_openood_image_list(tmp_path):
    paths = write_images(tmp_path / "images" / "ood", 5, size=(32, 32))
    lst = tmp_path / "benchmark_imglist" / "test_ood.txt"
    lst.parent.mkdir()
    lst.write_text("".join(f"{p.relative_to(tmp_path / 'images')} 0\n" for p in reversed(paths)) + "\n")
    src = image_list("mnist", "test", lst, tmp_path / "images")
    assert [p for p, _ in src.items] == list(reversed(paths)) and (src.labels == -1).all()
    xb, _ = _batch(src, "cifar")
    np.testing.assert_allclose(xb[0], _by_hand(np.asarray(Image.open(paths[-1])), "cifar"), atol=1e-5)
    lst.write_text("ood/missing.png 0\n")
    with pytest.raises(OodensError, match="missing.png does not exist"):
        image_list("mnist", "test", lst, tmp_path / "images")


def test_fingerprints_follow_the_files(tmp_path):
    write_images(tmp_path / "a", 3)
    f1 = image_folder("a", "test", tmp_path / "a", False).fingerprint
    assert image_folder("a", "test", tmp_path / "a", False).fingerprint == f1
    write_images(tmp_path / "a" / "more", 1, seed=9)
    assert image_folder("a", "test", tmp_path / "a", False).fingerprint != f1


def test_fit_fraction_subsample_is_seeded_and_sorted():
    base = ArraySource("x", "train", lambda: (np.random.default_rng(0).random((100, 1, 4, 4)), np.arange(100)))
    a, b = SubsetSource(base, 0.3), SubsetSource(base, 0.3)
    assert len(a) == 30 and (a.index == b.index).all() and (np.diff(a.index) > 0).all()
    np.testing.assert_array_equal(a.labels, np.arange(100)[a.index])
    assert a.identity()["fingerprint"] != base.identity()["fingerprint"]
    with pytest.raises(OodensError, match="fit-fraction"):
        SubsetSource(base, 1.5)


# ---------------------------------------------------------------- benchmarks


def test_cifar_benchmark_names_present_and_missing_sets(tmp_path):
    write_cifar_benchmark(tmp_path, ("SVHN", "LSUN", "Texture"))
    b = get_benchmark("cifar10", tmp_path)
    assert list(b.ood_factories) == ["SVHN", "LSUN", "Texture"]
    assert set(b.missing) == {"LSUN_resize", "iSUN", "places365"}
    assert len(b.id_train) == 60 and len(b.id_test) == 30 and len(b.ood["Texture"]) == 12
    with pytest.raises(OodensError, match="iSUN.*not on disk"):
        b.select_ood(["iSUN"])


def test_one_table_of_dataset_facts(tmp_path):
    """Every spelling in use finds the same facts, and the benchmarks built from them agree."""
    from oodens.data import DATASETS, find_dataset

    for name, facts in DATASETS.items():
        for spelling in (name, facts.folder, facts.folder.upper(), facts.folder.lower()):
            assert find_dataset(spelling) is facts
        assert get_preset(facts.preset).name == facts.preset
    assert find_dataset("mnist") is None
    assert get_benchmark("digits").num_classes == DATASETS["digits"].num_classes
    write_cifar_benchmark(tmp_path, ("SVHN",))
    assert get_benchmark("cifar10", tmp_path).num_classes == 10
    assert get_benchmark("CIFAR10", tmp_path).kinds == {"SVHN": "far"}


def test_benchmark_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(OodensError, match="needs a data root"):
        get_benchmark("cifar10", None)
    with pytest.raises(OodensError, match="CIFAR10"):
        get_benchmark("cifar10", tmp_path)
    write_cifar(tmp_path, 10)
    with pytest.raises(OodensError, match="no OOD set on disk"):
        get_benchmark("cifar10", tmp_path).select_ood(None)
    with pytest.raises(OodensError, match="imagenet"):
        get_benchmark("imagenet", tmp_path)


# ---------------------------------------------------------------- corruptions


def _img(seed=0, shape=(16, 16, 3)):
    return np.random.default_rng(seed).random(shape)


def test_contrast_and_brightness_match_their_definitions():
    x = _img()
    for s, c in zip(range(1, 6), (0.4, 0.3, 0.2, 0.1, 0.05)):
        m = x.mean(axis=(0, 1))
        np.testing.assert_allclose(CORRUPTIONS["contrast"](x, s, None), np.clip((x - m) * c + m, 0, 1))
    for s, c in zip(range(1, 6), (0.1, 0.2, 0.3, 0.4, 0.5)):
        got = CORRUPTIONS["brightness"](x, s, None)
        for i, j in ((0, 0), (3, 7), (15, 15)):
            h, sat, v = colorsys.rgb_to_hsv(*x[i, j])
            np.testing.assert_allclose(got[i, j], colorsys.hsv_to_rgb(h, sat, min(1.0, v + c)), atol=1e-12)


def test_pixelate_is_block_average_and_jpeg_roundtrips():
    x = _img(1, (20, 20, 3))
    got = CORRUPTIONS["pixelate"](x, 2, None)  # 20 -> 10 -> 20 with box filters: 2x2 block means
    q = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).astype(np.float64)
    blocks = q.reshape(10, 2, 10, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(got * 255, np.repeat(np.repeat(blocks, 2, 0), 2, 1), atol=1.0)
    j = CORRUPTIONS["jpeg"](x, 5, None)
    assert j.shape == x.shape and 0 < np.abs(j - x).mean() < 0.3


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_is_deterministic_and_grows_with_severity(name):
    base = ArraySource("digits", "test", lambda: (np.random.default_rng(3).random((6, 3, 24, 24)).astype(np.float32),
                                                  np.arange(6)))
    dist = []
    for s in range(1, 6):
        a, b = CorruptedSource(base, name, s), CorruptedSource(base, name, s)
        xa, xb = a.item(2)[0].numpy(), b.item(2)[0].numpy()
        np.testing.assert_array_equal(xa, xb)
        assert xa.shape == (3, 24, 24) and xa.min() >= 0 and xa.max() <= 1
        dist.append(np.mean([np.abs(a.item(i)[0].numpy() - base.arrays[0][i]).mean() for i in range(6)]))
        assert a.item(2)[1] == 2  # labels kept
    assert dist[-1] > dist[0], dist


def test_parse_corruptions():
    assert parse_corruptions("jpeg:3,contrast") == [("jpeg", 3)] + [("contrast", s) for s in range(1, 6)]
    assert len(parse_corruptions("all")) == 8 * 5
    with pytest.raises(OodensError, match="unknown corruption 'fog'"):
        parse_corruptions("fog")
    with pytest.raises(OodensError, match="severity"):
        parse_corruptions("jpeg:9")


def test_config_file_data_root(tmp_path, monkeypatch):
    from oodens.data import data_root

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("OODENS_DATA", raising=False)
    assert data_root(None) is None
    (tmp_path / "cfg" / "oodens").mkdir(parents=True)
    (tmp_path / "cfg" / "oodens" / "config.toml").write_text(f'data_root = "{tmp_path / "d"}"\n')
    assert data_root(None) == tmp_path / "d"
    monkeypatch.setenv("OODENS_DATA", str(tmp_path / "env"))
    assert data_root(None) == tmp_path / "env"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
