"""Decode once for all modes (issue 17): the views equal one mode at a time byte for byte, each image is
decoded once whatever the number of modes, ``modes_at_once`` bounds the networks run together, an
interrupted run resumes; and the knn bank above its memory cap: on disk, searched block by block, with
the in-memory search's results exactly."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import oodens.views.extract as E
from oodens.data import get_benchmark
from oodens.data.presets import PRESETS, Preset
from oodens.data.sources import FileListSource, image_folder
from oodens.detectors import feature as F
from oodens.modes.discovery import discover_modes
from oodens.runtime.paths import shipped_modes_dir
from oodens.views.cache import ViewCache
from oodens.views.extract import extract
from oodens.views.types import ViewSpec


@pytest.fixture
def three_modes(tmp_path) -> Path:
    dst = tmp_path / "modes3" / "Digits" / "CNN"
    for name in ("seed-1000", "seed-1100", "seed-1200"):
        shutil.copytree(shipped_modes_dir() / name, dst / name)
    return dst


@pytest.fixture
def jpeg_folder(tmp_path) -> Path:
    """A tiny ImageFolder of 16 x 16 JPEGs (RGB and grey, two classes)."""
    root = tmp_path / "jpegs"
    rng = np.random.default_rng(0)
    for i in range(37):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        a = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(a if i % 4 else a[:, :, 0]).save(folder / f"img{i:03d}.jpg", quality=85)
    return root


def _files(cache_root: Path) -> dict[str, bytes]:
    """Every array file of every view, by its path in the cache (the keys name mode, split and view)."""
    return {str(p.relative_to(cache_root)): p.read_bytes() for p in sorted(Path(cache_root).rglob("*.npy"))}


def _with_two_presets(modes):
    """The second mode with another preset (resize to 12 px, other mean/std): the decode is shared, the
    tensors differ."""
    modes[1].preset = "digits-test-b"
    return modes


@pytest.fixture
def preset_b(monkeypatch):
    monkeypatch.setitem(PRESETS, "digits-test-b", Preset("digits-test-b", mean=(0.5,), std=(0.25,), resize=12))


def test_decode_once_views_are_byte_identical_to_per_mode_views(three_modes, jpeg_folder, tmp_path, preset_b):
    b = get_benchmark("digits")
    jpegs = image_folder("jpegs", "test", jpeg_folder, labelled=True)
    sources = [b.id_test, b.ood["letters"], jpegs]
    specs = [ViewSpec("layers"), ViewSpec.of("odin", temperature=1000.0, eps=0.0014, eps_space="pixel")]
    once = extract(_with_two_presets(discover_modes(three_modes)), sources, ViewCache(tmp_path / "once"),
                   batch_size=16, specs=specs, device="cpu")
    per_mode = extract(_with_two_presets(discover_modes(three_modes)), sources, ViewCache(tmp_path / "per"),
                       batch_size=16, specs=specs, device="cpu", modes_at_once=1)
    assert once.computed == per_mode.computed == 3 * 3 * 3
    a, c = _files(tmp_path / "once"), _files(tmp_path / "per")
    assert a.keys() == c.keys() and len(a) > 27
    assert all(a[k] == c[k] for k in a), [k for k in a if a[k] != c[k]]
    # and they are the views of a direct forward pass through the mode's own preprocessing
    for name in ("seed-1000", "seed-1100"):
        m = next(m for m in _with_two_presets(discover_modes(three_modes)) if m.name == name)
        x = next(iter(jpegs.loader(PRESETS[m.preset], len(jpegs))))[0]
        import torch

        with torch.no_grad():
            z = m.load()(x).numpy()
        np.testing.assert_allclose(once.get(name, jpegs).logits, z, rtol=1e-5, atol=1e-5)


def _count_decodes(monkeypatch) -> dict:
    calls = {"n": 0}
    real = FileListSource.item

    def item(self, i):
        calls["n"] += 1
        return real(self, i)

    monkeypatch.setattr(FileListSource, "item", item)
    return calls


@pytest.mark.parametrize("k, reads", [(None, 1), (3, 1), (2, 2), (1, 3)])
def test_each_image_is_decoded_once_per_group_of_modes(three_modes, jpeg_folder, tmp_path, monkeypatch, k, reads):
    calls = _count_decodes(monkeypatch)
    members = []
    real = E._compute_into

    def compute(ms, **kw):
        members.append(len(ms))
        return real(ms, **kw)

    monkeypatch.setattr(E, "_compute_into", compute)
    jpegs = image_folder("jpegs", "test", jpeg_folder, labelled=True)
    ex = extract(discover_modes(three_modes), [jpegs], ViewCache(tmp_path / "c"), batch_size=8, device="cpu",
                 modes_at_once=k)
    assert ex.computed == 3
    assert calls["n"] == reads * len(jpegs)  # one decode per image and group of modes, whatever N
    assert max(members) <= (k or 3) and sum(members) == 3  # the bound on networks run together holds
    calls["n"] = 0
    assert extract(discover_modes(three_modes), [jpegs], ViewCache(tmp_path / "c"), device="cpu").computed == 0
    assert calls["n"] == 0  # a warm cache decodes nothing


def test_decode_once_with_two_presets_decodes_once(three_modes, jpeg_folder, tmp_path, monkeypatch, preset_b):
    calls = _count_decodes(monkeypatch)
    jpegs = image_folder("jpegs", "test", jpeg_folder, labelled=True)
    extract(_with_two_presets(discover_modes(three_modes)), [jpegs], ViewCache(tmp_path / "c"), batch_size=8,
            device="cpu")
    assert calls["n"] == len(jpegs)


def test_workers_give_the_same_views(two_modes, jpeg_folder, tmp_path):
    jpegs = image_folder("jpegs", "test", jpeg_folder, labelled=True)
    extract(discover_modes(two_modes), [jpegs], ViewCache(tmp_path / "w0"), batch_size=8, device="cpu")
    extract(discover_modes(two_modes), [jpegs], ViewCache(tmp_path / "w2"), batch_size=8, device="cpu", workers=2)
    a, b = _files(tmp_path / "w0"), _files(tmp_path / "w2")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_modes_at_once_must_be_positive(two_modes, tmp_path):
    with pytest.raises(Exception, match="modes-at-once"):
        extract(discover_modes(two_modes), [get_benchmark("digits").id_test], ViewCache(tmp_path / "c"),
                modes_at_once=0)


def test_interrupted_decode_once_extraction_resumes(three_modes, tmp_path, monkeypatch):
    b = get_benchmark("digits")
    sources = [b.id_train, b.id_test, b.ood["letters"]]
    real = E._compute_into
    seen = {"batches": 0}

    def interrupted(ms, *, on_batch, **kw):
        def count():
            seen["batches"] += 1
            if seen["batches"] == 16:  # inside the second split
                raise KeyboardInterrupt
            on_batch()
        return real(ms, on_batch=count, **kw)

    monkeypatch.setattr(E, "_compute_into", interrupted)
    cache = ViewCache(tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        extract(discover_modes(three_modes), sources, cache, batch_size=64, device="cpu")
    assert not list((tmp_path / "c").rglob(".tmp-*")), "nothing half-written is left"
    published = [p for p in (tmp_path / "c").rglob("*") if p.is_dir() and ViewCache.is_complete(p)
                 and p.name.startswith("digits-")]
    assert len(published) == 3  # the first split of every mode
    monkeypatch.setattr(E, "_compute_into", real)
    resumed = extract(discover_modes(three_modes), sources, cache, batch_size=64, device="cpu")
    assert resumed.cached == 3 and resumed.computed == 6
    extract(discover_modes(three_modes), sources, ViewCache(tmp_path / "clean"), batch_size=64, device="cpu",
            modes_at_once=1)
    a, c = _files(tmp_path / "c"), _files(tmp_path / "clean")
    assert a.keys() == c.keys() and all(a[k] == c[k] for k in a)


# ------------------------------------------------------------------ knn bank larger than memory


@pytest.fixture
def capped(tmp_path):
    def cap(nbytes):
        F.set_bank_memory(nbytes, tmp_path / "banks")
    F.set_bank_device("cpu")  # the host's banks (with CUDA visible they would live on the GPUs)
    yield cap
    F.set_bank_memory(None)
    F.set_bank_device("auto")


def _bank(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x[100:160] = x[5]  # exact ties, across faiss's database blocks too
    x[1020:1030] = x[7]
    x[3000:3100] = x[9]
    return x


@pytest.mark.parametrize("n, d, k, nq", [(5000, 32, 50, 300), (4097, 16, 100, 2000), (3000, 8, 1, 5)])
def test_block_merged_search_equals_in_memory_search(capped, n, d, k, nq):
    import faiss

    x = F.l2_normalize(_bank(n, d))
    q = F.l2_normalize(np.random.default_rng(1).standard_normal((nq, d), dtype=np.float32))
    q[:3] = x[5]  # queries on the tied rows
    capped(n * d * 4 // 4)
    bank = F.build_bank(n, d, (x[s : s + 700] for s in range(0, n, 700)))
    assert isinstance(bank, np.memmap)
    for metric in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        d0, i0 = faiss.knn(q, x, k, metric=metric)
        d1, i1 = F.bank_search(q, bank, k, metric)
        np.testing.assert_array_equal(d1, d0)  # bit for bit, ties included
        if metric == faiss.METRIC_L2:
            np.testing.assert_array_equal(i1, i0)  # the same neighbours, ties resolved as faiss does


def test_knn_scores_with_a_capped_bank_equal_in_memory_scores(capped, tmp_path):
    from oodens.views.types import Views

    feats = _bank(6000, 24)
    train, test = Views(features=feats), Views(features=_bank(500, 24, seed=3))
    ref = F.KNN(k=10).fit(train)
    assert not isinstance(ref.bank_, np.memmap)
    expected = ref.score(test)
    capped(6000 * 24 * 4 // 4)  # the bank is 4x the cap
    det = F.KNN(k=10).fit(train)
    assert isinstance(det.bank_, np.memmap) and Path(det.bank_.filename).parent == tmp_path / "banks"
    np.testing.assert_array_equal(det.score(test), expected)
    path = Path(det.bank_.filename)
    del det
    import gc

    gc.collect()
    assert not path.exists()  # the bank file goes with the detector


def test_nnguide_scores_with_a_capped_bank_equal_in_memory_scores(capped):
    from oodens.detectors import DETECTORS
    from oodens.views.types import Views

    rng = np.random.default_rng(0)
    train = Views(features=_bank(5000, 16), logits=rng.standard_normal((5000, 5)).astype(np.float32))
    test = Views(features=_bank(300, 16, seed=4), logits=rng.standard_normal((300, 5)).astype(np.float32))
    expected = DETECTORS["nnguide"](k=20).fit(train).score(test)
    capped(5000 * 16 * 4 // 4)
    det = DETECTORS["nnguide"](k=20).fit(train)
    assert isinstance(det.bank_, np.memmap)
    np.testing.assert_array_equal(det.score(test), expected)


def test_relation_scores_with_capped_banks_equal_in_memory_scores(capped):
    """relation keeps the normalised features and the probabilities of ID train: above the cap both live in
    files, read block by block; the scores are the in-memory ones, bit for bit."""
    from oodens.detectors import DETECTORS
    from oodens.views.types import Views

    rng = np.random.default_rng(1)
    train = Views(features=np.abs(_bank(9000, 16)), logits=rng.standard_normal((9000, 5)).astype(np.float32))
    test = Views(features=np.abs(_bank(300, 16, seed=4)), logits=rng.standard_normal((300, 5)).astype(np.float32))
    expected = DETECTORS["relation"]().fit(train).score(test)
    capped(9000 * 5 * 4 // 2)  # both banks above it
    det = DETECTORS["relation"]().fit(train)
    assert isinstance(det.bank_, np.memmap) and isinstance(det.probs_, np.memmap)
    np.testing.assert_array_equal(det.score(test), expected)


def test_knn_memory_cap_holds(capped):
    """A bank 4x the cap: it is memory-mapped, never resident; the traced peak (numpy's allocations) stays
    under the cap plus the stated constant (fit and query blocks of CHUNK rows), far below the bank."""
    from oodens.views.types import Views

    n, d = 100_000, 32
    feats = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    query = Views(features=feats[:1000].copy())
    cap = n * d * 4 // 4
    capped(cap)
    tracemalloc.start()
    try:
        det = F.KNN(k=5).fit(Views(features=feats))
        det.score(query)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(det.bank_, np.memmap)
    block = min(F.CHUNK, n) * d * 4
    assert peak <= cap + 4 * block, (peak, cap, block)
    assert peak < n * d * 4  # the bank itself never was in memory


def test_knn_memory_flag_parses_sizes():
    assert F.parse_size("8GB") == 8_000_000_000
    assert F.parse_size("512MiB") == 512 * 2**20
    assert F.parse_size("1.5G") == 1_500_000_000
    assert F.parse_size(4096) == 4096
    with pytest.raises(Exception, match="knn-memory"):
        F.parse_size("lots")


def test_fast_jpeg_decoder_gives_pillows_pixels(jpeg_folder):
    """torchvision's decoder (used once torchvision.io is loaded: extraction loads it for long image lists)
    gives the image Pillow opens, in the same mode, so the views do not depend on which one decoded."""
    import torchvision.io  # noqa: F401

    from oodens.data.sources import decode_jpeg_file

    files = sorted(jpeg_folder.rglob("*.jpg"))
    assert files
    for f in files:
        with Image.open(f) as im:
            im.load()
            ref = im.copy()
        got = decode_jpeg_file(f)
        assert got is not None and got.mode == ref.mode
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
