"""The GPU paths, checked on the CPU (issue 17): batched decoding with the preset's geometry on tensors
(``--decode gpu``, here run by torchvision's CPU decoder) against the Pillow path, its cache key, and the
device bank (float16 rows sharded over devices, here several CPU "devices") against faiss's exact search and a
naive float64 loop. The measured GPU numbers are in EXPERIMENTS.md ("GPU extraction and kNN")."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import oodens.views.decode as D
import oodens.views.extract as E
from oodens.data.presets import PRESETS, Preset
from oodens.data.sources import ArraySource, SubsetSource, image_folder
from oodens.detectors import DETECTORS
from oodens.detectors import feature as F
from oodens.errors import OodensError
from oodens.modes.discovery import discover_modes
from oodens.runtime.paths import shipped_modes_dir
from oodens.views.cache import ViewCache
from oodens.views.types import Views

CPU = torch.device("cpu")


@pytest.fixture
def photos(tmp_path) -> Path:
    """An ImageFolder of smooth RGB JPEGs of several sizes and shapes, one grey JPEG and one PNG."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(23):
        h, w = (int(v) for v in rng.integers(20, 61, 2))
        small = rng.random((h // 4 + 1, w // 4 + 1, 3))
        a = (np.kron(small, np.ones((4, 4, 1)))[:h, :w] * 255).astype(np.uint8)
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(a if i != 5 else a[:, :, 0])
        img.save(folder / (f"img{i:03d}.png" if i == 7 else f"img{i:03d}.jpg"), quality=92)
    return root


def _grey_levels(a: torch.Tensor, b: torch.Tensor, preset: Preset) -> torch.Tensor:
    return ((a - b) * torch.tensor(preset.std).view(1, -1, 1, 1) * 255).abs()


@pytest.mark.parametrize("preset", [Preset("t-resize", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), resize=16),
                                    Preset("t-crop", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), resize=24, crop=20)])
def test_decoding_in_batches_gives_pillows_pixels_within_one_grey_level(photos, preset):
    """The tensor geometry (resize of the shorter side, bilinear, antialiased, rounded to 8 bits; centre crop
    with rounded offsets) against Pillow's, on the same decoder (libjpeg-turbo on the CPU): at most one grey
    level apart, in the same order, with the same labels (the PNG and the grey JPEG included)."""
    src = image_folder("photos", "test", photos, labelled=True)
    ref = list(E.batches(src, [preset], 8))
    got = list(D.gpu_batches(src, [preset], 8, 0, CPU))
    assert [len(y) for _, y in got] == [len(y) for _, y in ref] == [8, 8, 7]
    for (xr, yr), (xg, yg) in zip(ref, got):
        assert torch.equal(yr, yg)
        assert xr[0].shape == xg[0].shape
        diff = _grey_levels(xr[0], xg[0], preset)
        assert float(diff.max()) <= 1.0 + 1e-3
        assert float(diff.mean()) < 0.5


def test_a_subsample_of_an_image_list_is_decoded_in_its_order(photos):
    """Index sources (--fit-fraction subsamples, hold-outs, torchrun shards) over an image list decode their
    own samples, in their order."""
    preset = Preset("t", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), resize=16)
    sub = SubsetSource(image_folder("photos", "train", photos, labelled=True), 0.5)
    assert D.decodes_on_gpu(sub, "gpu") and not D.decodes_on_gpu(sub, "cpu")
    ref = torch.cat([x[0] for x, _ in E.batches(sub, [preset], 4)])
    got = torch.cat([x[0] for x, _ in D.gpu_batches(sub, [preset], 4, 0, CPU)])
    assert len(got) == len(sub) == len(ref)
    assert float(_grey_levels(ref, got, preset).max()) <= 1.0 + 1e-3


def test_decode_choice_and_errors():
    assert D.resolve_decode("auto", CPU) == "cpu" and D.resolve_decode("cpu", CPU) == "cpu"
    with pytest.raises(OodensError, match="--decode gpu needs a CUDA extraction device"):
        D.resolve_decode("gpu", CPU)
    with pytest.raises(OodensError, match=r"--decode 'nvjpeg': expected one of auto, cpu, gpu"):
        D.resolve_decode("nvjpeg", CPU)


def test_gpu_decoded_views_are_other_views_and_arrays_are_unaffected(photos, tmp_path, monkeypatch):
    """The decoder is part of an image list's view key (the pixels differ), recorded in the view's metadata;
    an array dataset has no decoding and keeps its key."""
    preset = PRESETS["cifar"]
    src = image_folder("photos", "test", photos, labelled=True)
    arr = ArraySource("arr", "test", lambda: (np.zeros((2, 3, 32, 32), np.float32), np.zeros(2, np.int64)))
    assert D.preset_identity(preset, src, "cpu") == preset.identity()
    assert D.preset_identity(preset, src, "gpu") == {**preset.identity(), "decoder": "nvjpeg"}
    assert D.preset_identity(preset, arr, "gpu") == preset.identity()

    dst = tmp_path / "modes" / "Digits" / "CNN" / "seed-1000"
    shutil.copytree(shipped_modes_dir() / "seed-1000", dst)
    modes = discover_modes(dst.parent)
    monkeypatch.setitem(PRESETS, "digits-rgb", Preset("digits-rgb", (0.3,), (0.37,), resize=8))
    modes[0].preset = "digits-rgb"
    cpu = E.extract(modes, [src], ViewCache(tmp_path / "c"), batch_size=8, device="cpu", decode="cpu")
    monkeypatch.setattr(E, "resolve_decode", lambda decode, dev: decode)  # --decode gpu, run on the CPU here
    gpu = E.extract(modes, [src], ViewCache(tmp_path / "c"), batch_size=8, device="cpu", decode="gpu")
    a, b = cpu.get(modes[0].name, src), gpu.get(modes[0].name, src)
    assert a.logits.filename != b.logits.filename  # two views side by side in one cache
    metas = [p.read_text() for p in (tmp_path / "c").rglob("meta.json")]
    assert sum('"decoder": "nvjpeg"' in m for m in metas) == 1
    assert np.array_equal(a.labels, b.labels)
    np.testing.assert_allclose(b.logits, a.logits, atol=0.5)  # one grey level apart at most, see above


# ------------------------------------------------------------------ the device bank


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("shards, n", [(1, 3000), (3, 3001), (5, 3)])
@pytest.mark.parametrize("inner", [False, True])
def test_device_bank_float32_equals_faiss(shards, n, inner, monkeypatch):
    """Stored in float32 the sharded, tiled search is faiss's exact search (to float32 rounding): the same
    neighbours, the same values; blocks straddle shards, tiles straddle the top-k merge; more shards than rows."""
    import faiss

    monkeypatch.setattr(F.DeviceBank, "TILE_ELEMENTS", 200 * 333)
    x, q = _unit(n, 24, 0), _unit(200, 24, 1)
    k = min(n, 20)
    bank = F.DeviceBank(n, 24, (x[s : s + 701] for s in range(0, n, 701)), [CPU] * shards, dtype=torch.float32)
    metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
    d1, i1 = faiss.knn(q, x, k, metric=metric)
    d2, i2 = F.bank_search(q, bank, k, metric)
    np.testing.assert_allclose(d2, d1, atol=2e-6)
    assert np.array_equal(i2, i1)


def test_device_bank_float16_is_within_its_rounding_of_the_exact_distances():
    """Float16 storage: each kth distance within the rounding of the stored rows (naive float64 loop)."""
    x, q = _unit(2000, 64, 2), _unit(100, 64, 3)
    bank = F.DeviceBank(2000, 64, [x], [CPU, CPU])
    assert bank.shards[0].dtype == torch.float16
    d2, _ = F.bank_search(q, bank, 10)
    exact = np.sort(((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1), axis=1)[:, :10]
    assert np.abs(d2 - exact).max() < 4 * 2.0**-11 * 4  # |2 q.(b - b16)| + ||b16||^2 - 1 <= ~4 ulp(1) of fp16


def test_knn_on_the_bank_devices_scores_as_the_naive_loop(monkeypatch):
    """knn fitted with its bank on (CPU stand-ins for) two GPUs: -||h^ - n_k|| from a naive float64 loop, to
    the float16 rounding."""
    monkeypatch.setattr(F, "_bank_devices", lambda: [CPU, CPU])
    rng = np.random.default_rng(4)
    train, test = np.abs(rng.standard_normal((1500, 32))), np.abs(rng.standard_normal((60, 32)))
    det = DETECTORS["knn"](k=7).fit(Views(features=train))
    assert isinstance(det.bank_, F.DeviceBank)
    got = det.score(Views(features=test))
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    want = np.array([-np.sort(np.linalg.norm(tn - h / np.linalg.norm(h), axis=1))[6] for h in test])
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_bank_device_setting():
    F.set_bank_device("cpu")
    try:
        assert F._bank_devices() is None
        with pytest.raises(OodensError, match="--device 'tpu0'"):
            F.set_bank_device("tpu0")
    finally:
        F.set_bank_device("auto")
    devices = F._bank_devices()  # auto: every visible GPU, else the host
    assert devices is None if not torch.cuda.is_available() else len(devices) == torch.cuda.device_count()


def test_the_results_store_tells_gpu_decoded_runs_apart(photos, tmp_path, monkeypatch):
    """A run whose image lists are decoded on the GPU is another run in the store (its settings name the decoder);
    CPU decoding and sets without image lists keep the settings they had."""
    import oodens
    from oodens.api import Experiment

    monkeypatch.setattr(D, "resolve_decode", lambda decode, dev: "gpu" if decode != "cpu" else "cpu")
    plain = oodens.Experiment(None, None, cache_dir=tmp_path / "c", device="cpu", decode="gpu")
    assert "decoder" not in plain.settings()  # digits: arrays, nothing to decode
    photos_set = {"photos": image_folder("photos", "test", photos, labelled=False)}
    monkeypatch.setattr(Experiment, "oods", property(lambda self: photos_set))
    gpu = oodens.Experiment(None, None, cache_dir=tmp_path / "c", device="cpu", decode="gpu")
    cpu = oodens.Experiment(None, None, cache_dir=tmp_path / "c", device="cpu", decode="cpu")
    assert gpu.settings() == {**cpu.settings(), "decoder": "nvjpeg"}


def test_an_experiment_puts_its_banks_where_its_networks_run():
    """Experiment(device=...) sets where knn/nnguide banks live, as the CLI's --device does; devices without banks
    of their own (mps) use the host's."""
    import oodens

    try:
        oodens.Experiment(None, None, device="cpu")
        assert F._BANK["device"] == "cpu" and F._bank_devices() is None
        F.set_bank_device("mps")
        assert F._BANK["device"] == "cpu"
    finally:
        F.set_bank_device("auto")


def test_a_gpu_bank_above_the_memory_cap_takes_the_hosts_path(monkeypatch, tmp_path):
    """--knn-memory caps a bank wherever it would live: float16 rows over the cap are searched from the host's
    file, with the host's exact results."""
    monkeypatch.setattr(F, "_bank_devices", lambda: [CPU])
    x = _unit(1000, 16, 5)
    try:
        F.set_bank_memory(1000 * 16 * 2 - 1, tmp_path / "banks")
        assert isinstance(F.build_bank(1000, 16, [x]), np.memmap)
        F.set_bank_memory(1000 * 16 * 2, tmp_path / "banks")
        assert isinstance(F.build_bank(1000, 16, [x]), F.DeviceBank)
    finally:
        F.set_bank_memory(None)


def test_an_empty_jpeg_is_one_error_naming_it(tmp_path):
    from oodens.data.sources import LoadError

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty.jpg").write_bytes(b"")
    src = image_folder("e", "test", tmp_path / "e", labelled=False)
    with pytest.raises(LoadError, match=r"cannot read image .*empty\.jpg: an empty file"):
        list(D.gpu_batches(src, [PRESETS["cifar"]], 4, 0, CPU))
