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
library model's (its ``net.`` attribute prefix is removed on save and added on load).

Stage maps (the layers/gram views, RankFeat, gradcam diversity), where the model exposes them:

- torchvision ResNets (``torchvision.models.ResNet``: resnet*, resnext*, wide_resnet*): ``layer1..layer4``; RankFeat's
  two stages are ``layer3`` and ``layer4``, the head ``fc(flatten(avgpool(.)))``.
- timm models with ``forward_intermediates``: the maps it returns (``output_fmt="NCHW"``, one per ``feature_info``
  entry; a ViT's patch tokens as a D x H x W map). RankFeat and gradcam also need the last map to be what the head
  reads (``forward_head(last)`` = the logits; CNNs such as resnet, convnext, byobnet): checked on the first batch,
  else a one-line error (a ViT's last map is normed tokens, not a stage map).

Other models (torchvision's ViT, Swin, MobileNet, ...) expose none: asking for stage maps is a one-line error.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from oodens.archs.registry import register_arch_family
from oodens.archs.stages import Layer
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
                 head: Callable[[nn.Module], nn.Module], stages: "Stages | None" = None):
        super().__init__()
        self.arch, self.net = arch, net
        self._features, self._head, self._stages = features, head, stages
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
                          f"gradcam diversity need an oodens architecture (R18, R50, ResNet18_32x32, ...), a "
                          f"torchvision ResNet or a timm model with forward_intermediates")

    def _need_stages(self) -> "Stages":
        if self._stages is None:
            self._no_stages()
        return self._stages

    @property
    def feature_layers(self) -> tuple[Layer, ...]:
        """The stage outputs of the layers/gram views (modules of this wrapper, ``net.``-prefixed)."""
        return self._need_stages().layers

    def stage_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(penultimate features, the stage maps (B, C, ...) in forward order) of one forward pass: what the
        layers/gram views read (:func:`oodens.views.kinds.clean_forward`)."""
        return self._need_stages().maps(self.net, x)

    def rankfeat_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._need_stages().rankfeat_stages(self.arch, self.net, x)

    def last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self._need_stages().last_stage(self.net, a)

    def logits_from_last_stage(self, a: torch.Tensor) -> torch.Tensor:
        return self._need_stages().head(self.net, a)


class Stages:
    """How a library model exposes its stage maps (see the module docstring)."""

    #: the stage outputs, as modules of the :class:`LibraryModel` (``net.<module>``)
    layers: tuple[Layer, ...] = ()

    def maps(self, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def rankfeat_stages(self, arch: str, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def last_stage(self, net: nn.Module, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, net: nn.Module, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


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


class TorchvisionResNetStages(Stages):
    """``torchvision.models.ResNet``: stem, ``layer1..layer4``, ``avgpool``, ``fc`` (its ``_forward_impl``)."""

    layers = tuple(Layer(f"net.layer{i}") for i in range(1, 5))

    @staticmethod
    def _stem(net, x):
        return net.maxpool(net.relu(net.bn1(net.conv1(x))))

    def maps(self, net, x):
        x, out = self._stem(net, x), []
        for i in range(1, 5):
            x = getattr(net, f"layer{i}")(x)
            out.append(x)
        return torch.flatten(net.avgpool(x), 1), out

    def rankfeat_stages(self, arch, net, x):
        second = net.layer3(net.layer2(net.layer1(self._stem(net, x))))
        return second, net.layer4(second)

    def last_stage(self, net, a):
        return net.layer4(a)

    def head(self, net, a):
        return net.fc(torch.flatten(net.avgpool(a), 1))


@register_arch_family("torchvision", _check_torchvision)
def torchvision_model(model: str, num_classes: int) -> nn.Module:
    import torchvision

    net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
    path = _last_linear(net)
    stages = TorchvisionResNetStages() if isinstance(net, torchvision.models.ResNet) else None
    return LibraryModel(f"torchvision:{model}", net, _input_of(path), lambda n: n.get_submodule(path), stages)


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


class TimmStages(Stages):
    """A timm model's ``forward_intermediates``: one NCHW map per ``feature_info`` entry; RankFeat's two stages are
    the last two, the last stage the module of the last entry, the head ``forward_head``."""

    def __init__(self, net: nn.Module):
        self.modules = [str(f["module"]) for f in net.feature_info]
        self.layers = tuple(Layer(f"net.{m}") for m in self.modules)
        self.checked = False

    def maps(self, net, x):
        final, inter = net.forward_intermediates(x, output_fmt="NCHW")
        return net.forward_head(final, pre_logits=True), list(inter)

    def rankfeat_stages(self, arch, net, x):
        final, (second, last) = net.forward_intermediates(x, indices=2, output_fmt="NCHW")
        if not self.checked:  # once per model: the last map must be what the head reads, and the last stage's output
            why = None
            if final is not last and (final.shape != last.shape or not torch.equal(final, last)):
                why = (f"its last map {tuple(last.shape[1:])} is not the features its head reads "
                       f"{tuple(final.shape[1:])}")
            else:
                with torch.no_grad():
                    again = self.last_stage(net, second.detach())
                if again.shape != last.shape or not torch.allclose(again, last.detach(), rtol=1e-4, atol=1e-5):
                    why = f"its module {self.modules[-1]} does not map the second-to-last map to the last"
            if why:
                raise OodensError(f"architecture {arch}: {why}: rankfeat and gradcam diversity need a network whose "
                                  f"last stage feeds its pooling head (timm CNNs such as resnet, convnext); the "
                                  f"layers/gram views work")
            self.checked = True
        return second, last

    def last_stage(self, net, a):
        return net.get_submodule(self.modules[-1])(a)

    def head(self, net, a):
        return net.forward_head(a)


@register_arch_family("timm", _check_timm)
def timm_model(model: str, num_classes: int) -> nn.Module:
    net = _timm().create_model(model, pretrained=False, num_classes=num_classes)
    stages = TimmStages(net) if hasattr(net, "forward_intermediates") and getattr(net, "feature_info", None) else None
    return LibraryModel(f"timm:{model}", net, _timm_features, lambda n: n.get_classifier(), stages)
