"""GPU extraction and kNN benchmark (issue 17, item 4): run on a machine with a CUDA device.

    python benchmarks/gpu.py [--out DIR] [--quick]

Prints one JSON line per measurement (and writes them to DIR/gpu.jsonl), then a JSON summary:

- ``r18_32``: images/s of extraction (base view: logits + features into the view cache) of one R18 mode at
  32x32 (``cifar`` preset) over an in-memory float array, fp32 / bf16 / bf16 + channels-last + torch.compile,
  beside the bare forward (``model(x)`` on tensors already on the GPU) in the same precision;
- ``r50_224``: images/s of extraction of one R50 mode at 224 (``imagenet`` preset: resize 256, centre crop
  224) over a JPEG folder the benchmark writes (photo-like images of 300-500 px), decoded on the CPU (DataLoader
  workers) or on the GPU (batched nvJPEG, ``--decode gpu``), fp32 / bf16 / bf16 + channels-last;
- ``modes_5``: five R50 modes (bf16, channels-last, GPU decode) extracted one mode at a time
  (``--modes-at-once 1``: five decodes of every image) / decode once (all five on each decoded batch), and the
  views checked byte-identical;
- ``decode_agreement``: GPU-decoded vs CPU-decoded input tensors (grey levels) and the R50 logits they give;
- ``knn``: a knn fit + score (k = 50) on synthetic clustered features (ID bank, ID and OOD queries) with the
  bank as float32 on the CPU (faiss, all cores) / as a float16 :class:`~oodens.detectors.feature.DeviceBank`
  sharded over the visible GPUs: seconds, the AUROCs of both and their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oodens.archs import create_model  # noqa: E402
from oodens.data import get_preset  # noqa: E402
from oodens.data.sources import ArraySource, image_folder  # noqa: E402
from oodens.modes.checkpoints import save_checkpoint  # noqa: E402
from oodens.modes.discovery import discover_modes  # noqa: E402
from oodens.views.cache import ViewCache  # noqa: E402
from oodens.views.extract import extract  # noqa: E402

RESULTS: dict = {}
OUT: Path | None = None
DEV = "cuda"  # --device cpu: a smoke test of this script on a machine without a GPU


def record(key: str, value) -> None:
    RESULTS[key] = value
    line = json.dumps({key: value}, default=float)
    print(line, flush=True)
    if OUT is not None:
        with open(OUT / "gpu.jsonl", "a") as f:
            f.write(line + "\n")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_modes(root: Path, arch: str, classes: int, preset: str, n: int) -> list:
    folder = root / arch
    for k in range(n):
        torch.manual_seed(100 + k)
        save_checkpoint(folder / f"seed-{100 + k}" / "checkpoint.pth.tar", create_model(arch, classes),
                        {"arch": arch, "dataset": "synthetic", "num_classes": classes, "preset": preset})
    modes = discover_modes(folder)
    for m in modes:
        m.sha256  # hashed before timing (a cold cache's cost, not extraction's)
    return modes


def _jpeg(args):
    path, seed = args
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(300, 501, 2))
    small = rng.random((h // 16 + 1, w // 16 + 1, 3))
    a = np.kron(small, np.ones((16, 16, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 55
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path, quality=90)


def write_jpegs(root: Path, n: int) -> Path:
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_jpeg, [(root / f"c{i % 10}" / f"{i:06d}.jpg", i) for i in range(n)], chunksize=64))
    return root


def timed_extract(modes, src, cache: Path, **kw) -> float:
    sync()
    t0 = time.perf_counter()
    extract(modes, [src], ViewCache(cache), device=DEV, **kw)
    sync()
    return time.perf_counter() - t0


def bare_forward(model, xs, precision: str, channels_last: bool) -> float:
    """Seconds of model(x) over the tensors (already on the GPU)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    ctx = torch.autocast(DEV, dtype=dtype) if dtype else torch.autocast(DEV, enabled=False)
    with torch.inference_mode(), ctx:
        model(xs[0])
        sync()
        t0 = time.perf_counter()
        for x in xs:
            model(x)
        sync()
    return time.perf_counter() - t0


def bench_r18(work: Path, n: int, bs: int) -> None:
    modes = make_modes(work / "m18", "R18", 10, "cifar", 1)
    rng = np.random.default_rng(0)
    x = rng.random((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n)
    src = ArraySource("arr", "test", lambda: (x, y), fingerprint=f"gpu-bench-r18-{n}")
    preset = get_preset("cifar")
    xs = [preset.normalize(torch.from_numpy(x[s : s + bs])).to(DEV) for s in range(0, n, bs)]
    model = modes[0].load().to(DEV).eval()
    out = {}
    for name, kw in (("fp32", {}), ("bf16", {"precision": "bf16"}),
                     ("bf16_cl_compile", {"precision": "bf16", "channels_last": True, "compile": True})):
        if kw.get("compile"):  # compile once outside the timing (a long run amortises it)
            timed_extract(modes, src, work / f"c18-{name}-warm", batch_size=bs, **kw)
        t = timed_extract(modes, src, work / f"c18-{name}", batch_size=bs, **kw)
        tb = bare_forward(model, xs, kw.get("precision", "fp32"), kw.get("channels_last", False))
        out[name] = {"extract_img_s": n / t, "bare_forward_img_s": n / tb, "extract_over_bare": tb / t}
    record("r18_32", {"images": n, "batch_size": bs, **out})


def bench_r50(work: Path, folder: Path, bs: int) -> None:
    modes = make_modes(work / "m50", "R50", 1000, "imagenet", 5)
    src = image_folder("jpegs", "test", folder, labelled=True)
    n = len(src)
    workers = min(16, os.cpu_count() or 1)
    out = {}
    for name, kw in (("fp32_cpu_decode", {"decode": "cpu"}), ("fp32_gpu_decode", {"decode": "gpu"}),
                     ("bf16_cpu_decode", {"decode": "cpu", "precision": "bf16"}),
                     ("bf16_gpu_decode", {"decode": "gpu", "precision": "bf16"}),
                     ("bf16_cl_gpu_decode", {"decode": "gpu", "precision": "bf16", "channels_last": True})):
        t = timed_extract(modes[:1], src, work / f"c50-{name}", batch_size=bs, workers=workers, **kw)
        out[name] = {"extract_img_s": n / t}
    # bare forward on preloaded tensors (GPU-decoded batches kept on the GPU)
    from oodens.views.extract import batches

    xs = [x[0] for x, _ in batches(src, [get_preset("imagenet")], bs, workers, device=torch.device(DEV),
                                   decode="gpu")]
    sync()
    t0 = time.perf_counter()
    n_dec = sum(len(y) for _, y in batches(src, [get_preset("imagenet")], bs, workers,
                                           device=torch.device(DEV), decode="gpu"))
    sync()
    out["gpu_decode_only_img_s"] = n_dec / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n_dec = sum(len(y) for _, y in batches(src, [get_preset("imagenet")], bs, workers))
    out["cpu_decode_only_img_s"] = n_dec / (time.perf_counter() - t0)
    model = modes[0].load().to(DEV).eval()
    for prec, cl in (("fp32", False), ("bf16", False), ("bf16", True)):
        out[f"bare_forward_{prec}{'_cl' if cl else ''}_img_s"] = n / bare_forward(model, xs, prec, cl)
    record("r50_224", {"images": n, "batch_size": bs, "workers": workers, **out})

    # five modes: one at a time vs decode once
    kw = dict(batch_size=bs, workers=workers, decode="gpu", precision="bf16", channels_last=True)
    t_per = timed_extract(modes, src, work / "c5-per-mode", modes_at_once=1, **kw)
    t_once = timed_extract(modes, src, work / "c5-once", **kw)
    per, once = work / "c5-per-mode", work / "c5-once"
    same = all(a.read_bytes() == (once / a.relative_to(per)).read_bytes() for a in per.rglob("*.npy"))
    record("modes_5", {"images": n, "per_mode_img_s": n / t_per, "decode_once_img_s": n / t_once,
                       "decode_once_speedup": t_per / t_once, "views_byte_identical": same})

    # GPU vs CPU decoding: the input tensors and the logits
    preset = get_preset("imagenet")
    a = torch.cat([x[0].cpu() for x, _ in batches(src, [preset], bs, workers)])
    b = torch.cat([x[0].cpu() for x, _ in batches(src, [preset], bs, workers, device=torch.device(DEV),
                                                  decode="gpu")])
    grey = ((a - b) * torch.tensor(preset.std).view(1, -1, 1, 1) * 255).abs()
    with torch.inference_mode():
        za = torch.cat([model(a[s : s + bs].to(DEV)).float().cpu() for s in range(0, n, bs)])
        zb = torch.cat([model(b[s : s + bs].to(DEV)).float().cpu() for s in range(0, n, bs)])
    record("decode_agreement", {"max_grey_levels": float(grey.max()), "mean_grey_levels": float(grey.mean()),
                                "share_pixels_differing": float((grey > 0.5).float().mean()),
                                "logits_max_abs_diff": float((za - zb).abs().max()),
                                "logits_scale": float(za.abs().max()),
                                "argmax_agreement": float((za.argmax(1) == zb.argmax(1)).float().mean())})


def bench_knn(n: int, d: int, nq: int, k: int = 50) -> None:
    from sklearn.metrics import roc_auc_score

    from oodens.detectors import DETECTORS
    from oodens.detectors.feature import set_bank_device
    from oodens.views.types import Views

    g = torch.Generator(device=DEV).manual_seed(0)
    centres = torch.randn(1000, d, device=DEV, generator=g)
    other = torch.randn(1000, d, device=DEV, generator=g)

    def draw(c, m):
        idx = torch.randint(0, len(c), (m,), device=DEV, generator=g)
        return (c[idx] + torch.randn(m, d, device=DEV, generator=g)).clamp_(min=0).cpu().numpy()

    bank = draw(centres, n)
    q_id, q_ood = draw(centres, nq), draw(0.6 * centres + 0.8 * other, nq)
    queries = Views(features=np.concatenate([q_id, q_ood]))
    labels = np.r_[np.ones(nq), np.zeros(nq)]
    out = {"rows": n, "dim": d, "queries": 2 * nq, "k": k, "gpus": torch.cuda.device_count(),
           "cpu_threads": torch.get_num_threads()}
    scores = {}
    for where in ("cpu", DEV):
        set_bank_device(where)
        sync()
        t0 = time.perf_counter()
        det = DETECTORS["knn"](k=k).fit(Views(features=bank))
        sync()
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores[where] = det.score(queries)
        sync()
        out[where] = {"fit_s": t_fit, "score_s": time.perf_counter() - t0,
                      "auroc": float(roc_auc_score(labels, scores[where]))}
        del det
    out["auroc_abs_diff"] = abs(out["cpu"]["auroc"] - out[DEV]["auroc"])
    out["score_max_abs_diff"] = float(np.abs(scores["cpu"] - scores[DEV]).max())
    out["score_search_speedup"] = out["cpu"]["score_s"] / out[DEV]["score_s"]
    set_bank_device("auto")
    record("knn", out)


def main() -> None:
    global OUT, DEV
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="r18,r50,knn")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    DEV = args.device
    if args.out:
        OUT = args.out
        OUT.mkdir(parents=True, exist_ok=True)
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    torch.set_num_threads(os.cpu_count() or 1)
    props = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    record("machine", {"gpu": props.name if props else DEV, "gpus": torch.cuda.device_count(),
                       "gpu_memory_gb": props.total_memory / 1e9 if props else 0,
                       "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda})
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="oodens-gpu-") as tmp:
        work = Path(tmp)
        steps = []
        if "r18" in only:
            steps.append(("r18", lambda: bench_r18(work, 5_000 if args.quick else 50_000, 512)))
        if "r50" in only:
            def r50():
                t0 = time.perf_counter()
                folder = write_jpegs(work / "jpegs", 300 if args.quick else 3000)
                record("jpegs_written_s", time.perf_counter() - t0)
                bench_r50(work, folder, 128)
            steps.append(("r50", r50))
        if "knn" in only:
            steps.append(("knn", lambda: bench_knn(*((20_000, 256, 500) if args.quick else (400_000, 2048, 4000)))))
        for name, step in steps:
            t0 = time.perf_counter()
            try:
                step()
            except Exception as e:  # noqa: BLE001 (the other measurements still run; the error is recorded)
                import traceback

                traceback.print_exc()
                record(f"{name}_error", f"{type(e).__name__}: {e}")
            print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(RESULTS, default=float))


if __name__ == "__main__":
    main()
