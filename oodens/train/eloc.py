"""ELOC leave-out ensembles: the class split and the margin-entropy loss.

Vyas et al., "Out-of-Distribution Detection Using an Ensemble of Self Supervised Leave-out
Classifiers", ECCV 2018. K classifiers; classifier k is trained on all classes but the k-th of K
class groups, and learns to be less certain on the classes it left out (the training set's own
"outliers") than on the ones it kept:

    L_k = CE(z_k[in], y_k[in]) + beta * max(0, m + mean H(p_k[in]) - mean H(p_k[out]))

with p_k = softmax(z_k) over its kept classes, "in" the samples of the batch from its kept classes
(labels relabelled to its outputs), "out" those from its left-out classes, m = 0.4, beta = 0.2.
The ``eloc`` detector scores an input with the K members (:mod:`oodens.detectors.disagreement`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: the seed of the class permutation (ELOC's code: ``numpy.random.seed(3)``)
SPLIT_SEED = 3
MARGIN = 0.4
BETA = 0.2


def class_permutation(num_classes: int) -> np.ndarray:
    """``numpy.random.seed(3); numpy.random.permutation(C)`` (restores NumPy's global state after)."""
    state = np.random.get_state()
    try:
        np.random.seed(SPLIT_SEED)
        return np.random.permutation(num_classes)
    finally:
        np.random.set_state(state)


def leave_out_split(num_classes: int, k: int) -> list[tuple[list[int], list[int]]]:
    """Per member: (kept classes, left-out classes), both in permutation order.

    The permutation is cut into ``k`` groups as equal as possible (``np.array_split``); member i
    leaves out group i and keeps the rest. Output j of member i is class ``kept[j]``.
    """
    if not 2 <= k <= num_classes:
        raise ValueError(f"leave-out needs 2 <= K <= {num_classes} classes, got K = {k}")
    perm = class_permutation(num_classes)
    groups = np.array_split(perm, k)
    out = []
    for g in groups:
        left = {int(c) for c in g}
        out.append(([int(c) for c in perm if int(c) not in left], [int(c) for c in g]))
    return out


def relabel_table(kept: list[int], num_classes: int) -> Tensor:
    """(C,) long tensor: original class -> member output index, -1 for left-out classes."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    return table


def mean_entropy(z: Tensor) -> Tensor:
    """Batch mean of H(softmax(z))."""
    return -(F.softmax(z, dim=1) * F.log_softmax(z, dim=1)).sum(dim=1).mean()


def eloc_loss(z: Tensor, target: Tensor, margin: float = MARGIN, beta: float = BETA) -> Tensor:
    """The loss of one leave-out member on a batch: ``z`` its logits (B, C_kept), ``target`` the
    relabelled classes (-1 for samples of its left-out classes, which form the out batch).

    CE over the in samples + beta * max(0, margin + H_in - H_out) (batch-mean entropies); a batch
    without in (or out) samples contributes no CE (no margin) term, and keeps the graph."""
    inn, out = target >= 0, target < 0
    loss = z.sum() * 0.0
    if inn.any():
        loss = loss + F.cross_entropy(z[inn], target[inn])
        if out.any():
            loss = loss + beta * F.relu(margin + mean_entropy(z[inn]) - mean_entropy(z[out]))
    return loss
