"""The reference architectures: strict loading of the reference checkpoints' keys, forward
passes equal to an independent computation, and RankFeat's stage interface.

Each architecture gets a random state dict with exactly the keys and shapes of
``shared/compat/<file>.json`` (or, in a clone without ``../shared``, of the model itself),
loaded with ``strict=True``; features and logits on a seeded input are compared, in
float64, with a functional re-computation from the state-dict tensors (R18, WRN28X10,
DNBC100, T2T-ViT-14) or with a plain torchvision model holding the same weights (R50,
DN121).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodens.archs import arch_folder, canonical_arch, create_model
from oodens.data import get_preset
from oodens.modes.checkpoints import load_weights, read_state_dict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COMPAT = SHARED / "compat"
DICE_DIR = SHARED / "fixtures" / "dice-densenet-bc100-cifar10"

RTOL, ATOL = 1e-5, 1e-8


@dataclass(frozen=True)
class Case:
    arch: str
    compat: str  # file name in shared/compat
    num_classes: int  # used when ../shared is absent (the compat file's head otherwise)
    size: int  # input side
    batch: int
    dataparallel: bool  # the reference checkpoints carry the ``module.`` prefix


CASES = [
    Case("R18", "r18_cifar.json", 10, 32, 2, False),
    Case("WRN28X10", "wrn28x10_cifar.json", 10, 32, 2, False),
    Case("DNBC100", "densenet_bc100_cifar10_dice.json", 10, 32, 2, False),
    Case("R50", "r50_imagenet_dataparallel.json", 1000, 64, 2, True),
    Case("DN121", "dn121_imagenet_dataparallel.json", 1000, 64, 2, True),
    Case("T2T-ViT-14", "t2t_vit_14_imagenet.json", 1000, 224, 1, False),
]
HEADS = {"R18": "linear", "WRN28X10": "linear", "DNBC100": "fc", "R50": "fc", "DN121": "classifier",
         "T2T-ViT-14": "head"}
FEATURE_DIMS = {"R18": 512, "WRN28X10": 640, "DNBC100": 342, "R50": 2048, "DN121": 1024, "T2T-ViT-14": 384}


def compat_spec(case: Case) -> dict[str, list[int]] | None:
    """Keys -> shapes as the compat file lists them (``module.`` prefix kept), or None."""
    path = COMPAT / case.compat
    return json.loads(path.read_text()) if path.exists() else None


def strip(spec: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in spec.items()}


def random_state_dict(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """float32 tensors of the given shapes, scaled so that deep forwards stay finite:
    weights ~ N(0, 1/fan_in), norm scales and running variances in [0.5, 1.5], small
    biases and running means, int64 scalar ``num_batches_tracked``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        name = key.rsplit(".", 1)[-1]
        if name == "num_batches_tracked":
            out[key] = torch.tensor(int(torch.randint(0, 10_000, (), generator=g)), dtype=torch.int64)
        elif name == "running_var" or (name == "weight" and len(shape) == 1):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) <= 1 or name == "running_mean":
            out[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


# ---------------------------------------------------------------- independent forwards
# Each returns (features, logits, second-to-last stage map, last stage map), float64.

def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def _linear(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def reference_r18(sd, x):
    out = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"))
    maps = {}
    for layer in range(1, 5):
        for b in range(2):
            p = f"layer{layer}.{b}"
            stride = 2 if (layer > 1 and b == 0) else 1
            o = F.relu(_bn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"))
            o = _bn(F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in sd:
                sc = _bn(F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=stride), sd, f"{p}.shortcut.1")
            else:
                sc = out
            out = F.relu(o + sc)
        maps[layer] = out
    h = F.avg_pool2d(out, 4).reshape(out.shape[0], -1)
    return h, _linear(h, sd, "linear"), maps[3], maps[4]


def reference_wrn(sd, x):
    out = F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=1)
    maps = {}
    for layer, first_stride in zip((1, 2, 3), (1, 2, 2)):
        for b in range(4):
            p = f"layer{layer}.{b}"
            stride = first_stride if b == 0 else 1
            o = F.conv2d(F.relu(_bn(out, sd, f"{p}.bn1")), sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1)
            o = F.conv2d(F.relu(_bn(o, sd, f"{p}.bn2")), sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"],
                         stride=stride, padding=1)
            if f"{p}.shortcut.0.weight" in sd:
                sc = F.conv2d(out, sd[f"{p}.shortcut.0.weight"], sd[f"{p}.shortcut.0.bias"], stride=stride)
            else:
                sc = out
            out = o + sc
        maps[layer] = out
    last = F.relu(_bn(out, sd, "bn1"))
    h = F.avg_pool2d(last, 8).reshape(out.shape[0], -1)
    return h, _linear(h, sd, "linear"), maps[2], last


def reference_dnbc(sd, x):
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    second = None
    for block in (1, 2, 3):
        n_layers = len({k.split(".")[2] for k in sd if k.startswith(f"block{block}.layer.")})
        for i in range(n_layers):
            p = f"block{block}.layer.{i}"
            o = F.conv2d(F.relu(_bn(out, sd, f"{p}.bn1")), sd[f"{p}.conv1.weight"])
            o = F.conv2d(F.relu(_bn(o, sd, f"{p}.bn2")), sd[f"{p}.conv2.weight"], padding=1)
            out = torch.cat([out, o], dim=1)
        if block < 3:
            t = f"trans{block}"
            out = F.avg_pool2d(F.conv2d(F.relu(_bn(out, sd, f"{t}.bn1")), sd[f"{t}.conv1.weight"]), 2)
            second = out
    last = F.relu(_bn(out, sd, "bn1"))
    h = F.avg_pool2d(last, 8).reshape(out.shape[0], -1)
    return h, _linear(h, sd, "fc"), second, last


def _ln(x, sd, p):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _performer(x, sd, p):
    """The T2T Performer layer written with the reference's einsum formulation."""
    x = _ln(x, sd, f"{p}.norm1")
    emb = sd[f"{p}.proj.weight"].shape[0]
    k, q, v = _linear(x, sd, f"{p}.kqv").split(emb, dim=-1)
    w = sd[f"{p}.w"]
    m = w.shape[0]

    def phi(t):
        return torch.exp(torch.einsum("bti,mi->btm", t, w) - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kp, qp = phi(k), phi(q)
    d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(2)
    kptv = torch.einsum("bin,bim->bnm", v, kp)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (d + 1e-8)
    y = v + _linear(y, sd, f"{p}.proj")
    return y + _linear(F.gelu(_linear(_ln(y, sd, f"{p}.norm2"), sd, f"{p}.mlp.0")), sd, f"{p}.mlp.2")


def _vit_block(x, sd, p, heads):
    b, n, c = x.shape
    y = _ln(x, sd, f"{p}.norm1")
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2)
               for t in F.linear(y, sd[f"{p}.attn.qkv.weight"]).split(c, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
    x = x + _linear(o.transpose(1, 2).reshape(b, n, c), sd, f"{p}.attn.proj")
    return x + _linear(F.gelu(_linear(_ln(x, sd, f"{p}.norm2"), sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")


def reference_t2t(sd, x, heads=6):
    def square(t):
        b, n, c = t.shape
        s = math.isqrt(n)
        return t.transpose(1, 2).reshape(b, c, s, s)

    t = _performer(F.unfold(x, 7, padding=2, stride=4).transpose(1, 2), sd, "tokens_to_token.attention1")
    t = _performer(F.unfold(square(t), 3, padding=1, stride=2).transpose(1, 2), sd, "tokens_to_token.attention2")
    t = _linear(F.unfold(square(t), 3, padding=1, stride=2).transpose(1, 2), sd, "tokens_to_token.project")
    t = torch.cat([sd["cls_token"].expand(t.shape[0], -1, -1), t], dim=1) + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    second = None
    for i in range(depth):
        if i == depth - 1:
            second = t
        t = _vit_block(t, sd, f"blocks.{i}", heads)
    h = _ln(t[:, 0], sd, "norm")
    as_map = lambda tok: tok.transpose(1, 2).unsqueeze(-1)  # noqa: E731  (B, N, D) -> (B, D, N, 1)
    return h, _linear(h, sd, "head"), as_map(second), as_map(t)


def reference_torchvision(arch: str, state: dict[str, torch.Tensor], x: torch.Tensor, num_classes: int):
    """A plain torchvision model with the same weights; stage maps and features via hooks."""
    import torchvision

    if arch == "R50":
        ref = torchvision.models.resnet50(num_classes=num_classes)
        second_mod, last_mod, head = ref.layer3, ref.layer4, ref.fc
    else:
        ref = torchvision.models.densenet121(num_classes=num_classes)
        second_mod, last_mod, head = ref.features.transition3, ref.features.norm5, ref.classifier
    ref.load_state_dict(state, strict=True)
    ref = ref.double().eval()
    seen = {}
    # clone: torchvision's DenseNet applies an in-place ReLU to norm5's output
    second_mod.register_forward_hook(lambda m, i, o: seen.__setitem__("second", o.clone()))
    last_mod.register_forward_hook(lambda m, i, o: seen.__setitem__("last", o.clone()))
    head.register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0].clone()))
    with torch.no_grad():
        z = ref(x)
    return seen["h"], z, seen["second"], seen["last"]


FUNCTIONAL = {"R18": reference_r18, "WRN28X10": reference_wrn, "DNBC100": reference_dnbc, "T2T-ViT-14": reference_t2t}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=CASES, ids=[c.arch for c in CASES])
def built(request):
    """One architecture with a random state dict of the reference keys, loaded strictly (float64, eval)."""
    case: Case = request.param
    spec = compat_spec(case)
    if spec is None:  # a clone without ../shared: the model's own keys stand in for the compat file
        shapes = {k: list(v.shape) for k, v in create_model(case.arch, case.num_classes).state_dict().items()}
        num_classes = case.num_classes
    else:
        shapes = strip(spec)
        num_classes = shapes[f"{HEADS[case.arch]}.weight"][0]
    state = random_state_dict(shapes, seed=sum(map(ord, case.arch)))
    model = create_model(case.arch, num_classes)
    model.load_state_dict(state, strict=True)
    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=g, dtype=torch.float64)
    sd64 = {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}
    with torch.no_grad():
        if case.arch in FUNCTIONAL:
            ref = FUNCTIONAL[case.arch](sd64, x)
        else:
            ref = reference_torchvision(case.arch, state, x, num_classes)
        # the model's side, computed once for the tests below
        h = model.forward_features(x)
        second, last = model.rankfeat_stages(x)
        out = SimpleNamespace(h=h, z=model(x), z_head=model.classifier(h), second=second, last=last,
                              z_from_second=model.logits_from_last_stage(model.last_stage(second)),
                              z_from_last=model.logits_from_last_stage(last))
    yield SimpleNamespace(case=case, spec=spec, state=state, num_classes=num_classes, model=model, x=x, out=out,
                          ref_h=ref[0], ref_z=ref[1], ref_second=ref[2], ref_last=ref[3])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())))


# ---------------------------------------------------------------- tests

def test_state_dict_matches_compat_file(built):
    if built.spec is None:
        pytest.skip("../shared/compat is absent")
    model_shapes = {k: list(v.shape) for k, v in built.model.state_dict().items()}
    assert model_shapes == strip(built.spec)
    assert all(k.startswith("module.") for k in built.spec) == built.case.dataparallel


def test_forward_equals_independent_computation(built):
    m, x, out = built.model, built.x, built.out
    assert isinstance(m.classifier, nn.Linear)
    assert m.classifier is getattr(m, HEADS[built.case.arch])
    assert out.h.shape == (x.shape[0], FEATURE_DIMS[built.case.arch])
    assert out.z.shape == (x.shape[0], built.num_classes)
    assert torch.isfinite(out.z).all() and float(out.z.std()) > 0
    close(out.h, built.ref_h)
    close(out.z, built.ref_z)
    close(out.z_head, out.z)


def test_rankfeat_stages_consistent_with_forward(built):
    out = built.out
    assert out.second.dim() == 4 and out.last.dim() == 4
    close(out.second, built.ref_second)
    close(out.last, built.ref_last)
    close(out.z_from_second, out.z)
    close(out.z_from_last, out.z)


def test_rank1_removal_applies_to_stage_maps(built):
    """What the rankfeat view does with the maps: (B, C, H*W) matrices, rank-1 part removed."""
    from oodens.views.kinds import remove_rank1

    m, out = built.model, built.out
    with torch.no_grad():
        z = m.logits_from_last_stage(remove_rank1(out.last))
    b, c = out.last.shape[:2]
    s = torch.linalg.svdvals(out.last.reshape(b, c, -1))
    s_removed = torch.linalg.svdvals(remove_rank1(out.last).reshape(b, c, -1))
    torch.testing.assert_close(s_removed[:, : s.shape[1] - 1], s[:, 1:], rtol=1e-6, atol=1e-9 * float(s.max()))
    assert z.shape == out.z.shape and torch.isfinite(z).all() and not torch.allclose(z, out.z)


def test_load_weights_from_checkpoint_file(built, tmp_path):
    """The reference layout on disk: ``{"state_dict": ...}`` (plus other keys), with
    DataParallel's ``module.`` prefix where the reference checkpoints have it (R50, DN121);
    the loader strips the prefix and loads strictly."""
    prefix = "module." if built.case.dataparallel else ""
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {prefix + k: v for k, v in built.state.items()}, "epoch": 3}, path)
    if built.spec is not None:
        assert list(read_state_dict(path)) == list(strip(built.spec))
    model = load_weights(create_model(built.case.arch, built.num_classes), path, built.case.arch)
    loaded = model.state_dict()
    assert loaded.keys() == built.state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in built.state.items())


def test_registry_names_and_folders():
    for case in CASES:
        assert canonical_arch(case.arch.lower()) == case.arch
        assert arch_folder(case.arch) == case.arch


def test_wrn_dropout_only_in_training():
    model = create_model("WRN28X10", 10)
    rates = [mod.p for mod in model.modules() if isinstance(mod, nn.Dropout)]
    assert rates == [0.3] * 12
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_dice_densenet_checkpoint():
    ckpt = DICE_DIR / "checkpoint_100.pth.tar"
    if not ckpt.exists():
        pytest.skip("../shared/fixtures (DICE's DenseNet-BC-100) is absent")
    model = load_weights(create_model("DNBC100", 10), ckpt, "DNBC100").eval()
    g = torch.Generator().manual_seed(1)
    x = get_preset("cifar-dice").normalize(torch.rand(4, 3, 32, 32, generator=g))
    with torch.no_grad():
        h = model.forward_features(x)
        z = model(x)
        second, last = model.rankfeat_stages(x)
        z_stage = model.logits_from_last_stage(model.last_stage(second))
    assert h.shape == (4, 342)
    assert (h >= 0).all() and float(h.max()) > 0
    torch.testing.assert_close(model.classifier(h), z)
    torch.testing.assert_close(z_stage, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logits_from_last_stage(last), z, rtol=1e-5, atol=1e-5)
    # DESIGN.md's known fact: DICE's threshold at p = 90 on mean * fc.weight
    mean_path = DICE_DIR / "train_feature_mean.npy"
    if mean_path.exists():
        contrib = np.load(mean_path)[None, :] * model.fc.weight.detach().numpy()
        thresh = np.percentile(contrib, 90)
        assert abs(thresh - 0.015367) < 5e-7
        assert (contrib > thresh).sum(1).tolist() == [39, 32, 36, 40, 38, 38, 31, 29, 26, 33]
