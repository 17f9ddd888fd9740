"""Class masks: the classes an OOD-generalization set covers, when it covers a subset of the ID classes.

ImageNet-A and ImageNet-R hold images of 200 of ImageNet-1k's classes; they are scored on those classes only
(Hendrycks et al.'s evaluation, and SED's): the logits (and the final layer W, b) are restricted to the kept
classes, so argmax, accuracy and every score read only them. The lists ship as text files beside this module
(``imagenet-a.txt``, ``imagenet-r.txt``): one line per kept class, ``<ImageNet-1k index> <WordNet id>``, in the
order of the set's own labels (the sorted WordNet ids, i.e. what ``ImageFolder`` numbers 0..199), ``#`` comments.

Label convention of a masked set: its labels are positions in its kept list (0..199 for ImageNet-A/R, as an
``ImageFolder`` over the set's 200 class folders gives them); see :func:`oodens.ensemble.evaluate.mask_views`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oodens.errors import OodensError

HERE = Path(__file__).resolve().parent

#: packaged class lists: set name -> (file, the ID class count the indices refer to)
CLASS_LISTS: dict[str, tuple[str, int]] = {
    "imagenet-a": ("imagenet-a.txt", 1000),
    "imagenet-r": ("imagenet-r.txt", 1000),
}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-").replace(" ", "-")


def read_class_list(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """Kept class indices from a text file: the first field of each non-comment line is a class index (the
    rest, e.g. a WordNet id, is ignored). Indices must be distinct and, with ``num_classes``, in range."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OodensError(f"cannot read class list {path}: {e} (expected one class index per line)") from e
    out = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.append(int(line.split()[0]))
        except ValueError:
            raise OodensError(f"class list {path} line {n}: {line.split()[0]!r} is not a class index "
                              "(expected '<index> [name]' per line)") from None
    return check_kept(out, num_classes, str(path))


def check_kept(kept, num_classes: int | None, what: str) -> np.ndarray:
    """``kept`` as an int64 array, checked: non-empty, distinct, within 0..num_classes-1."""
    arr = np.asarray(list(kept), dtype=np.int64)
    if arr.ndim != 1 or not len(arr):
        raise OodensError(f"class mask {what}: expected a non-empty list of class indices")
    if len(np.unique(arr)) != len(arr):
        raise OodensError(f"class mask {what}: class indices repeat: expected distinct classes")
    if arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes):
        raise OodensError(f"class mask {what}: indices {arr.min()}..{arr.max()} are not classes of "
                          f"0..{(num_classes or 1) - 1}: expected indices of the ID classes")
    return arr


def packaged_mask(name: str, num_classes: int) -> np.ndarray | None:
    """The packaged kept-class list of the set ``name`` (``ImageNet-A``, ``imagenet_r``...) when its class
    indices refer to ``num_classes`` classes (ImageNet-1k: 1000), else None."""
    entry = CLASS_LISTS.get(_key(name))
    if entry is None or entry[1] != num_classes:
        return None
    return read_class_list(HERE / entry[0], num_classes)


def resolve_masks(set_names, num_classes: int, given: dict | None = None) -> dict[str, np.ndarray]:
    """Set name -> kept class indices for the sets among ``set_names`` that are masked: ``given`` entries
    (a list of indices or a path to a class list; a given set that is not evaluated is an error), else the
    packaged list of a set of that name."""
    names = list(set_names)
    given = dict(given or {})
    unknown = [g for g in given if g not in names]
    if unknown:
        raise OodensError(f"class mask for {unknown[0]!r}, which is not an evaluated OOD set: expected one of "
                          f"{', '.join(names) or 'none'}")
    out = {}
    for n in names:
        if n in given:
            v = given[n]
            out[n] = read_class_list(v, num_classes) if isinstance(v, (str, Path)) else \
                check_kept(v, num_classes, repr(n))
        else:
            m = packaged_mask(n, num_classes)
            if m is not None:
                out[n] = m
    return out
