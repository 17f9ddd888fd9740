"""SDDE diversity losses: what a jointly trained ensemble adds to its mean cross-entropy.

The SDDE objective (Karimi et al., "Diversifying Deep Ensembles: A Saliency Map Approach for
Enhanced OOD Detection, Calibration, and Accuracy", 2023) for N members f_1..f_N is

    L = mean_n CE(f_n(x), y) + lambda * L_div

Every function below is one L_div formula: it takes the members' outputs for one batch (lists
with one tensor per member, all keeping their autograd graphs) and returns the scalar L_div;
minimising it makes the members differ. z_n are member n's logits (B, C), p_n = softmax(z_n),
y the labels (B,).

Each formula needs the members run in its own way (the second-to-last stage kept, the input
differentiable, an outlier batch in the same pass), so each diversity is an object
(:class:`Diversity`) whose one method, :meth:`Diversity.loss`, takes the members and the batch
the training loop has, runs the members as its formula needs and returns their logits on the ID
batch (for the cross-entropy term) and L_div. The SDDE objective (:class:`oodens.train.loop.SDDE`)
adds ``mean_n CE(z_n, y) + lambda * L_div`` and knows nothing of the diversity it holds.
``DIVERSITIES`` names them with their default lambda.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mean_pairwise_cosine(v: Tensor) -> Tensor:
    """mean over samples b and ordered pairs n != m of cos(v[n, b], v[m, b]); v is (N, B, D)."""
    n = v.shape[0]
    if n < 2:
        raise ValueError("a pairwise diversity needs at least 2 members")
    u = F.normalize(v, dim=2, eps=1e-8)
    sim = torch.einsum("nbd,mbd->bnm", u, u)  # (B, N, N)
    off_diagonal = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=1)
    return (off_diagonal / (n * (n - 1))).mean()


def _true_class_sum(z: Tensor, y: Tensor) -> Tensor:
    return z.gather(1, y[:, None]).sum()


def standardise(v: Tensor, eps: float = 1e-8) -> Tensor:
    """Each row of (B, D) to zero mean and unit (population) standard deviation."""
    v = v - v.mean(dim=1, keepdim=True)
    return v / (v.std(dim=1, unbiased=False, keepdim=True) + eps)


def gradcam_maps(maps: Sequence[Tensor], logits: Sequence[Tensor], y: Tensor) -> Tensor:
    """Grad-CAM of every member for the true class, standardised: (N, B, (H-2)(W-2)).

    For member n with second-to-last-stage map A_n (B, K, H, W) and out_n = sum_b z_n[b, y_b]:
    G = d out_n / d A_n (graph kept, so the maps are differentiable in the weights),
    w = spatial mean of G (B, K), CAM_n = ReLU(sum_k w_k A_n,k), then the 1-pixel border is
    dropped and each map is standardised to zero mean and unit std.
    """
    cams = []
    for a, z in zip(maps, logits):
        (g,) = torch.autograd.grad(_true_class_sum(z, y), a, create_graph=True)
        w = g.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((w * a).sum(dim=1))[:, 1:-1, 1:-1]
        cams.append(standardise(cam.flatten(1)))
    return torch.stack(cams)


def gradcam(maps: Sequence[Tensor], logits: Sequence[Tensor], y: Tensor) -> Tensor:
    """Saliency diversity (SDDE): L_div = mean_b mean_{n != m} cos(CAM_n[b], CAM_m[b]) with the
    standardised Grad-CAM maps of :func:`gradcam_maps`. Default lambda 0.005 (SDDE code)."""
    return mean_pairwise_cosine(gradcam_maps(maps, logits, y))


def input_grad(x: Tensor, logits: Sequence[Tensor], y: Tensor) -> Tensor:
    """Input-gradient diversity: L_div = mean_b mean_{n != m} cos(g_n[b], g_m[b]) with
    g_n = d(sum_b z_n[b, y_b]) / dx flattened per sample (graph kept; ``x`` must require grad and be
    the input every member saw). Default lambda 0.005 (the gradcam weight)."""
    grads = [torch.autograd.grad(_true_class_sum(z, y), x, create_graph=True)[0].flatten(1) for z in logits]
    return mean_pairwise_cosine(torch.stack(grads))


def ncl(logits: Sequence[Tensor], y: Tensor | None = None) -> Tensor:
    """Negative correlation learning (Liu & Yao 1999):
    L_div = mean_b sum_n (p_n - p_bar)^T sum_{m != n} (p_m - p_bar), p_bar = mean_n p_n detached.
    Default lambda 0.1 (SDDE code)."""
    p = torch.stack([F.softmax(z, dim=1) for z in logits])  # (N, B, C)
    d = p - p.mean(dim=0).detach()
    others = d.sum(dim=0, keepdim=True) - d  # sum_{m != n} (p_m - p_bar)
    return (d * others).sum(dim=(0, 2)).mean()


def entropy(p: Tensor, eps: float = 1e-20) -> Tensor:
    """H(p) = -sum_c p_c log p_c per row."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=-1)


def adp(logits: Sequence[Tensor], y: Tensor, alpha: float = 2.0, beta: float = 0.5) -> Tensor:
    """Adaptive diversity promoting (Pang et al., ICML 2019):
    L_div = mean_b [-alpha H(p_bar) - beta log det(G + 1e-5 I)], p_bar = mean_n p_n, G (N x N) the
    Gram matrix of the members' L2-normalised non-true-class probability vectors (p_n without
    entry y_b). alpha = 2, beta = 0.5; default lambda 0.1 (SDDE code)."""
    p = torch.stack([F.softmax(z, dim=1) for z in logits])  # (N, B, C)
    n, b, c = p.shape
    keep = torch.ones(b, c, dtype=torch.bool, device=p.device)
    keep[torch.arange(b, device=p.device), y] = False
    rest = F.normalize(p[:, keep].reshape(n, b, c - 1), dim=2, eps=1e-20).transpose(0, 1)  # (B, N, C-1)
    gram = rest @ rest.transpose(1, 2) + 1e-5 * torch.eye(n, dtype=p.dtype, device=p.device)
    log_det = torch.linalg.slogdet(gram).logabsdet
    return (-alpha * entropy(p.mean(dim=0)) - beta * log_det).mean()


def oe(outlier_logits: Sequence[Tensor]) -> Tensor:
    """Outlier exposure (Hendrycks et al., ICLR 2019): cross-entropy to the uniform distribution
    on outliers, L_div = mean_n mean_{outliers} [logsumexp(z_n) - mean_c z_n,c]. Default lambda 0.5
    (the OE paper's weight, also OpenOOD's)."""
    return torch.stack([(torch.logsumexp(z, dim=1) - z.mean(dim=1)).mean() for z in outlier_logits]).mean()


Members = Sequence[nn.Module]


@dataclass(frozen=True)
class Diversity(ABC):
    """An SDDE diversity term: ``loss(members, x, y, x_out)`` -> (each member's logits on ``x``, L_div).

    ``members`` are the ensemble's networks, ``x`` (B, ...) the ID batch, ``y`` (B,) its labels and
    ``x_out`` an outlier batch (only for a diversity that ``uses_outliers``; None otherwise)."""

    name: str
    default_lambda: float
    #: whether the term reads an outlier batch (``oodens train --outliers``)
    uses_outliers: ClassVar[bool] = False

    @abstractmethod
    def loss(self, members: Members, x: Tensor, y: Tensor, x_out: Tensor | None = None
             ) -> tuple[list[Tensor], Tensor]:
        """Run the members on the batch as the term needs; (their logits on ``x``, L_div)."""


@dataclass(frozen=True)
class OnLogits(Diversity):
    """A formula of the members' logits and the labels (:func:`ncl`, :func:`adp`): one plain pass."""

    fn: Callable[[Sequence[Tensor], Tensor], Tensor]

    def loss(self, members, x, y, x_out=None):
        logits = [m(x) for m in members]
        return logits, self.fn(logits, y)


@dataclass(frozen=True)
class GradCam(Diversity):
    """:func:`gradcam`: each member's pass keeps its second-to-last stage map (``rankfeat_stages``) and
    finishes it into logits, so the Grad-CAM maps are differentiable in the weights."""

    def loss(self, members, x, y, x_out=None):
        maps, logits = [], []
        for m in members:
            a, last = m.rankfeat_stages(x)
            maps.append(a)
            logits.append(m.logits_from_last_stage(last))
        return logits, gradcam(maps, logits, y)


@dataclass(frozen=True)
class InputGrad(Diversity):
    """:func:`input_grad`: the members see a copy of ``x`` that requires grad, so the term can
    differentiate each member's true-class logit with respect to it."""

    def loss(self, members, x, y, x_out=None):
        x = x.detach().requires_grad_(True)
        logits = [m(x) for m in members]
        return logits, input_grad(x, logits, y)


@dataclass(frozen=True)
class OutlierExposure(Diversity):
    """:func:`oe`: one pass per member over the ID batch followed by the outlier batch; the first
    ``len(y)`` rows are the ID logits, the rest the outliers' that the term reads."""

    uses_outliers: ClassVar[bool] = True

    def loss(self, members, x, y, x_out=None):
        inputs, n = torch.cat([x, x_out]), len(y)
        outputs = [m(inputs) for m in members]
        return [z[:n] for z in outputs], oe([z[n:] for z in outputs])


#: name -> diversity. The one registry of SDDE diversities (``oodens train --diversity``).
DIVERSITIES: dict[str, Diversity] = {
    d.name: d
    for d in (
        GradCam("gradcam", 0.005),
        InputGrad("input-grad", 0.005),
        OnLogits("ncl", 0.1, ncl),
        OnLogits("adp", 0.1, adp),
        OutlierExposure("oe", 0.5),
    )
}
