"""Feature-space detectors: fitted on the ID training features (penultimate layer).

Default ensemble strategy ``concat``: concatenate the members' features (per-member
L2-normalised for knn) and fit on the concatenated ID training features.
Both fit and score in blocks of ``CHUNK`` rows, so memory beyond the (memory-mapped)
features stays bounded: knn holds the normalised float32 bank once (n x D x 4 bytes), or, when
that exceeds the bank memory cap (:func:`set_bank_memory`, ``--knn-memory 8GB``), writes it once
to a file in the cache folder and searches it block by block, merging the per-block top-k exactly
(:func:`build_bank`, :func:`bank_search`: the same neighbours and distances as the in-memory search);
mahalanobis holds class means and one D x r whitening matrix (its fit peaks at about
two D x D float64 matrices), rmds one more mean and whitening matrix. The shared pieces
(:func:`class_means`, :func:`scatter`, :func:`pinv_factor`) serve other Gaussian detectors too.
"""

from __future__ import annotations

import os
import re
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from oodens.detectors.base import Detector, param, register_detector
from oodens.errors import OodensError
from oodens.views.types import Views

CHUNK = 8192  # query rows per block


def l2_normalize(x: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)


# --------------------------------------------------------------------------- banks larger than memory

#: the bank memory cap (bytes, None: no cap), the folder of the on-disk banks (None: <default cache>/banks) and
#: the device banks are searched on (auto: every visible CUDA device when there is one, else faiss on the CPU)
_BANK = {"memory": None, "folder": None, "device": "auto"}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """``8GB``, ``512MB``, ``1.5G``, ``64kB``, ``2GiB`` or a number of bytes -> bytes (k/M/G/T: powers of 1000,
    with ``i``: of 1024)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise OodensError(f"--knn-memory {text!r}: expected a size such as 8GB, 512MB or a number of bytes")
        base = 1024 if m.group(3) else 1000
        value = int(float(m.group(1)) * base ** "_kmgt".index(m.group(2).lower() or "_"))
    if value <= 0:
        raise OodensError(f"--knn-memory {text!r}: expected a size > 0")
    return value


def set_bank_memory(memory=None, folder: str | Path | None = None) -> None:
    """Cap the memory of the train banks that knn and nnguide keep (a size: ``"8GB"``, bytes; None: no cap).
    A bank above the cap is written once to ``folder`` (default: ``<default cache>/banks``; the CLI uses
    ``<--cache-dir>/banks``) and searched block by block with exactly the in-memory search's results. The cap
    holds wherever the bank would live: a GPU bank (float16, n x D x 2 bytes) above it takes that host path."""
    _BANK["memory"] = None if memory in (None, "", 0) else parse_size(memory)
    _BANK["folder"] = None if folder is None else Path(folder)


def bank_memory() -> int | None:
    return _BANK["memory"]


def set_bank_device(device: str | None = "auto") -> None:
    """Where the knn/nnguide banks live and are searched: ``cpu`` (faiss, in memory or on disk under the cap),
    ``cuda`` or ``auto`` with CUDA available (a :class:`DeviceBank`: float16 rows sharded over every visible CUDA
    device), ``cuda:N`` (that device alone); other devices (mps, xpu) use the host's banks. The CLI's ``--device``
    and :class:`oodens.Experiment`'s ``device`` set it."""
    import torch

    device = "auto" if device is None else str(device)
    if device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise OodensError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
        if dev.type != "cuda":  # cpu, and devices without a bank of their own (mps, xpu): the host's banks
            device = "cpu"
    _BANK["device"] = device


def _bank_devices() -> list | None:
    """The torch devices a bank is sharded over, or None: the host (faiss)."""
    import torch

    device = _BANK["device"]
    if device == "cpu" or not torch.cuda.is_available():
        return None
    dev = torch.device("cuda" if device == "auto" else device)
    if dev.index is not None:
        return [dev]
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


class DeviceBank:
    """A bank of n rows held on torch devices in float16 (half the memory of float32), sharded by rows over
    ``devices`` (one shard per device), searched exactly over the stored values: each query block against each
    shard in tiles, the products in float32 (the tile upcast on the device), per-tile top-k merged on the device,
    the shards' top-k merged on the host. The only approximation is float16 storage (a relative rounding of 2^-11
    per component): at most about 1e-3 of a squared distance (tested); on an H100 the knn scores of a 400k x 2048
    bank moved by 3e-5 and the AUROC not at all (EXPERIMENTS.md, "GPU extraction and kNN").
    ``dtype=torch.float32`` stores the exact rows."""

    #: query rows x bank rows of one float32 product tile
    TILE_ELEMENTS = 2**26

    def __init__(self, n: int, d: int, blocks: Iterable[np.ndarray], devices: list, dtype=None):
        import torch

        dtype = torch.float16 if dtype is None else dtype
        cuts = [n * j // len(devices) for j in range(len(devices) + 1)]
        self.shape, self.offsets = (n, d), cuts[:-1]
        self.shards = [torch.empty((cuts[j + 1] - cuts[j], d), dtype=dtype, device=dev)
                       for j, dev in enumerate(devices)]
        row = 0
        for b in blocks:
            b = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
            while len(b):
                j = next(j for j in range(len(devices)) if row < cuts[j + 1])
                take = min(len(b), cuts[j + 1] - row)
                self.shards[j][row - cuts[j] : row - cuts[j] + take] = b[:take].to(self.shards[j].device, dtype)
                b, row = b[take:], row + take
        if row != n:
            raise ValueError(f"bank blocks hold {row} rows, expected {n}")
        # squared norms of the stored (rounded) rows, for L2 distances
        self.sq = [torch.cat([t.float().square().sum(1) for t in sh.split(65536)]) if len(sh) else
                   torch.zeros(0, device=sh.device) for sh in self.shards]

    def __len__(self):
        return self.shape[0]

    def rows(self, rows: slice) -> np.ndarray:
        """Rows ``rows`` of the bank (as stored) as float32 on the host."""
        start, stop, _ = rows.indices(len(self))
        parts = [shard[max(start, off) - off : min(stop, off + len(shard)) - off].float().cpu().numpy()
                 for shard, off in zip(self.shards, self.offsets) if max(start, off) < min(stop, off + len(shard))]
        return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), dtype=np.float32)

    def search(self, q: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices) of the k nearest rows of each query: the largest inner products (``largest``) or the
        smallest squared L2 distances, each row sorted best first."""
        import torch

        q32 = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        tile = max(1024, self.TILE_ELEMENTS // max(1, len(q)))
        vals, idxs = [], []
        for shard, sq, off in zip(self.shards, self.sq, self.offsets):
            if not len(shard):
                continue
            qd = q32.to(shard.device)
            qsq = qd.square().sum(1, keepdim=True)
            best_v = best_i = None
            for t0 in range(0, len(shard), tile):
                s = qd @ shard[t0 : t0 + tile].float().T
                if not largest:
                    s = (qsq + sq[t0 : t0 + tile][None, :]).sub_(s, alpha=2)
                v, i = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest)
                i += t0 + off
                if best_v is not None:
                    v, sel = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1,
                                        largest=largest)
                    i = torch.gather(torch.cat([best_i, i], 1), 1, sel)
                best_v, best_i = v, i
            vals.append(best_v.cpu())
            idxs.append(best_i.cpu())
        v, sel = torch.topk(torch.cat(vals, 1), min(k, sum(x.shape[1] for x in vals)), dim=1, largest=largest)
        return v.numpy(), torch.gather(torch.cat(idxs, 1), 1, sel).numpy()


def _bank_folder() -> Path:
    if _BANK["folder"] is not None:
        return _BANK["folder"]
    from oodens.runtime.paths import default_cache_dir

    return default_cache_dir() / "banks"


def _blas_rows() -> int:
    """faiss's block of database rows in its exact search (``distance_compute_blas_database_bs``): on-disk banks
    are searched in multiples of it, so every distance is computed by the same BLAS call as in memory."""
    import faiss

    return int(getattr(getattr(faiss, "cvar", None), "distance_compute_blas_database_bs", 1024) or 1024)


def _bank_host() -> str:
    """This host's name as a file-name field (a cache folder may be shared between hosts over NFS)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"


def _clean_stale_banks(folder: Path) -> None:
    """Remove the banks of dead processes of this host (another host's pid says nothing here)."""
    for f in folder.glob(f"bank-{_bank_host()}-*.npy*"):
        try:
            pid = int(f.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (IndexError, ValueError, PermissionError, OSError):
            continue


def build_bank(n: int, d: int, blocks: Iterable[np.ndarray], searched: bool = True) -> np.ndarray:
    """The (n, d) bank made of ``blocks`` (in row order): on the bank devices when they are CUDA devices
    (:func:`set_bank_device`; a :class:`DeviceBank`), else float32 in memory, or, when n * d * 4 bytes exceed
    :func:`bank_memory`, written once (sequential writes, never resident) to a ``.npy`` file in the bank folder
    and returned memory-mapped read-only (the file is removed when the array is no longer referenced).
    ``searched=False``: a bank read block by block as an array (relation's), never a :class:`DeviceBank`."""
    cap = bank_memory()
    devices = _bank_devices() if searched else None
    if devices is not None and (cap is None or n * d * 2 <= cap):  # a float16 bank above the cap: the host's path
        return DeviceBank(n, d, blocks, devices)
    if cap is None or n * d * 4 <= cap:
        bank = np.empty((n, d), dtype=np.float32)
        s = 0
        for b in blocks:
            bank[s : s + len(b)] = b
            s += len(b)
        return bank
    folder = _bank_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _clean_stale_banks(folder)
        path = folder / f"bank-{_bank_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.npy"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
            rows = 0
            for b in blocks:
                b = np.ascontiguousarray(b, dtype="<f4")
                f.write(memoryview(b).cast("B"))
                rows += len(b)
        if rows != n:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"bank blocks hold {rows} rows, expected {n}")
        os.replace(tmp, path)
    except OSError as e:
        raise OodensError(f"cannot write the knn bank ({n} x {d} float32, {n * d * 4 / 1e9:.1f} GB) to {folder}: "
                          f"{e.strerror or e}: expected a writable cache folder with that much space, or a larger "
                          f"--knn-memory") from None
    bank = np.load(path, mmap_mode="r")
    weakref.finalize(bank, _unlink, str(path))
    return bank


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def bank_search(q: np.ndarray, bank: np.ndarray, k: int, metric=None) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of the k nearest bank rows of each query row (faiss's exact search; ``metric``
    faiss.METRIC_L2 by default, or METRIC_INNER_PRODUCT: the largest). A bank on disk (:func:`build_bank`) is
    read block by block into one reused buffer (at most half the memory cap, whole multiples of faiss's
    database block, so each distance comes from the same BLAS call as in memory), each block searched by faiss
    and the top-k merged keeping, among tied distances, the smallest indices: the same distances as the
    in-memory search, bit for bit, and for METRIC_L2 the same indices (faiss keeps the smallest index among
    ties too); for inner products faiss's choice among exactly tied values at the k-th place follows its
    heap, so the indices may differ there (the values, all the scores read, do not)."""
    import faiss

    metric = faiss.METRIC_L2 if metric is None else metric
    if isinstance(bank, DeviceBank):
        return bank.search(q, k, largest=metric == faiss.METRIC_INNER_PRODUCT)
    if not isinstance(bank, np.memmap):
        return faiss.knn(q, bank, k, metric=metric)
    n, d = bank.shape
    unit = _blas_rows()
    cap = bank_memory() or n * d * 4
    rows = max(unit, (cap // 2 // (d * 4)) // unit * unit)
    buf = np.empty((min(rows, n), d), dtype=np.float32)
    largest = metric == faiss.METRIC_INNER_PRODUCT
    best_d = np.full((len(q), k), -np.inf if largest else np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    with open(bank.filename, "rb", buffering=0) as f:
        for b0 in range(0, n, rows):
            m = min(rows, n - b0)
            view = buf[:m]
            f.seek(bank.offset + b0 * d * 4)
            got = f.readinto(memoryview(view).cast("B"))
            if got != m * d * 4:
                raise OodensError(f"knn bank {bank.filename} is truncated: expected {n} rows of {d} float32")
            dist, idx = faiss.knn(q, view, min(k, m), metric=metric)
            dist = np.concatenate([best_d, dist], axis=1)
            idx = np.concatenate([best_i, idx + b0], axis=1)
            order = np.lexsort((idx, -dist if largest else dist), axis=1)[:, :k]
            best_d = np.take_along_axis(dist, order, axis=1)
            best_i = np.take_along_axis(idx, order, axis=1)
    if largest:  # faiss lists tied largest inner products by decreasing index
        order = np.lexsort((-best_i, -best_d), axis=1)
        best_d, best_i = np.take_along_axis(best_d, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return best_d, best_i


@dataclass
class FeatureDetector(Detector):
    family = "feature"
    needs = ("features",)
    needs_fit = True
    strategies = ("concat", "mean-features", "mean-scores")



@register_detector
@dataclass
class KNN(FeatureDetector):
    """Deep nearest neighbours: ``-|| h/|h| - n_k ||``, with n_k the k-th nearest
    L2-normalised ID-training feature (exact search: faiss on the CPU, float32 products over a float16 bank on
    CUDA devices).

    Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.

    Memory: on the CPU the bank is n x D x 4 bytes; above the cap set by ``--knn-memory``
    (:func:`set_bank_memory`) it lives in a file in the cache folder and is searched block by block, with the
    same results. With CUDA (:func:`set_bank_device`, ``--device``) it is n x D x 2 bytes sharded over every
    visible GPU (:class:`DeviceBank`).

    Learned by ``fit``: ``bank_`` (the normalised ID-train features: float32 in memory or memory-mapped from
    its file, or a :class:`DeviceBank`), ``n_samples_fit_``, ``n_features_in_``.
    """

    name = "knn"
    k: int = param(50, "k-th nearest neighbour")

    def validate(self):
        self._check_int("k", 1)
        return self

    def validate_training_size(self, n: int) -> "KNN":
        if self.k > n:
            raise self._param_error("k", f"exceeds the {n} training samples: expected 1..{n}")
        return self

    def member_features(self, features):
        return l2_normalize(features)

    def fit(self, train: Views) -> "KNN":
        feats = self._fit_features(train)
        self.validate_training_size(len(feats))
        # the normalised bank is written once (onto the GPUs, into a preallocated array, or a file when it
        # exceeds the bank memory cap) and searched in place (a faiss flat index would copy it and grow its
        # storage by doubling: twice the memory)
        self.bank_ = build_bank(len(feats), feats.shape[1], (l2_normalize(feats[s : s + CHUNK])
                                                             for s in range(0, len(feats), CHUNK)))
        self.n_samples_fit_, self.n_features_in_ = len(feats), feats.shape[1]
        return self

    def score(self, views: Views) -> np.ndarray:
        import faiss

        feats = self._score_features(views)
        self.validate_training_size(self.n_samples_fit_)  # k is read at query time: it may have changed since fit
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            q = np.ascontiguousarray(l2_normalize(feats[s : s + CHUNK]))
            dist2, _ = bank_search(q, self.bank_, self.k, faiss.METRIC_L2)
            out[s : s + CHUNK] = -np.sqrt(np.maximum(dist2[:, -1], 0.0))
        return out


def class_means(feats: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """The (n_classes, D) float64 means of the rows of ``feats`` by class index ``idx`` (0..n_classes-1),
    summed in blocks of CHUNK rows (bounded memory)."""
    sums = np.zeros((n_classes, feats.shape[1]))
    for s in range(0, len(feats), CHUNK):
        np.add.at(sums, idx[s : s + CHUNK], np.asarray(feats[s : s + CHUNK], dtype=np.float64))
    return sums / np.bincount(idx, minlength=n_classes)[:, None]


def mean_feature(feats: np.ndarray) -> np.ndarray:
    """The (D,) float64 mean row of ``feats``, summed in blocks of CHUNK rows."""
    total = np.zeros(feats.shape[1])
    for s in range(0, len(feats), CHUNK):
        total += np.asarray(feats[s : s + CHUNK], dtype=np.float64).sum(axis=0)
    return total / len(feats)


def scatter(feats: np.ndarray, means: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """The (D, D) float64 covariance ``(1/n) sum_i (h_i - m_i)(h_i - m_i)^T`` (divided by n), m_i = ``means[idx[i]]``
    (class-centred) or ``means`` itself when ``idx`` is None (one centre), accumulated in blocks of CHUNK rows."""
    out = np.zeros((feats.shape[1], feats.shape[1]))
    for s in range(0, len(feats), CHUNK):
        centre = means if idx is None else means[idx[s : s + CHUNK]]
        centred = np.asarray(feats[s : s + CHUNK], dtype=np.float64) - centre
        out += centred.T @ centred
    return out / len(feats)


def pinv_factor(cov: np.ndarray, centre_sq: float = 0.0) -> np.ndarray:
    """W (D, r) with ``W W^T`` = the pseudo-inverse of the covariance ``cov`` (overwritten), cut at float32 resolution.

    W = V_r diag(lambda_r^-1/2) over the eigenvalues lambda > D * eps32^2 * E||h||^2, with E||h||^2 = trace(cov) +
    ``centre_sq`` (the mean squared norm of the centres the covariance is taken about) the features' mean squared
    norm. The features are float32: each entry carries a rounding error of up to eps32 (1.2e-7) times its size, so
    along any unit direction the error is at most eps32 * ||h|| (Cauchy-Schwarz) and the variance it adds at most
    eps32^2 * E||h||^2; the factor D is margin for the network's own float32 sums behind each feature and stays far
    above float64 eigensolver error (D * eps64 * lambda_max). A direction below the cut holds rounding noise, not
    signal: numpy's pinv cut (1e-15 x the largest) would keep it and weight that noise by up to 1e15 on
    near-degenerate covariances (a feature that is a rounded copy or combination of others). The noise scales with
    the features' size, not their spread (an offset feature rounds on its offset), and enters variances squared:
    the earlier linear cut (lambda_max * D * eps32) dropped directions of real variance (11-19 of 512 on
    random-weight R18 features, each about 1e10 times the rounding noise, moving the AUROC by up to 0.045 from the
    exact inverse's; found by benchmarks/vs_pytorch_ood.py). Negative eigenvalues are round-off of a PSD matrix.
    The eigensolver overwrites ``cov``: this peaks at about two D x D matrices.
    """
    import scipy.linalg

    d = cov.shape[0]
    mean_sq = float(np.trace(cov)) + float(centre_sq)
    lam, vec = scipy.linalg.eigh(cov, overwrite_a=True, driver="evd", check_finite=False)
    keep = lam > max(d * float(np.finfo(np.float32).eps) ** 2 * mean_sq, 0.0)
    vec *= 1.0 / np.sqrt(np.where(keep, lam, 1.0))
    return vec if keep.all() else np.ascontiguousarray(vec[:, keep])


def labelled_classes(det: Detector, train: Views, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, idx)``: the distinct labels of the ID training views and each sample's index into them;
    raises OodensError unless there is one label >= 0 per training sample."""
    y = np.asarray(det._array(train, "labels"))
    if y.shape != (n,):
        raise OodensError(f"{det.name} needs one label per ID training sample: got labels of shape {y.shape} "
                          f"for {n} features")
    if (y < 0).any():
        raise OodensError(f"{det.name} needs labelled ID training features (labels >= 0)")
    classes, idx = np.unique(y, return_inverse=True)
    return classes, idx


def sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("nr,nr->n", x, x)


@register_detector
@dataclass
class Mahalanobis(FeatureDetector):
    """Class-conditional Gaussian with shared covariance:
    ``-min_c (h - mu_c)^T S^+ (h - mu_c)``, mu_c the ID-train class means (true labels),
    S the shared covariance of the class-centred features (divided by n), S^+ its pseudo-inverse.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018 (penultimate layer, no input preprocessing).

    The pseudo-inverse keeps the eigenvalues of S above D * eps32^2 * E||h||^2 (the variance float32 rounding
    of the features can add; see :func:`pinv_factor`), not numpy's 1e-15 x lambda_max,
    which weights float32 rounding noise by up to 1e15 on near-degenerate covariances.

    On a class-masked set (ImageNet-A/R) the minimum runs over the kept classes' means (the covariance as
    fitted): the restricted model's nearest class, as the masked logits' argmax is its prediction.

    Learned by ``fit``: ``classes_`` (the labels seen), ``means_`` (C, D) the class means,
    ``whiten_`` (D, r) with S^+ = whiten_ whiten_^T, ``n_features_in_``.
    """

    name = "mahalanobis"

    def fit(self, train: Views) -> "Mahalanobis":
        feats = self._fit_features(train)
        classes, idx = labelled_classes(self, train, len(feats))
        means = class_means(feats, idx, len(classes))  # two passes over the features in blocks: bounded memory
        self.classes_, self.means_ = classes, means
        weights = np.bincount(idx, minlength=len(classes)) / len(idx)
        self.whiten_ = pinv_factor(scatter(feats, means, idx), float(weights @ sq_norms(means)))
        self.n_features_in_ = feats.shape[1]
        return self

    def class_distances(self, h: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, C) squared distances (h - mu_c)^T S^+ (h - mu_c) = |h W - mu_c W|^2 of a block of float64 features
        (``rows``: those of the class means at these positions only)."""
        means = self.means_ if rows is None else self.means_[rows]
        mw = means @ self.whiten_  # (C, r)
        hw = h @ self.whiten_
        return sq_norms(hw)[:, None] - 2.0 * hw @ mw.T + sq_norms(mw)[None, :]

    def score_block(self, h: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return -self.class_distances(h, rows).min(axis=1)

    def kept_rows(self, views: Views) -> np.ndarray | None:
        """On a class-masked set (``views.kept``, ImageNet-A/R), the positions of the kept classes among the fitted
        class means: the nearest class is sought among them (as the masked logits' argmax is); None otherwise."""
        kept = getattr(views, "kept", None)
        if kept is None:
            return None
        rows = np.flatnonzero(np.isin(self.classes_, np.asarray(kept)))
        if not len(rows):
            raise OodensError(f"{self.name}: none of the class-masked set's {len(kept)} classes was among the "
                              f"{len(self.classes_)} classes fitted on: expected kept classes of ID train")
        return rows

    def score(self, views: Views) -> np.ndarray:
        """The score of each block of CHUNK queries (float64)."""
        feats = self._score_features(views)
        rows = self.kept_rows(views)
        out = np.empty(len(feats), dtype=np.float64)
        for s in range(0, len(feats), CHUNK):
            out[s : s + CHUNK] = self.score_block(np.asarray(feats[s : s + CHUNK], dtype=np.float64), rows)
        return out


@register_detector
@dataclass
class RMDS(Mahalanobis):
    """Relative Mahalanobis distance: ``-min_c [MD_c(h) - MD_0(h)]``, MD_c the Mahalanobis distance
    to class c (class means and shared class-centred covariance, exactly as ``mahalanobis``), MD_0 the
    distance to a single Gaussian fitted on all ID-train features (their global mean and covariance,
    divided by n). Equivalently ``MD_0(h) - min_c MD_c(h)``. No hyperparameters.

    Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection",
    arXiv:2106.09022 (ICML 2021 UDL workshop), 2021. OpenOOD v1.5's ``rmds`` is the same formula.
    Both pseudo-inverses are cut at float32 resolution (see :func:`pinv_factor`).

    Ensemble strategies as mahalanobis (``concat`` default, ``mean-features``, ``mean-scores``): it fits
    on features and labels only, so it refits on the combined features.

    Learned by ``fit``: as mahalanobis, plus ``mean0_`` (D,) the global mean and ``whiten0_`` (D, r0)
    with Sigma_0^+ = whiten0_ whiten0_^T.
    """

    name = "rmds"

    def fit(self, train: Views) -> "RMDS":
        super().fit(train)
        feats = self._matrix(train, "features")
        self.mean0_ = mean_feature(feats)
        self.whiten0_ = pinv_factor(scatter(feats, self.mean0_), float(self.mean0_ @ self.mean0_))
        return self

    def score_block(self, h: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        md0 = sq_norms((h - self.mean0_) @ self.whiten0_)
        return md0 - self.class_distances(h, rows).min(axis=1)
