"""View kinds: what extraction computes from a network and a batch of images.

Each kind is a function ``(model, x, preset, **params) -> {array name: tensor}``
registered in :data:`VIEW_KINDS`. Extraction runs them batch by batch; detectors
only ever read their cached output. Kinds other than ``base`` are computed lazily,
the first time a detector asks for them, and cached with their parameters in the key.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from oodens.data.presets import Preset

ViewFn = Callable[..., dict[str, torch.Tensor]]

#: kind name -> compute function. The one registry of view kinds.
VIEW_KINDS: dict[str, ViewFn] = {}


def register_view(name: str):
    def deco(fn: ViewFn) -> ViewFn:
        VIEW_KINDS[name] = fn
        return fn

    return deco


@register_view("base")
def base_view(model, x: torch.Tensor, preset: Preset) -> dict[str, torch.Tensor]:
    """Penultimate features h and logits z = classifier(h)."""
    with torch.no_grad():
        h = model.forward_features(x)
        return {"logits": model.classifier(h), "features": h}


@register_view("odin")
def odin_view(model, x: torch.Tensor, preset: Preset, temperature: float, eps: float) -> dict[str, torch.Tensor]:
    """Logits z(x_hat) of ODIN's perturbed input, x_hat = x - eps * sign(grad_x CE(z(x)/T, argmax z(x))).

    The perturbation is taken in pixel space ([0, 1] images, as in the ODIN paper), i.e.
    eps/std per channel on the normalised input the network sees. Each call uses
    only this member's own input gradient (``torch.autograd.grad``: nothing accumulates
    in parameters or across members). Liang et al., ICLR 2018.
    """
    if eps == 0:
        with torch.no_grad():
            return {"logits": model(x)}
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        z = model(xg)
        loss = F.cross_entropy(z / temperature, z.argmax(1))
        (grad,) = torch.autograd.grad(loss, xg)
    std = torch.tensor(preset.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    with torch.no_grad():
        return {"logits": model(x - eps / std * torch.sign(grad))}


def remove_rank1(a: torch.Tensor, power_iters: int = 0) -> torch.Tensor:
    """A - s1 u1 v1^T per sample for a feature map (B, C, H, W) seen as (B, C, H*W) matrices.

    ``power_iters = 0``: exact SVD; ``> 0``: that many power iterations from a fixed
    start (all-ones right vector), so the result is deterministic.
    """
    b, c, h, w = a.shape
    m = a.reshape(b, c, h * w).double()
    if power_iters == 0:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        rank1 = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    else:
        v = torch.ones(b, h * w, 1, dtype=m.dtype, device=m.device) / (h * w) ** 0.5
        for _ in range(power_iters):
            u = m @ v
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
            v = m.transpose(1, 2) @ u
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        s = (u.transpose(1, 2) @ m @ v)  # (B, 1, 1)
        rank1 = s * (u @ v.transpose(1, 2))
    return (m - rank1).to(a.dtype).reshape(b, c, h, w)


@register_view("rankfeat")
def rankfeat_view(model, x: torch.Tensor, preset: Preset, power_iters: int) -> dict[str, torch.Tensor]:
    """Mean of two logits: (last-stage map minus rank-1) -> head, and (second-to-last-stage
    map minus rank-1) -> last stage -> head. Song et al., "RankFeat", NeurIPS 2022.

    The architecture says which stages these are (``rankfeat_stages`` / ``last_stage`` /
    ``logits_from_last_stage``).
    """
    with torch.no_grad():
        second, last = model.rankfeat_stages(x)
        z_last = model.logits_from_last_stage(remove_rank1(last, power_iters))
        z_second = model.logits_from_last_stage(model.last_stage(remove_rank1(second, power_iters)))
        return {"logits": (z_last + z_second) / 2}
