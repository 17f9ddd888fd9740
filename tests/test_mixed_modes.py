"""Mode sets of mixed architectures and widths (a CNN, a ViT and a torchvision model trained on the same classes), and
the stage maps of library models (torchvision ResNets, timm's ``forward_intermediates``) that rankfeat, the
layers/gram views and gradcam diversity read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax

from oodens.api import Experiment, get_benchmark, load_modes
from oodens.archs import create_model
from oodens.data import get_preset
from oodens.errors import OodensError, OodensWarning
from oodens.modes.discovery import discover_modes
from oodens.views.kinds import VIEW_KINDS, clean_forward

from cli_runner import run
from datasets import write_imglist

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="timm is not installed (pip install 'oodens[timm]')")

#: a timm CNN (96-d features), a timm ViT (64-d) and a torchvision MobileNet (1024-d), one preset (timm's test_vit)
MIXED = [(1, "timm:test_resnet"), (2, "timm:test_vit"), (3, "torchvision:mobilenet_v3_small")]
PRESET = "timm:test_vit"


def _save_mode(folder: Path, arch: str, seed: int, num_classes: int = 10, dataset: str = "cifar10",
               preset: str = PRESET) -> None:
    torch.manual_seed(seed)
    model = create_model(arch, num_classes).eval()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "oodens.json").write_text(json.dumps({"arch": arch, "dataset": dataset, "num_classes": num_classes,
                                                    "preset": preset, "seed": seed}))


def _tiny_openood_cifar10(root: Path) -> None:
    lists = "benchmark_imglist/cifar10"
    write_imglist(root, f"{lists}/train_cifar10.txt", "images_classic", "cifar10/train", 20, list(range(10)), seed=2)
    write_imglist(root, f"{lists}/test_cifar10.txt", "images_classic", "cifar10/test", 6, list(range(10)))
    write_imglist(root, f"{lists}/test_tin.txt", "images_classic", "tin/test", 4, None, (64, 64), seed=4)
    write_imglist(root, f"{lists}/test_mnist.txt", "images_classic", "mnist/test", 4, None, (28, 28), "L", seed=5)


@needs_timm
def test_mixed_architectures_are_one_set_but_classes_and_datasets_must_agree(tmp_path):
    for seed, arch in MIXED:
        _save_mode(tmp_path / "ok" / f"seed-{seed}", arch, seed)
    modes = load_modes(tmp_path / "ok")
    assert [m.arch for m in modes] == [a for _, a in MIXED]
    assert modes.mixed and modes.archs == [a for _, a in MIXED]
    assert modes.arch == "timm:test_resnet+timm:test_vit+torchvision:mobilenet_v3_small"
    plain = load_modes(tmp_path / "ok" / "seed-1")
    assert not plain.mixed and plain.arch == "timm:test_resnet"

    _save_mode(tmp_path / "classes" / "seed-1", "timm:test_resnet", 1)
    _save_mode(tmp_path / "classes" / "seed-2", "timm:test_vit", 2, num_classes=6)
    with pytest.raises(OodensError, match="mode seed-2 has num_classes 6 but mode seed-1 has 10: all modes of a set "
                                          "must share num_classes") as e:
        discover_modes(tmp_path / "classes")
    assert "\n" not in str(e.value)
    _save_mode(tmp_path / "data" / "seed-1", "timm:test_resnet", 1)
    _save_mode(tmp_path / "data" / "seed-2", "timm:test_vit", 2, dataset="cifar100", num_classes=10)
    with pytest.raises(OodensError, match="mode seed-2 has dataset 'cifar100' but mode seed-1 has 'cifar10'"):
        discover_modes(tmp_path / "data")


@needs_timm
def test_mixed_set_evaluates_and_the_ensemble_is_the_hand_computation(tmp_path, capsys):
    _tiny_openood_cifar10(tmp_path / "data")
    for seed, arch in MIXED:
        _save_mode(tmp_path / "modes" / f"seed-{seed}", arch, seed)
    args = ["--modes", str(tmp_path / "modes"), "--benchmark", "openood-cifar10", "--data-root", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "c"), "--results", str(tmp_path / "r"), "--batch-size", "16"]
    code, out, err = run(["eval", *args, "--detector", "msp,knn", "--knn-k", "5", "--save-scores",
                          str(tmp_path / "s")], capsys)
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps long lines
    assert "3 modes of timm:test_resnet+timm:test_vit+torchvision:mobilenet_v3_small" in out
    for seed, arch in MIXED:  # the tables name each member's architecture
        assert f"seed-{seed} ({arch})" in out

    with pytest.warns(OodensWarning, match="OOD sets not on disk"):
        bench = get_benchmark("openood-cifar10", tmp_path / "data")
    exp = Experiment(tmp_path / "modes", bench, cache_dir=tmp_path / "c")
    views = exp.views(["knn"])  # the cache eval filled: nothing is extracted again
    names = [f"seed-{s}" for s, _ in MIXED]
    assert [views[n].test.features.shape[1] for n in names] == [96, 64, 1024]
    bench = "openood-cifar10"

    def saved(run_name, member, dataset):
        return np.load(tmp_path / "s" / run_name / member / f"{dataset}.npy")

    def l2(f):
        f = np.asarray(f, dtype=np.float64)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    # knn normalises what it reads, so the concatenation of the members' unit vectors is normalised once more
    bank = l2(np.concatenate([l2(views[n].train.features) for n in names], axis=1))
    for dataset, pick in [(bench, lambda v: v.test), ("tin", lambda v: v.ood["tin"]), ("mnist", lambda v: v.ood["mnist"])]:
        # msp · mean-logits: max softmax of the members' averaged logits
        z = np.mean([np.asarray(pick(views[n]).logits, dtype=np.float64) for n in names], axis=0)
        np.testing.assert_allclose(saved("msp-mean-logits", "ensemble", dataset), softmax(z, axis=1).max(axis=1),
                                   rtol=1e-5, atol=1e-6)
        # knn · concat: [h_1/|h_1|, h_2/|h_2|, h_3/|h_3|] of widths 96 + 64 + 1024, normalised, minus the distance to
        # the 5th nearest training sample
        q = l2(np.concatenate([l2(pick(views[n]).features) for n in names], axis=1))
        assert q.shape[1] == 96 + 64 + 1024
        d = np.sqrt(((q[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2))
        np.testing.assert_allclose(saved("knn-concat", "ensemble", dataset), -np.sort(d, axis=1)[:, 4],
                                   rtol=1e-4, atol=1e-4)

    recs = json.loads(run(["eval", *args, "--detector", "msp", "--json"], capsys)[1])
    by_member = {r["member"]: r.get("arch") for r in recs if r["ood"] == "tin"}  # a member's record: its own
    assert by_member == {**{f"seed-{s}": a for s, a in MIXED}, "mean": None, "std": None, "ensemble": None}
    code, out, err = run(["report", "--results", str(tmp_path / "r")], capsys)
    assert code == 0, err
    out = " ".join(out.split())
    assert "seed-2 (timm:test_vit)" in out and "(3 modes of timm:test_resnet+timm:test_vit+" in out

    # averaging features needs equal widths: one line naming them
    code, out, err = run(["eval", *args, "--detector", "knn", "--knn-k", "5", "--strategy", "mean-features"], capsys)
    assert code == 2
    line = [x for x in err.strip().splitlines() if "mean-features" in x]
    assert line == ["oodens: error: strategy 'mean-features' averages the members' features, which needs equal widths, "
                    "but the members' features are 96, 64, 1024-d (a set of mixed architectures): expected concat "
                    "or mean-scores"]


def test_a_set_of_one_architecture_keeps_plain_member_labels():
    import pandas as pd

    from oodens.report.tables import member_labels, set_arch

    rows = pd.DataFrame({"member": ["seed-1", "seed-2", "ensemble"], "role": ["member", "member", "ensemble"],
                         "arch": ["cnn", "cnn", "cnn"]})
    assert member_labels(rows) == {"seed-1": "seed-1", "seed-2": "seed-2"} and set_arch(rows) == "cnn"
    rows["arch"] = ["cnn", "timm:test_vit", "cnn+timm:test_vit"]
    assert member_labels(rows) == {"seed-1": "seed-1 (cnn)", "seed-2": "seed-2 (timm:test_vit)"}
    assert set_arch(rows) == "cnn+timm:test_vit"


# --------------------------------------------------------------------------- stage maps of library models


def _remove_rank1(a: torch.Tensor) -> torch.Tensor:
    """Independent of oodens: A - s1 u1 v1^T per sample of a (B, C, H, W) map, by numpy's SVD."""
    b, c, h, w = a.shape
    m = a.detach().double().numpy().reshape(b, c, h * w)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return torch.tensor(m - s[:, :1, None] * (u[:, :, :1] @ vt[:, :1, :]), dtype=a.dtype).reshape(b, c, h, w)


def _hooked(net: torch.nn.Module, modules: list[str], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The network's own forward with forward hooks on ``modules``: (logits, their outputs)."""
    outs = {}
    handles = [net.get_submodule(m).register_forward_hook(lambda mod, i, o, m=m: outs.__setitem__(m, o))
               for m in modules]
    try:
        with torch.no_grad():
            z = net(x)
    finally:
        for h in handles:
            h.remove()
    return z, [outs[m] for m in modules]


def _library_pair(arch: str, num_classes: int = 6):
    """(the oodens mode, the library's own model with the same weights)."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes).eval()
    family, _, name = arch.partition(":")
    if family == "timm":
        import timm

        ref = timm.create_model(name, pretrained=False, num_classes=num_classes)
    else:
        import torchvision

        ref = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref.eval()


CNNS = [pytest.param("torchvision:resnet18", ["layer1", "layer2", "layer3", "layer4"], "layer3", id="torchvision"),
        pytest.param("timm:test_resnet", ["act1", "layer1", "layer2", "layer3", "layer4"], "layer3", marks=needs_timm,
                     id="timm")]


@pytest.mark.parametrize("arch,stages,second", CNNS)
def test_resnet_stage_maps_layers_and_rankfeat_equal_hooks_on_the_library_model(arch, stages, second):
    model, ref = _library_pair(arch)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    z_ref, maps = _hooked(ref, stages, x)
    fwd = clean_forward(model, x, maps=True)
    np.testing.assert_allclose(fwd.logits.numpy(), z_ref.numpy(), rtol=1e-4, atol=1e-5)
    layers = VIEW_KINDS["layers"].fn(fwd)
    assert sorted(layers) == [f"layer{i:02d}" for i in range(len(stages))]
    for i, m in enumerate(maps):
        np.testing.assert_allclose(layers[f"layer{i:02d}"].numpy(), m.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    gram = VIEW_KINDS["gram"].fn(fwd, orders=2)
    f = maps[-1].flatten(2).double()
    np.testing.assert_allclose(gram[f"layer{len(stages) - 1:02d}"][:, 0].numpy(),
                               (f @ f.transpose(1, 2)).sum(dim=2).numpy(), rtol=1e-6)

    # RankFeat: (last map - rank 1) -> head and (second-to-last map - rank 1) -> last stage -> head, averaged
    _, (a2, a3) = _hooked(ref, [second, "layer4"], x)
    if arch.startswith("timm"):
        head = ref.forward_head
    else:
        def head(a):
            return ref.fc(torch.flatten(ref.avgpool(a), 1))
    with torch.no_grad():
        want = (head(_remove_rank1(a3)) + head(ref.layer4(_remove_rank1(a2)))) / 2
    got = VIEW_KINDS["rankfeat"](model, x, get_preset("cifar"), power_iters=0)["logits"]
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


@needs_timm
def test_timm_vit_maps_are_its_patch_tokens_and_rankfeat_is_one_line():
    model, ref = _library_pair("timm:test_vit")
    size = ref.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    blocks = [f"blocks.{i}" for i in range(len(ref.blocks))]
    z_ref, tokens = _hooked(ref, blocks, x)
    fwd = clean_forward(model, x, maps=True)
    np.testing.assert_allclose(fwd.logits.numpy(), z_ref.numpy(), rtol=1e-4, atol=1e-5)
    layers = VIEW_KINDS["layers"].fn(fwd)
    for i, t in enumerate(tokens):  # a block's map: its patch tokens (the class token left out), averaged
        np.testing.assert_allclose(layers[f"layer{i:02d}"].numpy(), t[:, ref.num_prefix_tokens:].mean(dim=1).numpy(),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(OodensError, match=r"architecture timm:test_vit: its last map .* rankfeat and gradcam") as e:
        VIEW_KINDS["rankfeat"](model, x, get_preset(PRESET), power_iters=0)
    assert "\n" not in str(e.value)


def test_models_without_stages_keep_the_one_line_error():
    model = create_model("torchvision:mobilenet_v3_small", 3)
    with pytest.raises(OodensError, match="exposes no stage maps"):
        clean_forward(model, torch.randn(1, 3, 32, 32), maps=True)
    with pytest.raises(OodensError, match="exposes no stage maps"):
        model.rankfeat_stages(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("arch", ["torchvision:resnet18", pytest.param("timm:test_resnet", marks=needs_timm)])
def test_gradcam_diversity_trains_library_resnets(arch):
    from oodens.train.diversity import DIVERSITIES

    members = [create_model(arch, 4).train() for _ in range(2)]
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    logits, loss = DIVERSITIES["gradcam"].loss(members, x, y)
    assert [z.shape for z in logits] == [(4, 4), (4, 4)] and loss.dim() == 0
    loss.backward()
    assert members[0].net.layer1[0].conv1.weight.grad is not None
