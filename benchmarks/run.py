"""oodens benchmarks: ratios measured side by side in one run (the machines are shared and noisy).

    python benchmarks/run.py            # the full synthetic benchmark (R18 at 32x32)
    python benchmarks/run.py --quick    # a few minutes on a 2-core CPU

The synthetic benchmark: R18 modes (random weights, 10 classes, `cifar` preset) on random
32x32 images generated per index (so memory does not depend on the dataset size):
ID train / ID test / 3 OOD sets of 10k / 2k / 3 x 2k images, 3 modes (quick: 1k / 200 / 3 x 200,
2 modes).
The last line printed is a JSON summary; every key is a ratio of two timings (or memory
peaks) taken in this run:

- grid_over_extract: `eval --detector all` over all OOD sets with a cold cache / the extraction alone;
- speedup_vs_recompute: the same grid (per-mode rows and the ensemble row of every detector
  on every OOD set) done the way the mode-ensemble paper's scripts do it / oodens. Those
  scripts run one (detector, OOD set) per invocation, re-running the ID test set (and the ID
  train set for detectors that fit) each time; single modes (`eval_ood.py`, once per mode)
  and the ensemble (`eval_ood_ensemble.py`, all modes again) are separate invocations; GradNorm
  runs backward with batch size 1. The reference's passes are not re-run ~90 times: each
  kind of pass is timed here on each set on one mode (GradNorm's batch-1 backward on a
  sample of images, scaled per image), and the reference total is the sum of the passes it
  needs, plus the same scoring time as oodens. `_grid` splits it into single-mode runs,
  ensemble runs and the GradNorm share, and gives the forward-only ratio without GradNorm
  and the ensemble re-run (`speedup_forward_only`);
- gradnorm_closed_form_speedup: per-sample autograd (batch size 1, as the reference) / the
  closed form on cached views, on R18 at 32x32 (scores checked equal to 1e-4 relative);
- extract_over_bare_forward: extraction throughput / bare `model(x)` on preloaded tensors;
- peak_rss_growth: peak anonymous RSS (views are memory-mapped files, so excluded) of
  extraction in a fresh process at 2x the dataset size / at 1x;
- fit_memory_imagenet_scale: knn and mahalanobis fitted on memory-mapped features of
  ImageNet-scale concatenated width (5 x 2048) and a stated fraction of 1.28M rows; peak
  anonymous RSS against the stated bound (knn: the normalised float32 bank n x D x 4 bytes
  plus two query blocks; mahalanobis: two D x D float64 matrices plus two blocks, whatever
  n is), projected to 1.28M rows;
- decode_once_speedup: extraction of 5 modes of a small CNN (`bench-tiny`: two strided convolutions, `cifar`
  preset) over a JPEG image folder the benchmark writes (5k images at 64-128 px; quick: 3k), one mode at a
  time (`--modes-at-once 1`, as before issue 17: every image decoded 5 times) / decode once (all 5 modes
  on each decoded batch); the views are checked byte-identical;
- extract_over_limit: the decode-once extraction / (one decode pass over the folder + 5 x the bare forward
  on the preloaded tensors): what extraction costs above the physical limit;
- knn_bank_over_memory: in a fresh process, knn fit + score with a bank 4x `--knn-memory` (memory-mapped
  features; 1k queries, k = 50): the peak anonymous RSS growth / (the cap + the stated constant: 4 blocks
  of CHUNK rows of the features, the top-k merge of a query block, 32 MB for faiss), which must be <= 1;
  faiss's and BLAS's one-time buffers are warmed up before the baseline; the scores are checked equal to
  the in-memory search's, bit for bit;
- vs_pytorch_ood (benchmarks/vs_pytorch_ood.py; runs when the ``bench`` extra, pytorch-ood 0.4, is installed, else
  null): wall time of pytorch-ood running msp, energy, odin, mahalanobis, knn, react, dice, vim on 5 R18 modes (per
  mode and detector: fit on the ID train loader where it fits, predict on the ID test and each OOD loader,
  re-running the network each time; ``torch.no_grad()``) / oodens ``evaluate`` of the same 8 detectors from a cold
  cache (extraction + scoring, which includes the mean, std and ensemble rows pytorch-ood has no counterpart for);
  the per-mode AUROCs of both are printed side by side (``_vs_pytorch_ood``) and must agree (see the module).
  ``without_odin`` in ``_vs_pytorch_ood`` is the same ratio for the 7 other detectors (ODIN's perturbed pass is per
  image and per mode in both libraries). Quick sizes take 15-30 min on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import oodens
from oodens.archs import create_model
from oodens.data import Benchmark, get_preset
from oodens.data.sources import DataSource
from oodens.detectors import DETECTORS
from oodens.modes.checkpoints import save_checkpoint
from oodens.modes.discovery import discover_modes
from oodens.views.cache import ViewCache
from oodens.views.extract import extract
from oodens.views.kinds import VIEW_KINDS
from oodens.views.types import Views


class SyntheticSource(DataSource):
    """Random 32x32 RGB images made from (seed, index): no array held in memory."""

    def __init__(self, name: str, split: str, n: int, seed: int, labelled: bool, shift: float = 0.0):
        super().__init__(name, split)
        self.n, self.seed, self.labelled, self.shift = n, seed, labelled, shift

    def __len__(self):
        return self.n

    def item(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = (torch.rand(3, 32, 32, generator=g) * (1 - self.shift) + self.shift).clamp(0, 1)
        return x, (int(torch.randint(0, 10, (1,), generator=g)) if self.labelled else -1)

    @property
    def labels(self):
        return np.array([self.item(i)[1] for i in range(self.n)], dtype=np.int64)

    @property
    def fingerprint(self):
        return hashlib.sha256(f"synthetic/{self.n}/{self.seed}/{self.labelled}/{self.shift}".encode()).hexdigest()


def peak_anon_rss(fn, interval=0.005):
    """(result, peak RssAnon in bytes while fn runs), sampled from /proc/self/status."""
    def read():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    peak, done = [read()], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], read())
            time.sleep(interval)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return result, max(peak[0], read())


def make_modes(root: Path, n_modes: int) -> Path:
    folder = root / "Synthetic" / "R18"
    for k in range(n_modes):
        torch.manual_seed(1000 + 100 * k)
        model = create_model("R18", 10)
        save_checkpoint(folder / f"seed-{1000 + 100 * k}" / "checkpoint.pth.tar", model,
                        {"arch": "R18", "dataset": "synthetic", "num_classes": 10, "preset": "cifar"})
    return folder


def sets(scale: int):
    n_train, n_test, n_ood = (10_000, 2_000, 2_000) if scale == 1 else (1_000, 200, 200)
    train = SyntheticSource("synthetic", "train", n_train, 1, True)
    test = SyntheticSource("synthetic", "test", n_test, 2, True)
    oods = {f"ood{j}": SyntheticSource(f"ood{j}", "test", n_ood, 10 + j, False, shift=0.1 * (j + 1)) for j in range(3)}
    return train, test, oods


def synthetic_experiment(work: Path, n_modes: int, scale: int, batch_size: int) -> oodens.Experiment:
    """The synthetic mode set and benchmark as the library's Experiment (what `oodens eval` runs)."""
    train, test, oods = sets(scale)
    bench = Benchmark("synthetic", 10, lambda: train, lambda: test, {o: (lambda s=s: s) for o, s in oods.items()})
    return oodens.Experiment(oodens.load_modes(make_modes(work / "modes", n_modes)), bench, cache_dir=work / "cache",
                             device="cpu", batch_size=batch_size)


def time_pass(model, source, spec, batch_size):
    """Seconds for one pass of a view kind over a source (as a reference script would run it)."""
    preset = get_preset("cifar")
    fn = VIEW_KINDS[spec.kind]
    t = time.perf_counter()
    for x, _ in source.loader(preset, batch_size):
        fn(model, x, preset, **dict(spec.params))
    return time.perf_counter() - t


def bench_grid(work: Path, quick: bool, batch_size: int) -> dict:
    exp = synthetic_experiment(work, 2 if quick else 3, 0 if quick else 1, batch_size)
    modes, train, test, oods = list(exp.modes), exp.train_source, exp.benchmark.id_test, exp.oods
    specs = sorted({s for cls in DETECTORS.values() for s in cls().view_specs()}, key=lambda s: s.id)
    t0 = time.perf_counter()
    exp.extract("all")  # every view any detector reads: the cold-cache part of `oodens eval --detector all`
    t_extract = time.perf_counter() - t0
    t0 = time.perf_counter()
    skipped = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", oodens.OodensWarning)  # eloc does not apply to independent modes
        try:
            exp.evaluate("all")  # the warm-cache rest: every detector per mode and as an ensemble
        except oodens.OodensError:  # a detector that cannot fit random-weight modes: the others, one by one
            t0 = time.perf_counter()
            for name in DETECTORS:
                try:
                    exp.evaluate(name)
                except oodens.OodensError as e:
                    skipped[name] = str(e)[:160]
    t_score = time.perf_counter() - t0

    # the reference way: per detector and OOD set, re-run the passes it needs on ID test + that OOD set
    # (+ ID train for detectors that fit), once per mode and once more for the ensemble;
    # pass times measured on one mode, times the number of modes
    model = modes[0].load()
    from oodens.views.types import BASE

    pass_time = {}
    for spec in [BASE, *specs]:
        pass_time[(spec, "test")] = time_pass(model, test, spec, batch_size)
        pass_time[(spec, "ood")] = np.mean([time_pass(model, s, spec, batch_size) for s in oods.values()])
    pass_time[(BASE, "train")] = time_pass(model, train, BASE, batch_size)
    per_image_b1 = time_batch1_backward(model, test, 50)
    n_modes = len(modes)
    single = ensemble = gradnorm = forward_only = 0.0
    for name, cls in DETECTORS.items():
        if cls.applies_to([{"name": m.name} for m in modes]) is not None or name in skipped:
            continue
        if name == "gradnorm":  # batch size 1, backward to the final layer, per image
            per_ood = per_image_b1 * (len(test) + np.mean([len(s) for s in oods.values()]))
            gradnorm += per_ood * len(oods) * 2 * n_modes
            forward_only += (pass_time[(BASE, "test")] + pass_time[(BASE, "ood")]) * len(oods) * n_modes
            continue
        spec = (cls().view_specs() or [BASE])[0]
        per_ood = pass_time[(spec, "test")] + pass_time[(spec, "ood")]
        if cls.needs_fit:
            per_ood += pass_time[(BASE, "train")]
        runs = per_ood * len(oods) * n_modes  # one invocation's passes over all modes
        if not cls.ensemble_only:
            single += runs
        ensemble += runs
        forward_only += runs
    reference = single + ensemble + gradnorm + t_score
    ours = t_extract + t_score
    return {
        "grid_over_extract": ours / t_extract,
        "speedup_vs_recompute": reference / ours,
        "_grid": {"extract_s": t_extract, "score_s": t_score, "reference_s": reference,
                  "reference_single_mode_runs_s": single, "reference_ensemble_runs_s": ensemble,
                  "reference_gradnorm_batch1_s": gradnorm, "speedup_forward_only": (forward_only + t_score) / ours,
                  "skipped_detectors": skipped, "modes": n_modes, "train": len(train), "test": len(test), "ood": [len(s) for s in oods.values()]},
    }


def time_batch1_backward(model, source, n: int) -> float:
    """Seconds per image of the reference GradNorm: batch size 1, backward to the final layer."""
    preset = get_preset("cifar")
    xs = []
    for x, _ in source.loader(preset, n):
        xs = list(x[:n])
        break
    t = time.perf_counter()
    for x in xs:
        model.zero_grad(set_to_none=True)
        torch.sum(-torch.log_softmax(model(x[None]), dim=1)).backward()
    return (time.perf_counter() - t) / len(xs)


def bench_gradnorm(n: int) -> dict:
    torch.manual_seed(0)
    model = create_model("R18", 10).eval()
    x = torch.rand(n, 3, 32, 32)
    t0 = time.perf_counter()
    ref = np.empty(n)
    for i in range(n):  # the reference: batch size 1, backward to the final layer
        model.zero_grad(set_to_none=True)
        z = model(x[i : i + 1])
        loss = torch.sum(-torch.log_softmax(z, dim=1))
        loss.backward()
        ref[i] = model.classifier.weight.grad.abs().sum().item()
    t_autograd = time.perf_counter() - t0
    with torch.no_grad():  # oodens: the views are extracted once (not timed here: they serve every detector)
        h = model.forward_features(x)
        z = model.classifier(h)
    views = Views(logits=z.numpy().astype(np.float64), features=h.numpy().astype(np.float64))
    det = DETECTORS["gradnorm"]()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        ours = det.score(views)
    t_closed = (time.perf_counter() - t0) / reps
    rel = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    assert rel < 1e-4, rel
    return {"gradnorm_closed_form_speedup": t_autograd / t_closed,
            "_gradnorm": {"samples": n, "autograd_s": t_autograd, "closed_form_s": t_closed, "max_rel_diff": rel}}


def bench_bare_forward(work: Path, n: int, batch_size: int) -> dict:
    modes = discover_modes(make_modes(work / "bare-modes", 1))
    src = SyntheticSource("bare", "test", n, 77, True)
    model = modes[0].load()
    preset = get_preset("cifar")
    xs = [x for x, _ in src.loader(preset, batch_size)]  # preloaded, preprocessed tensors
    with torch.inference_mode():
        model(xs[0])  # warm-up
        t0 = time.perf_counter()
        for x in xs:
            model(x)
        t_bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    extract(modes, [src], ViewCache(work / "bare-cache"), batch_size=batch_size, device="cpu")
    t_extract = time.perf_counter() - t0
    return {"extract_over_bare_forward": (n / t_extract) / (n / t_bare),
            "_throughput": {"images": n, "extract_img_s": n / t_extract, "bare_img_s": n / t_bare}}


def _rss_child(n: int, work: str) -> None:
    """In a fresh process: extract one mode on n images; print the peak anonymous RSS."""
    work = Path(work)
    modes = discover_modes(work / "modes" / "Synthetic" / "R18")[:1]
    src = SyntheticSource("rss", "test", n, 5, True)
    _, peak = peak_anon_rss(lambda: extract(modes, [src], ViewCache(work / f"cache-{n}"), batch_size=128,
                                            device="cpu"))
    print(peak)


def bench_rss(work: Path, n: int) -> dict:
    make_modes(work / "rss" / "modes", 1)
    peaks = {}
    for size in (n, 2 * n):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(size), str(work / "rss")],
                             capture_output=True, text=True, check=True)
        peaks[size] = int(out.stdout.strip().splitlines()[-1])
    return {"peak_rss_growth": peaks[2 * n] / peaks[n], "_rss": {"images": [n, 2 * n], "peak_anon_bytes": list(peaks.values())}}


def bench_fit_memory(work: Path, fraction: float) -> dict:
    n_full, d = 1_281_167, 5 * 2048
    n = int(n_full * fraction)
    path = work / "features.npy"
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    for s in range(0, n, 8192):
        feats[s : s + 8192] = np.abs(rng.standard_normal((min(8192, n - s), d), dtype=np.float32))
    feats.flush()
    del feats
    feats = np.load(path, mmap_mode="r")
    labels = np.arange(n) % 1000
    train = Views(features=feats, labels=labels)
    query = Views(features=np.load(path, mmap_mode="r")[:2000])
    out = {}
    block = 8192 * d  # one block of query rows
    for name, bound, full in (("knn", n * d * 4 + 2 * block * 4, n_full * d * 4 + 2 * block * 4),
                              ("mahalanobis", 2 * d * d * 8 + 2 * block * 8, 2 * d * d * 8 + 2 * block * 8)):
        det = DETECTORS[name]()
        base = peak_anon_rss(lambda: None)[1]
        t0 = time.perf_counter()
        (_, peak) = peak_anon_rss(lambda: det.fit(train).score(query))
        used = peak - base
        out[name] = {"rows": n, "dim": d, "fraction": fraction, "peak_anon_bytes": used, "bound_bytes": bound,
                     "peak_over_bound": used / bound, "seconds": time.perf_counter() - t0,
                     "projected_full_scale_bound_bytes": full}
        del det
    path.unlink()
    return {"fit_memory_imagenet_scale": out}


# ---------------------------------------------------------------------------------------------- decode once

class TinyCNN(torch.nn.Module):
    """A small CNN for the decode-once benchmark: decoding, not the forward pass, dominates (as for any
    network on a JPEG benchmark with a fast accelerator)."""

    feature_dim = 32
    feature_layers = ()

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(32, num_classes)

    @property
    def classifier(self):
        return self.fc

    def forward_features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


def _register_tiny():
    from oodens.archs.registry import ARCHS, register_arch

    if "bench-tiny" not in ARCHS:
        register_arch("bench-tiny", folder="BenchTiny")(TinyCNN)


def write_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of 64-128 px (smooth random images, so they compress like photos) in 10 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(64, 129, 2))
        small = rng.random((h // 8 + 1, w // 8 + 1, 3))
        a = np.kron(small, np.ones((8, 8, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 55
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def bench_decode_once(work: Path, n_images: int, batch_size: int, n_modes: int = 5) -> dict:
    from oodens.data.sources import image_folder
    from oodens.views.extract import batches

    import torchvision.io  # noqa: F401  (its JPEG decoder, as extraction loads it for long image lists)

    _register_tiny()
    folder = work / "decode" / "modes" / "Synthetic" / "BenchTiny"
    for k in range(n_modes):
        torch.manual_seed(2000 + k)
        save_checkpoint(folder / f"seed-{2000 + k}" / "checkpoint.pth.tar", TinyCNN(10),
                        {"arch": "bench-tiny", "dataset": "synthetic", "num_classes": 10, "preset": "cifar"})
    modes = discover_modes(folder)
    src = image_folder("jpegs", "test", write_jpegs(work / "decode" / "jpegs", n_images), labelled=True)
    preset = get_preset("cifar")
    for m in modes:  # the checkpoints' hashes (a cold cache's cost, the same in both runs) before timing
        m.sha256
    src.fingerprint
    t0 = time.perf_counter()
    extract(modes, [src], ViewCache(work / "decode" / "per-mode"), batch_size=batch_size, device="cpu",
            modes_at_once=1)
    t_per_mode = time.perf_counter() - t0
    t0 = time.perf_counter()
    extract(modes, [src], ViewCache(work / "decode" / "once"), batch_size=batch_size, device="cpu")
    t_once = time.perf_counter() - t0
    same = all(a.read_bytes() == (work / "decode" / "once" / a.relative_to(work / "decode" / "per-mode")).read_bytes()
               for a in (work / "decode" / "per-mode").rglob("*.npy"))
    assert same, "decode-once views differ from per-mode views"
    # the physical limit: one decode pass, then each network's bare forward on the preloaded tensors
    t0 = time.perf_counter()
    xs = [x[0] for x, _ in batches(src, [preset], batch_size)]
    t_decode = time.perf_counter() - t0
    nets = [m.load() for m in modes]
    t_forward = 0.0
    with torch.inference_mode():
        for net in nets:
            net(xs[0])  # warm-up
            t0 = time.perf_counter()
            for x in xs:
                net(x)
            t_forward += time.perf_counter() - t0
    limit = t_decode + t_forward
    return {"decode_once_speedup": t_per_mode / t_once, "extract_over_limit": t_once / limit,
            "_decode_once": {"images": n_images, "modes": n_modes, "per_mode_s": t_per_mode, "decode_once_s": t_once,
                             "decode_pass_s": t_decode, "bare_forward_s": t_forward, "limit_s": limit,
                             "views_byte_identical": same}}


# ---------------------------------------------------------------------------------------------- knn over memory

def _knn_child(n: int, d: int, work: str) -> None:
    """In a fresh process: knn fit + score on memory-mapped features with the bank 4x the cap; print the
    peak anonymous RSS growth, the cap, the constant and whether the scores equal the in-memory ones."""
    from oodens.detectors import feature as F

    work = Path(work)
    path = work / "knn-features.npy"
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    for s in range(0, n, 8192):
        feats[s : s + 8192] = rng.standard_normal((min(8192, n - s), d), dtype=np.float32)
    feats.flush()
    del feats
    train = Views(features=np.load(path, mmap_mode="r"))
    nq, k = min(n, 1000), 50
    query = Views(features=np.load(path, mmap_mode="r")[:nq])
    cap = n * d * 4 // 4
    # 4 blocks of CHUNK feature rows (fit: a block read, its float32 copy, norms, the normalised block; score:
    # the query block), the top-k merge of a query block (distances, indices, their order: 48 bytes per
    # candidate, 2k candidates per query) and 32 MB for faiss (its 4096 x 1024 distance tile, per-thread heaps)
    constant = 4 * F.CHUNK * d * 4 + min(nq, F.CHUNK) * 2 * k * 48 + 32 * 2**20
    F.set_bank_memory(cap, work / "banks")
    import faiss  # its and BLAS's one-time buffers (per thread, whatever the bank) belong to the baseline

    warm = np.ascontiguousarray(train.features[:4096], dtype=np.float32)
    faiss.knn(warm, warm, 50)  # a full tile of queries (4096) against a database block
    del warm
    base = peak_anon_rss(lambda: None)[1]
    t0 = time.perf_counter()
    scores, peak = peak_anon_rss(lambda: DETECTORS["knn"](k=k).fit(train).score(query))
    t_capped = time.perf_counter() - t0
    F.set_bank_memory(None)
    t0 = time.perf_counter()
    ref, peak_ref = peak_anon_rss(lambda: DETECTORS["knn"](k=k).fit(train).score(query))
    t_ref = time.perf_counter() - t0
    print(json.dumps({"rows": n, "dim": d, "bank_bytes": n * d * 4, "cap_bytes": cap, "constant_bytes": constant,
                      "peak_anon_growth_bytes": peak - base, "in_memory_peak_anon_growth_bytes": peak_ref - base,
                      "scores_equal": bool(np.array_equal(scores, ref)), "capped_s": t_capped, "in_memory_s": t_ref}))


def bench_knn_over_memory(work: Path, n: int, d: int) -> dict:
    (work / "knn").mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, __file__, "--knn-child", str(n), str(d), str(work / "knn")],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["scores_equal"], "block-merged knn scores differ from the in-memory search"
    return {"knn_bank_over_memory": r["peak_anon_growth_bytes"] / (r["cap_bytes"] + r["constant_bytes"]),
            "_knn_bank_over_memory": r}


def bench_pytorch_ood(work: Path, quick: bool, batch_size: int) -> dict:
    """The vs_pytorch_ood key (benchmarks/vs_pytorch_ood.py), or null without pytorch-ood installed."""
    try:
        import pytorch_ood  # noqa: F401
    except ImportError:
        print("[pytorch_ood] skipped: pytorch-ood is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return {"vs_pytorch_ood": None}
    sys.path.insert(0, str(Path(__file__).parent))
    from vs_pytorch_ood import bench_vs_pytorch_ood

    return bench_vs_pytorch_ood(work, quick, batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a few minutes on a 2-core CPU")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--knn-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        _rss_child(int(args.rss_child[0]), args.rss_child[1])
        return
    if args.knn_child:
        _knn_child(int(args.knn_child[0]), int(args.knn_child[1]), args.knn_child[2])
        return
    torch.set_num_threads(os.cpu_count() or 1)
    summary = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "quick": args.quick}}
    with tempfile.TemporaryDirectory(prefix="oodens-bench-") as tmp:
        work = Path(tmp)
        steps = [
            ("grid", lambda: bench_grid(work, args.quick, args.batch_size)),
            ("gradnorm", lambda: bench_gradnorm(100 if args.quick else 500)),
            ("bare", lambda: bench_bare_forward(work, 500 if args.quick else 4000, args.batch_size)),
            ("rss", lambda: bench_rss(work, 500 if args.quick else 4000)),
            ("fit", lambda: bench_fit_memory(work, 0.005 if args.quick else 0.05)),
            ("decode", lambda: bench_decode_once(work, 3000 if args.quick else 5000, args.batch_size)),
            ("knn", lambda: bench_knn_over_memory(work, *((400_000, 256) if args.quick else (1_000_000, 256)))),
            ("pytorch_ood", lambda: bench_pytorch_ood(work, args.quick, args.batch_size)),
        ]
        for name, step in steps:
            t0 = time.perf_counter()
            res = step()
            print(f"[{name}] {time.perf_counter() - t0:.1f} s: " + json.dumps(res, default=float), file=sys.stderr,
                  flush=True)
            summary.update(res)
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
