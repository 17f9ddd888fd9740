"""The view types: :class:`ViewSpec` (a view kind with its parameters), :data:`BASE` and :data:`HEAD`, and
:class:`Views`, the arrays a detector reads (see :mod:`oodens.views.cache` for how views are stored)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ViewSpec:
    """A view kind with its parameters, e.g. ``ViewSpec("odin", (("eps", 0.0014), ("temperature", 1000.0)))``."""

    kind: str
    params: tuple[tuple[str, float | int | str], ...] = ()

    @classmethod
    def of(cls, kind: str, **params) -> "ViewSpec":
        return cls(kind, tuple(sorted(params.items())))

    @property
    def id(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.kind}[{inner}]" if inner else self.kind

    def identity(self) -> dict:
        return {"kind": self.kind, "params": dict(self.params)}


BASE = ViewSpec("base")
HEAD = ViewSpec("head")

#: where ODIN adds eps * sign(gradient): to the normalised input the network sees, or in [0, 1] pixel
#: units (eps / std per channel on the normalised input). See :func:`oodens.views.kinds.odin_view`.
ODIN_EPS_SPACES = ("normalized", "pixel")


@dataclass
class Views:
    """The arrays of one mode (or one combined ensemble) on one dataset split.

    ``weight``/``bias`` are the mode's final linear layer (the same for every split);
    ``extra`` holds the other views by :attr:`ViewSpec.id`: the logits array of a logits view (``odin``,
    ``rankfeat``), or ``{array name: array}`` of a view with several arrays (``layers``, ``gram``: one
    array per feature layer, ``layer00``, ``layer01``... in forward order); ``classes`` is set for
    a leave-out member only: the dataset class of each logit column (its ``kept_classes``).

    ``kept`` is set on the views of a class-masked set only (ImageNet-A/R: 200 of ImageNet-1k's classes; see
    :func:`oodens.ensemble.evaluate.mask_views`): the index in the full head of each logit column (and of each row
    of ``weight``/``bias``), so that a detector whose fitted state has one entry per class (templates, class
    patterns, a shaped head...) reads the entries of the kept classes. It is not ``classes``: a leave-out member's
    head *is* that narrow, a masked view is the full head restricted to some of its rows.
    """

    logits: np.ndarray | None = None
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    extra: dict[str, np.ndarray | dict[str, np.ndarray]] = field(default_factory=dict)
    classes: np.ndarray | None = None
    kept: np.ndarray | None = None

    def __len__(self) -> int:
        for a in (self.logits, self.features, self.labels, *self.extra.values()):
            if isinstance(a, dict):
                a = next(iter(a.values()), None)
            if a is not None:
                return len(a)
        return 0
