"""torchvision and timm classifiers as modes (``torchvision:<model>``, ``timm:<model>``): built without weights,
their own state-dict keys, penultimate features and head found generically, views equal to the library's forward."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodens.archs import arch_folder, canonical_arch, create_model
from oodens.data import get_preset
from oodens.errors import OodensError
from oodens.modes.discovery import discover_modes

from cli_runner import run
from datasets import write_imglist

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install 'oodens[timm]')")


def _x(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,head,size", [
    ("resnet18", "fc", 32),
    ("mobilenet_v3_small", "classifier.3", 32),
    ("vit_b_16", "heads.head", 224),
])
def test_torchvision_features_are_the_head_input_and_logits_the_library_forward(name, head, size):
    import torchvision

    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", 7).eval()
    torch.manual_seed(0)
    ref = torchvision.models.get_model(name, weights=None, num_classes=7).eval()
    assert list(model.state_dict()) == list(ref.state_dict())  # the library's keys, no prefix
    model.load_state_dict(ref.state_dict(), strict=True)
    assert model.classifier is model.net.get_submodule(head)
    seen = []
    ref.get_submodule(head).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = _x(2, size)
    with torch.no_grad():
        z_ref = ref(x)
        h, z = model.forward_features(x), model.classifier(model.forward_features(x))
    np.testing.assert_allclose(h.numpy(), seen[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z.numpy(), z_ref.numpy(), rtol=1e-4, atol=1e-4)
    assert model.feature_dim == h.shape[1]


def test_names_errors_and_no_stage_maps():
    assert canonical_arch("TorchVision:resnet50") == "torchvision:resnet50"
    assert arch_folder("torchvision:resnet50") == "torchvision-resnet50"
    with pytest.raises(OodensError, match="unknown torchvision model 'resnet51'"):
        canonical_arch("torchvision:resnet51")
    with pytest.raises(OodensError, match="unknown architecture 'foo:bar'.*torchvision:<model>"):
        canonical_arch("foo:bar")
    model = create_model("torchvision:mobilenet_v3_small", 3)  # no stage maps (torchvision ResNets have them)
    with pytest.raises(OodensError, match="exposes no stage maps"):
        model.rankfeat_stages(_x(1, 32))
    with pytest.raises(OodensError, match="exposes no stage maps"):
        model.feature_layers


def _save_mode(folder: Path, arch: str, seed: int, num_classes: int, dataset: str, preset: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, num_classes).eval()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "oodens.json").write_text(json.dumps({"arch": arch, "dataset": dataset, "num_classes": num_classes,
                                                    "preset": preset, "seed": seed}))
    return model


def _tiny_openood_cifar10(root: Path) -> list[Path]:
    """The few lists an openood-cifar10 eval and extract read (the rest missing: one warning)."""
    lists = "benchmark_imglist/cifar10"
    write_imglist(root, f"{lists}/train_cifar10.txt", "images_classic", "cifar10/train", 4, list(range(10)), seed=2)
    test = write_imglist(root, f"{lists}/test_cifar10.txt", "images_classic", "cifar10/test", 6, list(range(10)))
    write_imglist(root, f"{lists}/test_tin.txt", "images_classic", "tin/test", 4, None, (64, 64), seed=4)
    write_imglist(root, f"{lists}/test_mnist.txt", "images_classic", "mnist/test", 4, None, (28, 28), "L", seed=5)
    return [p for p, _ in test]


def test_torchvision_resnet18_modes_evaluate_and_views_equal_the_model(tmp_path, capsys):
    images = _tiny_openood_cifar10(tmp_path / "data")
    models = [_save_mode(tmp_path / "modes" / f"seed-{s}", "torchvision:resnet18", s, 10, "cifar10", "cifar")
              for s in (1, 2)]
    modes = discover_modes(tmp_path / "modes")
    assert [(m.name, m.arch) for m in modes] == [("seed-1", "torchvision:resnet18"), ("seed-2", "torchvision:resnet18")]
    args = ["--modes", str(tmp_path / "modes"), "--benchmark", "openood-cifar10", "--data-root",
            str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c"), "--batch-size", "8"]
    code, out, err = run(["eval", *args, "--detector", "energy", "--json"], capsys)
    assert code == 0, err
    recs = json.loads(out)
    assert {r["ood"] for r in recs} == {"tin", "mnist", "average"}
    assert {r["member"] for r in recs} == {"seed-1", "seed-2", "mean", "std", "ensemble"}
    code, _, err = run(["extract", *args, "--export", str(tmp_path / "v")], capsys)
    assert code == 0, err
    p = get_preset("cifar")
    x = torch.tensor(np.stack([((np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 255 - p.mean) / p.std)
                               .transpose(2, 0, 1) for f in images]), dtype=torch.float32)
    with torch.no_grad():
        z = models[1].net(x).numpy()  # the torchvision model's own forward
    got = np.load(tmp_path / "v" / "seed-2" / "openood-cifar10" / "test" / "logits.npy")
    np.testing.assert_allclose(got, z, rtol=1e-4, atol=1e-4)
    feats = np.load(tmp_path / "v" / "seed-2" / "openood-cifar10" / "test" / "features.npy")
    assert feats.shape == (6, 512)


@needs_timm
def test_timm_features_logits_and_preset():
    import timm

    torch.manual_seed(0)
    model = create_model("timm:test_vit", 5).eval()
    torch.manual_seed(0)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=5).eval()
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    assert model.classifier is model.net.get_classifier()
    size = ref.pretrained_cfg["input_size"][-1]
    x = _x(2, size)
    with torch.no_grad():
        h_ref = ref.forward_head(ref.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(model.forward_features(x).numpy(), h_ref.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-4)
    p = get_preset("timm:test_vit")
    cfg = ref.pretrained_cfg
    assert p.crop == size and p.resize == int(size / cfg["crop_pct"]) and p.mean == tuple(cfg["mean"])


@needs_timm
def test_timm_mode_evaluates(tmp_path, capsys):
    _tiny_openood_cifar10(tmp_path / "data")
    _save_mode(tmp_path / "modes" / "seed-1", "timm:test_vit", 1, 10, "cifar10", "timm:test_vit")
    code, out, err = run(["eval", "--modes", str(tmp_path / "modes"), "--benchmark", "openood-cifar10",
                          "--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c"),
                          "--batch-size", "8", "--detector", "msp", "--json"], capsys)
    assert code == 0, err
    assert {r["ood"] for r in json.loads(out)} >= {"tin", "mnist"}


def test_timm_absent_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(OodensError, match=r"pip install 'oodens\[timm\]'"):
        canonical_arch("timm:resnet18")
    with pytest.raises(OodensError, match=r"pip install 'oodens\[timm\]'"):
        get_preset("timm:resnet18")
