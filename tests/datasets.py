"""Tiny datasets in the real on-disk formats, for tests (no download)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def write_cifar(root: Path, num_classes: int = 10, n_train: int = 60, n_test: int = 30, seed: int = 0):
    """torchvision's python format; returns (train x NHWC, train y, test x, test y)."""
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    ytr = rng.integers(0, num_classes, n_train)
    xte = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    yte = rng.integers(0, num_classes, n_test)
    flat = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # noqa: E731  (rows of R, G, B planes)
    if num_classes == 10:
        folder = root / "CIFAR10" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, chunk in enumerate(np.array_split(np.arange(n_train), 5), 1):
            with open(folder / f"data_batch_{i}", "wb") as f:
                pickle.dump({"data": flat(xtr[chunk]), "labels": ytr[chunk].tolist()}, f, protocol=2)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({"data": flat(xte), "labels": yte.tolist()}, f, protocol=2)
    else:
        folder = root / "CIFAR100" / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            with open(folder / name, "wb") as f:
                pickle.dump({"data": flat(x), "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()}, f)
    return xtr, ytr, xte, yte


def write_svhn(path: Path, n: int = 20, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"X": x.transpose(1, 2, 3, 0), "y": rng.integers(1, 11, (n, 1))})
    return x


def write_images(folder: Path, n: int, size=(36, 36), seed: int = 2, classes: list[str] | None = None,
                 suffix: str = ".png") -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img_{i:03d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_cifar_benchmark(root: Path, ood_sets=("SVHN", "LSUN", "Texture")) -> None:
    """CIFAR-10 plus some of its OOD sets laid out as the mode-ensemble paper's code expects."""
    write_cifar(root, 10)
    where = {"LSUN": "LSUN", "LSUN_resize": "LSUN_resize", "iSUN": "iSUN", "places365": "places365"}
    for name in ood_sets:
        if name == "SVHN":
            write_svhn(root / "ood_data" / "svhn" / "test_32x32.mat")
        elif name == "Texture":
            write_images(root / "ood_data" / "dtd" / "images", 12, size=(40, 48), classes=["banded", "woven"],
                         suffix=".jpg")
        else:
            write_images(root / "ood_data" / where[name] / "test", 14, size=(36, 36))


def write_imglist(root: Path, listfile: str, images: str, folder: str, n: int, labels: list[int] | None = None,
                  size=(32, 32), mode: str = "RGB", seed: int = 3, suffix: str = ".png") -> list[tuple[Path, int]]:
    """One OpenOOD image list ``root/listfile`` ("relative/path label" lines, label -1 without ``labels``) over ``n``
    new images ``root/images/folder/img_<i><suffix>`` of ``size`` (w, h) in PIL ``mode``; returns (path, label)."""
    rng = np.random.default_rng(seed)
    (root / images / folder).mkdir(parents=True, exist_ok=True)
    (root / listfile).parent.mkdir(parents=True, exist_ok=True)
    out, lines = [], []
    for i in range(n):
        rel = f"{folder}/img_{i:03d}{suffix}"
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / images / rel)  # 2-D: mode L
        label = labels[i % len(labels)] if labels else -1
        lines.append(f"{rel} {label}\n")
        out.append((root / images / rel, label))
    (root / listfile).write_text("".join(lines))
    return out
