"""Any torchvision or timm classifier as an oodens architecture: ``torchvision:<model>``, ``timm:<model>``.

A mode of such an architecture is a checkpoint holding the library model's own state dict (keys as the library
names them, no prefix). The model is built without weights, so nothing is ever downloaded:
``torchvision.models.get_model(model, weights=None, num_classes=C)`` or
``timm.create_model(model, pretrained=False, num_classes=C)`` (timm is an optional extra: ``oodens[timm]``).

The oodens interface is found generically, never per model name:

- ``classifier``: the final ``nn.Linear``. torchvision: the network's last ``nn.Linear`` in module order (``fc``,
  ``classifier[-1]``, ``heads.head``, ``head``), which is the last operation of every torchvision classifier;
  timm: ``get_classifier()``.
- ``forward_features(x)``: the penultimate features, the classifier's input. torchvision: captured by a forward
  pre-hook on the classifier during the library's own forward; timm: ``forward_head(forward_features(x),
  pre_logits=True)``.

So logits = classifier(forward_features(x)) equal the library's forward. The state dict of the wrapper is the
library model's (its ``net.`` attribute prefix is removed on save and added on load). Stage maps (RankFeat, the
layers/gram views, gradcam diversity) are not exposed: asking for them is a one-line error.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from oodens.archs.registry import register_arch_family
from oodens.errors import OodensError


def _strip_net(module, state_dict, prefix, local_metadata):
    inner = prefix + "net."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_net(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "net.")]:
        state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)


class LibraryModel(nn.Module):
    """A library classifier ``net`` with oodens' interface (see the module docstring). ``features(net, x)`` gives
    the penultimate features, ``head()`` the final ``nn.Linear``."""

    def __init__(self, arch: str, net: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 head: Callable[[nn.Module], nn.Module]):
        super().__init__()
        self.arch, self.net = arch, net
        self._features, self._head = features, head
        linear = self.classifier
        if not isinstance(linear, nn.Linear):
            raise OodensError(f"architecture {arch}: its classifier is a {type(linear).__name__}, expected an "
                              f"nn.Linear head (features and logits need W, b)")
        self.feature_dim = linear.in_features
        self._register_state_dict_hook(_strip_net)
        self.register_load_state_dict_pre_hook(_add_net)

    @property
    def classifier(self) -> nn.Module:
        return self._head(self.net)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = self._features(self.net, x)
        return torch.flatten(h, 1) if h.dim() > 2 else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def _no_stages(self, *args):
        raise OodensError(f"architecture {self.arch} exposes no stage maps: rankfeat, the layers/gram views and "
                          f"gradcam diversity need an oodens architecture (R18, R50, ResNet18_32x32, ...)")

    rankfeat_stages = last_stage = logits_from_last_stage = _no_stages

    @property
    def feature_layers(self):
        self._no_stages()


# ------------------------------------------------------------------ torchvision


@functools.cache
def _torchvision_models() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _check_torchvision(model: str) -> str:
    names = _torchvision_models()
    if model not in names:
        raise OodensError(f"unknown torchvision model {model!r}: expected a classifier of torchvision.models "
                          f"({', '.join(n for n in names if n in ('resnet18', 'resnet50', 'vit_b_16', 'swin_t'))}, "
                          f"...; torchvision.models.list_models(module=torchvision.models))")
    return model


def _last_linear(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise OodensError(f"{type(net).__name__} has no nn.Linear head: expected a classifier whose last layer is "
                          f"linear (features and logits need W, b)")
    return names[-1]


def _input_of(path: str):
    def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = net.get_submodule(path).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            net(x)
        finally:
            handle.remove()
        return seen[-1]
    return features


@register_arch_family("torchvision", _check_torchvision)
def torchvision_model(model: str, num_classes: int) -> nn.Module:
    import torchvision

    net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
    path = _last_linear(net)
    return LibraryModel(f"torchvision:{model}", net, _input_of(path), lambda n: n.get_submodule(path))


# ------------------------------------------------------------------ timm


def _timm():
    try:
        import timm
    except ImportError:
        raise OodensError("timm models need timm: pip install 'oodens[timm]' (or pip install timm)") from None
    return timm


def _check_timm(model: str) -> str:
    timm = _timm()
    if not timm.is_model(model.split(".")[0]):
        raise OodensError(f"unknown timm model {model!r}: expected a name of timm.list_models()")
    return model


def _timm_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(net.forward_features(x), pre_logits=True)


@register_arch_family("timm", _check_timm)
def timm_model(model: str, num_classes: int) -> nn.Module:
    net = _timm().create_model(model, pretrained=False, num_classes=num_classes)
    return LibraryModel(f"timm:{model}", net, _timm_features, lambda n: n.get_classifier())
