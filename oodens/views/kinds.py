"""View kinds: what extraction computes from a network and a batch of images.

Each kind is a :class:`ViewKind` in :data:`VIEW_KINDS`, called as ``kind(model, x, preset, **params) ->
{array name: tensor}`` on one batch. Extraction computes every view a mode needs on one dataset split in
one loop over the data, and per batch runs the clean forward pass (:func:`clean_forward`: logits,
features and, when a kind needs them, the maps of the architecture's ``feature_layers``, captured by
forward hooks) at most once: the ``shared`` kinds (``base``, ``layers``, ``gram``) are functions of
that :class:`Forward`. ``odin`` (a perturbed input) and ``rankfeat`` (modified stage maps) run passes of
their own. Detectors only ever read the cached output. Kinds other than ``base`` are computed the first
time a detector asks for them, and cached with their parameters in the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from oodens.data.presets import Preset
from oodens.views.types import ODIN_EPS_SPACES

ViewFn = Callable[..., dict[str, torch.Tensor]]


@dataclass
class Forward:
    """The clean forward pass of a batch: logits, penultimate features and the feature layers' maps."""

    logits: torch.Tensor
    features: torch.Tensor
    maps: list[torch.Tensor]


def clean_forward(model, x: torch.Tensor, maps: bool = False) -> Forward:
    """logits = classifier(forward_features(x)); with ``maps``, the ``feature_layers`` maps of the same pass
    (forward hooks on their modules, removed afterwards; on the eager modules of a compiled network), or, for a
    network with ``stage_maps(x) -> (features, maps)`` (torchvision/timm models, :mod:`oodens.archs.zoo`), its own."""
    net = getattr(model, "eager", model) if maps else model
    given = getattr(net, "stage_maps", None) if maps else None
    if given is not None:  # a library model gives its maps itself (timm's forward_intermediates; oodens.archs.zoo)
        with torch.no_grad():
            h, stage = given(x)
            return Forward(net.classifier(h), h, list(stage))
    layers = net.feature_layers if maps else ()
    outs: list[torch.Tensor | None] = [None] * len(layers)

    def keep(i):
        def hook(module, inputs, output):
            outs[i] = output
        return hook

    handles = [net.get_submodule(layer.module).register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            h = net.forward_features(x)
            z = net.classifier(h)
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer.module for layer, out in zip(layers, outs) if out is None]
    if missing:
        raise RuntimeError(f"{type(net).__name__}.feature_layers names modules that the forward pass does not "
                           f"run: {', '.join(missing)}")
    return Forward(z, h, [layer.as_map(out) for layer, out in zip(layers, outs)])


@dataclass(frozen=True)
class ViewKind:
    """A view kind. ``fn`` is ``fn(forward, **params)`` for a ``shared`` kind (a function of the clean
    forward pass, :class:`Forward`), else ``fn(model, x, preset, **params)``. ``maps``: it reads the
    feature layers' maps; ``fit``: detectors fit on it, so it is extracted on the ID training split too."""

    fn: ViewFn
    shared: bool = False
    maps: bool = False
    fit: bool = False

    def __call__(self, model, x: torch.Tensor, preset: Preset, **params) -> dict[str, torch.Tensor]:
        """The view of one batch on its own (a shared kind runs its own clean forward pass)."""
        if self.shared:
            return self.fn(clean_forward(model, x, self.maps), **params)
        return self.fn(model, x, preset, **params)


#: kind name -> ViewKind. The one registry of view kinds.
VIEW_KINDS: dict[str, ViewKind] = {}


def register_view(name: str, shared: bool = False, maps: bool = False, fit: bool = False):
    def deco(fn: ViewFn) -> ViewFn:
        VIEW_KINDS[name] = ViewKind(fn, shared=shared, maps=maps, fit=fit)
        return fn

    return deco


def layer_name(i: int) -> str:
    """The array name of the i-th feature layer in the ``layers`` and ``gram`` views (sorted = forward order)."""
    return f"layer{i:02d}"


def gram_features(a: torch.Tensor, orders: int) -> torch.Tensor:
    """(B, P, C) Gram features of a (B, C, ...) map, P = ``orders`` (Sastry & Oore, ICML 2020).

    With F the C x HW matrix of the map and F^p its elementwise p-th power, order p gives one value per
    channel i: the i-th row sum of the Gram matrix F^p F^p^T, signed p-th root:
    ``g_p,i = sign(s) |s|^(1/p)``, ``s = sum_j (F^p F^p^T)_ij = sum_k F^p_ik (sum_j F^p_jk)``.
    Computed in float64 (F^10 overflows float32 for activations above ~10) on the map's device.
    """
    f = a.flatten(2)
    f = (f.cpu() if f.device.type == "mps" else f).double()  # MPS has no float64
    out = []
    for p in range(1, orders + 1):
        fp = f**p
        s = (fp * fp.sum(dim=1, keepdim=True)).sum(dim=2)
        out.append(s.sign() * s.abs() ** (1.0 / p))
    return torch.stack(out, dim=1)


@register_view("base", shared=True)
def base_view(fwd: Forward) -> dict[str, torch.Tensor]:
    """Penultimate features h and logits z = classifier(h)."""
    return {"logits": fwd.logits, "features": fwd.features}


@register_view("layers", shared=True, maps=True, fit=True)
def layers_view(fwd: Forward) -> dict[str, torch.Tensor]:
    """The global-average-pooled map of each feature layer: ``layerNN`` (n, C_l)."""
    return {layer_name(i): m.flatten(2).mean(dim=2) for i, m in enumerate(fwd.maps)}


@register_view("gram", shared=True, maps=True, fit=True)
def gram_view(fwd: Forward, orders: int) -> dict[str, torch.Tensor]:
    """The Gram features of each feature layer for p = 1..``orders``: ``layerNN`` (n, P, C_l)."""
    return {layer_name(i): gram_features(m, orders) for i, m in enumerate(fwd.maps)}


def odin_step(grad: torch.Tensor, eps_space: str, std) -> torch.Tensor:
    """ODIN's step direction: sign(grad) with a zero gradient mapped to +1 (``torch.ge(grad, 0)`` in the
    reference codes), divided by the preset's std per channel in ``pixel`` space."""
    step = torch.where(grad >= 0, 1.0, -1.0).to(grad.dtype)
    if eps_space == "pixel":
        step = step / torch.tensor(std, dtype=grad.dtype, device=grad.device).view(1, -1, *([1] * (grad.ndim - 2)))
    return step


@register_view("odin")
def odin_view(model, x: torch.Tensor, preset: Preset, temperature: float, eps: float,
              eps_space: str = "pixel") -> dict[str, torch.Tensor]:
    """Logits z(x_hat) of ODIN's perturbed input, x_hat = x - eps * step,
    step = sign(grad_x CE(z(x)/T, argmax z(x))) with a zero gradient counted as +1.

    ``eps_space`` (:data:`~oodens.views.types.ODIN_EPS_SPACES`): ``normalized`` adds eps to the normalised
    input the network sees (the mode-ensemble paper's, DICE's and pytorch-ood's code); ``pixel`` adds it
    in [0, 1] pixel units, i.e. eps/std per channel on the normalised input (ODIN's original code,
    OpenOOD, ELOC's code; this function's default: the detectors always pass theirs). Each call uses
    only this member's own input gradient (``torch.autograd.grad``: nothing accumulates in parameters
    or across members). Liang et al., ICLR 2018.
    """
    if eps_space not in ODIN_EPS_SPACES:
        raise ValueError(f"eps_space {eps_space!r}: expected one of {', '.join(ODIN_EPS_SPACES)}")
    if eps == 0:
        with torch.no_grad():
            return {"logits": model(x)}
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        z = model(xg)
        loss = F.cross_entropy(z / temperature, z.argmax(1))
        (grad,) = torch.autograd.grad(loss, xg)
    with torch.no_grad():
        return {"logits": model(x - eps * odin_step(grad, eps_space, preset.std))}


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
