"""OpenOOD v1.5 benchmarks and checkpoints: image-list data folders in OpenOOD's on-disk format (file names
hard-coded here from OpenOOD's ``evaluation_api/datasets.py``), its preprocessing (``evaluation_api/
preprocessor.py``), its run-folder layout ``<bench>_<net>_..._<mark>/s<k>/best.ckpt`` (bare state dicts), strict
loading against ``shared/compat`` and forwards equal to an independent computation, end to end on the CLI."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import oodens
from oodens.archs import create_model
from oodens.data import get_preset
from oodens.errors import OodensError, OodensWarning
from oodens.modes.discovery import discover_modes, openood_run

from cli_runner import run
from datasets import write_imglist

COMPAT = Path(__file__).resolve().parents[1].parent / "shared" / "compat"
C10 = "benchmark_imglist/cifar10"
CLASSIC = "images_classic"

#: list file -> (image folder, count, labelled, (w, h), PIL mode): OpenOOD's cifar10 lists, tiny
CIFAR10_LISTS = {
    f"{C10}/train_cifar10.txt": ("cifar10/train", 10, True, (32, 32), "RGB"),
    f"{C10}/val_cifar10.txt": ("cifar10/val", 6, True, (32, 32), "RGB"),
    f"{C10}/test_cifar10.txt": ("cifar10/test", 8, True, (32, 32), "RGB"),
    f"{C10}/test_cifar100.txt": ("cifar100/test", 5, False, (32, 32), "RGB"),
    f"{C10}/test_tin.txt": ("tin/test", 5, False, (64, 64), "RGB"),
    f"{C10}/test_mnist.txt": ("mnist/test", 5, False, (28, 28), "L"),  # grayscale, converted to RGB
    f"{C10}/test_svhn.txt": ("svhn/test", 5, False, (32, 32), "RGB"),
    f"{C10}/test_texture.txt": ("texture/images", 5, False, (45, 37), "RGB"),
    f"{C10}/test_places365.txt": ("places365/test", 5, False, (32, 32), "RGB"),
    f"{C10}/val_tin.txt": ("tin/val", 4, False, (64, 64), "RGB"),
    f"{C10}/test_cifar10c.txt": ("cifar10c/test", 6, True, (32, 32), "RGB"),
}


def write_openood_cifar10(root: Path, skip: tuple[str, ...] = ()) -> dict[str, list[tuple[Path, int]]]:
    """A tiny OpenOOD cifar10 data folder; lists whose file name is in ``skip`` are left out."""
    out = {}
    for i, (lst, (folder, n, labelled, size, mode)) in enumerate(CIFAR10_LISTS.items()):
        if Path(lst).name not in skip:
            out[Path(lst).name] = write_imglist(root, lst, CLASSIC, folder, n, list(range(10)) if labelled else None,
                                                size, mode, seed=i)
    return out


def _normalised(img: Image.Image, preset_name: str) -> np.ndarray:
    p = get_preset(preset_name)
    return ((np.asarray(img.convert("RGB"), dtype=np.float64) / 255 - p.mean) / p.std).transpose(2, 0, 1)


# ---------------------------------------------------------------- benchmarks


def test_openood_cifar10_splits_kinds_and_one_missing_warning(tmp_path):
    files = write_openood_cifar10(tmp_path, skip=("test_places365.txt", "test_cifar10c.txt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = oodens.get_benchmark("openood-cifar10", tmp_path)
    msgs = [str(w.message) for w in caught if issubclass(w.category, OodensWarning)]
    assert len(msgs) == 1, msgs
    assert f"{C10}/test_places365.txt" in msgs[0] and f"{C10}/test_cifar10c.txt" in msgs[0]
    assert b.num_classes == 10
    assert b.kinds == {"cifar100": "near", "tin": "near", "mnist": "far", "svhn": "far", "texture": "far"}
    assert list(b.ood_factories) == ["cifar100", "tin", "mnist", "svhn", "texture"]
    assert list(b.val_ood) == ["val_tin"] and "val_tin" not in b.ood_factories  # kept apart, never evaluated
    assert len(b.val_ood["val_tin"]) == 4
    # ID splits with their labels; the ID validation split is the benchmark's own val list
    assert len(b.id_train) == 10 and len(b.id_test) == 8
    np.testing.assert_array_equal(b.id_test.labels, [lab for _, lab in files["test_cifar10.txt"]])
    fit, val = b.validation()
    assert fit is b.id_train and len(val) == 6 and val.split == "val"
    np.testing.assert_array_equal(val.labels, [lab for _, lab in files["val_cifar10.txt"]])
    assert (b.ood["mnist"].labels == -1).all()
    # grayscale MNIST comes out as 3 channels (OpenOOD converts to RGB), resized to 32
    x, _ = next(iter(b.ood["mnist"].loader(get_preset("cifar"), 16)))
    assert x.shape == (5, 3, 32, 32)
    with Image.open(files["test_mnist.txt"][0][0]) as im:
        ref = _normalised(im.convert("RGB").resize((32, 32), Image.BILINEAR), "cifar")
    np.testing.assert_allclose(x[0].numpy(), ref, atol=1e-5)


def test_covariate_shift_sets_keep_their_labels(tmp_path):
    files = write_openood_cifar10(tmp_path)
    b = oodens.get_benchmark("openood-cifar10", tmp_path)
    assert b.kinds["cifar10c"] == "shift" and b.kinds["places365"] == "far" and not b.missing
    np.testing.assert_array_equal(b.ood["cifar10c"].labels, [lab for _, lab in files["test_cifar10c.txt"]])


@pytest.mark.parametrize("bench,num_classes", [("imagenet200", 200), ("imagenet", 1000)])
def test_openood_imagenet_lists_and_imagenet_c_at_its_own_size(tmp_path, bench, num_classes):
    large, lists = "images_largescale", f"benchmark_imglist/{bench}"
    write_imglist(tmp_path, f"{lists}/test_{bench}.txt", large, "imagenet_1k/val", 3, [0, 1, 2], (40, 30))
    for s in ("ssb_hard", "ninco", "inaturalist", "openimage_o"):
        write_imglist(tmp_path, f"{lists}/test_{s}.txt", large, s, 2, None, (30, 40))
    tex = write_imglist(tmp_path, f"{lists}/test_textures.txt", CLASSIC, "texture/images", 2, None, (50, 35))
    write_imglist(tmp_path, f"{lists}/val_openimage_o.txt", large, "openimage_o/val", 2, None, (30, 30))
    stem = "imagenet200_c" if bench == "imagenet200" else "imagenet_c"
    c = write_imglist(tmp_path, f"{lists}/test_{stem}.txt", large, "imagenet_c/blur/3", 2, [5, 7], (224, 224))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = oodens.get_benchmark(f"openood-{bench}", tmp_path)
    missing = {"imagenet_v2", "imagenet_r"} | ({"imagenet_es"} if bench == "imagenet" else set())
    assert set(b.missing) == missing and len([w for w in caught if issubclass(w.category, OodensWarning)]) == 1
    assert b.num_classes == num_classes and list(b.val_ood) == ["val_openimage_o"]
    assert b.kinds == {"ssb_hard": "near", "ninco": "near", "inaturalist": "far", "textures": "far",
                       "openimage_o": "far", "imagenet_c": "shift"}
    assert [p for p, _ in b.ood["textures"].items] == [p for p, _ in tex]  # textures: images_classic
    # ImageNet-C is fed as it is (OpenOOD: ToTensor + Normalize only), the other sets resize 256 -> crop 224
    x, y = next(iter(b.ood["imagenet_c"].loader(get_preset("imagenet"), 4)))
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [5, 7]
    with Image.open(c[0][0]) as im:
        np.testing.assert_allclose(x[0].numpy(), _normalised(im, "imagenet"), atol=1e-5)
    assert next(iter(b.id_test.loader(get_preset("imagenet"), 4)))[0].shape == (3, 3, 224, 224)


def test_presets_match_openood_test_preprocessing(tmp_path):
    """OpenOOD's TestStandardPreProcessor: Convert('RGB'), Resize(pre_size, bilinear), CenterCrop(img_size),
    ToTensor, Normalize (values from evaluation_api/preprocessor.py, written out here)."""
    from torchvision import transforms as T

    openood = {"cifar": (32, 32, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
               "openood-cifar100": (32, 32, [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
               "imagenet": (256, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}
    paths = [p for size in ((45, 37), (37, 61), (33, 32), (300, 257)) for p, _ in
             write_imglist(tmp_path, f"l{size[0]}x{size[1]}.txt", "img", f"s{size[0]}x{size[1]}", 1, None, size)]
    paths += [p for p, _ in write_imglist(tmp_path, "grey.txt", "img", "grey", 1, None, (29, 28), "L")]
    from oodens.data.sources import image_list

    for name, (pre, crop, mean, std) in openood.items():
        ref = T.Compose([T.Lambda(lambda im: im.convert("RGB")),
                         T.Resize(pre, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(crop), T.ToTensor(),
                         T.Normalize(mean, std)])
        for p in paths:
            src = image_list("x", "test", _one_list(tmp_path, p), tmp_path / "img")
            x, _ = next(iter(src.loader(get_preset(name), 1)))
            with Image.open(p) as im:
                want = ref(im)
            assert x.shape[1:] == want.shape, (name, p)
            np.testing.assert_allclose(x[0].numpy(), want.numpy(), atol=1e-5, err_msg=f"{name} {p.name}")


def _one_list(root: Path, image: Path) -> Path:
    lst = root / f"one-{image.parent.name}.txt"
    lst.write_text(f"{image.relative_to(root / 'img')} -1\n")
    return lst


def test_errors_name_the_list_line_and_file(tmp_path):
    with pytest.raises(OodensError, match="test_cifar10.txt"):
        oodens.get_benchmark("openood-cifar10", tmp_path)
    write_openood_cifar10(tmp_path)
    lst = tmp_path / C10 / "test_svhn.txt"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join(lines[:2] + ["svhn/test/gone.png -1"] + lines[2:]) + "\n")
    with pytest.raises(OodensError, match=r"test_svhn.txt:3: image .*svhn/test/gone.png does not exist"):
        oodens.get_benchmark("openood-cifar10", tmp_path)
    lst.write_text("\n".join(lines) + "\n")
    (tmp_path / C10 / "train_cifar10.txt").unlink()
    with pytest.raises(OodensError, match="train_cifar10.txt"):
        oodens.get_benchmark("openood-cifar10", tmp_path).id_train


# ---------------------------------------------------------------- checkpoints

RUN = "cifar10_resnet18_32x32_base_e100_lr0.1_default"


def save_openood_run(root: Path, run_name: str = RUN, arch: str = "ResNet18_32x32", num_classes: int = 10,
                     seeds=(0, 1, 2)) -> Path:
    """Random-weight modes in OpenOOD's layout: ``<run>/s<k>/best.ckpt`` (bare state dict) beside the
    ``best_epoch*``/``last_epoch*`` copies its recorder writes."""
    for s in seeds:
        torch.manual_seed(s)
        state = create_model(arch, num_classes).state_dict()
        folder = root / run_name / f"s{s}"
        folder.mkdir(parents=True)
        for name in ("best.ckpt", "best_epoch97_acc0.9510.ckpt", "last_epoch100_acc0.9490.ckpt"):
            torch.save(state, folder / name)
    return root / run_name


def test_run_folder_names():
    assert openood_run(RUN) == ("openood-cifar10", "ResNet18_32x32")
    assert openood_run("cifar100_resnet18_32x32_base_e100_lr0.1_default") == ("openood-cifar100", "ResNet18_32x32")
    assert openood_run("imagenet200_resnet18_224x224_base_e90_lr0.1_default") == \
        ("openood-imagenet200", "ResNet18_224x224")
    assert openood_run("imagenet_resnet50_tvsv1_base_default") == ("openood-imagenet", "R50")
    assert openood_run("imagenet_vit-b-16_tvsv1_base_default") == ("openood-imagenet", "torchvision:vit_b_16")
    assert openood_run("imagenet_swin-t_tvsv1_base_default") == ("openood-imagenet", "torchvision:swin_t")
    assert openood_run("seed-1000") is None and openood_run("cifar10_unknownnet_base") is None


def test_openood_modes_discovered_with_arch_classes_and_preset(tmp_path):
    modes = discover_modes(save_openood_run(tmp_path))
    assert [m.name for m in modes] == ["s0", "s1", "s2"]
    assert {(m.arch, m.dataset, m.num_classes, m.preset, m.checkpoint.name) for m in modes} == \
        {("ResNet18_32x32", "openood-cifar10", 10, "cifar", "best.ckpt")}
    m = discover_modes(save_openood_run(tmp_path, "imagenet200_resnet18_224x224_base_e90_lr0.1_default",
                                        "ResNet18_224x224", 200, seeds=(0,)))[0]
    assert (m.arch, m.dataset, m.num_classes, m.preset) == ("ResNet18_224x224", "openood-imagenet200", 200, "imagenet")
    c100 = tmp_path / "c100"
    m = discover_modes(save_openood_run(c100, "cifar100_resnet18_32x32_base_e100_lr0.1_default",
                                        num_classes=100, seeds=(0,)))[0]
    assert m.preset == "openood-cifar100"
    # the same classes under another benchmark name is no contradiction; another architecture is
    assert discover_modes(tmp_path / RUN, oodens.modes.ModeFlags(dataset="cifar10"))[0].dataset == "openood-cifar10"
    with pytest.raises(OodensError, match="--arch R18 contradicts"):
        discover_modes(tmp_path / RUN, oodens.modes.ModeFlags(arch="R18"))


def _spec(name: str, model: torch.nn.Module) -> dict[str, list[int]]:
    path = COMPAT / name
    if path.exists():
        return json.loads(path.read_text())
    return {k: list(v.shape) for k, v in model.state_dict().items()}  # a clone without ../shared


def _random_state(spec: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = torch.tensor(7)
        elif leaf == "running_var" or (leaf == "weight" and len(shape) == 1):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) <= 1 or leaf == "running_mean":
            out[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return out


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def _openood_resnet18(sd, x, stem_224: bool):
    """OpenOOD's ResNet18 forward written out: (features, logits). 32x32: 3x3 stem, ``shortcut`` projections;
    224x224: 7x7/2 stem + max-pool, torchvision's ``downsample`` projections; adaptive average pool, head ``fc``."""
    if stem_224:
        out = F.max_pool2d(F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")), 3, 2, 1)
    else:
        out = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"))
    proj = "downsample" if stem_224 else "shortcut"
    for layer in range(1, 5):
        for b in range(2):
            p = f"layer{layer}.{b}"
            stride = 2 if (layer > 1 and b == 0) else 1
            o = F.relu(_bn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"))
            o = _bn(F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            if f"{p}.{proj}.0.weight" in sd:
                sc = _bn(F.conv2d(out, sd[f"{p}.{proj}.0.weight"], stride=stride), sd, f"{p}.{proj}.1")
            else:
                sc = out
            out = F.relu(o + sc)
    h = out.mean(dim=(2, 3))
    return h, F.linear(h, sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize("arch,compat,run_name,size", [
    ("ResNet18_32x32", "openood_resnet18_32x32_cifar10.json", RUN, 32),
    ("ResNet18_224x224", "openood_resnet18_224x224_imagenet200.json",
     "imagenet200_resnet18_224x224_base_e90_lr0.1_default", 64),
])
def test_openood_checkpoints_load_strictly_and_forward_as_openood(tmp_path, arch, compat, run_name, size):
    spec = _spec(compat, create_model(arch, 10 if "32" in arch else 200))
    num_classes = spec["fc.weight"][0]
    state = _random_state(spec, 0)
    folder = tmp_path / run_name / "s0"
    folder.mkdir(parents=True)
    torch.save(state, folder / "best.ckpt")  # bare, as OpenOOD's recorder saves net.state_dict()
    (mode,) = discover_modes(tmp_path / run_name)
    assert mode.arch == arch and mode.num_classes == num_classes
    model = mode.load()  # strict
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h, z = model.forward_features(x), model(x)
        h_ref, z_ref = _openood_resnet18({k: v.double() for k, v in state.items()}, x.double(), "224" in arch)
    np.testing.assert_allclose(h.numpy(), h_ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z.numpy(), z_ref.numpy(), rtol=1e-4, atol=1e-4)
    assert model.classifier is model.fc


# ---------------------------------------------------------------- end to end


def test_eval_openood_cifar10_with_openood_modes_gives_near_and_far_rows(tmp_path, capsys):
    write_openood_cifar10(tmp_path / "data", skip=("test_cifar10c.txt",))
    modes = save_openood_run(tmp_path / "results")
    args = ["--modes", str(modes), "--benchmark", "openood-cifar10", "--data-root", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "c"), "--batch-size", "16"]
    code, out, err = run(["eval", *args, "--detector", "msp,energy", "--json"], capsys)
    assert code == 0, err
    assert "test_cifar10c.txt" in err  # the one missing set, named by its list file
    recs = json.loads(out)
    sets = {"cifar100", "tin", "mnist", "svhn", "texture", "places365"}
    assert {r["ood"] for r in recs} == sets | {"near", "far", "average"}
    assert {r["member"] for r in recs} == {"s0", "s1", "s2", "mean", "std", "ensemble"}
    assert {r["kind"] for r in recs if r["ood"] in ("cifar100", "tin")} == {"near"}
    assert {r["kind"] for r in recs if r["ood"] in ("mnist", "svhn", "texture", "places365")} == {"far"}
    by = {(r["detector"], r["member"], r["ood"]): r for r in recs}
    for member in ("s0", "ensemble"):
        near = np.mean([by["msp", member, o]["auroc"] for o in ("cifar100", "tin")])
        far = np.mean([by["msp", member, o]["auroc"] for o in ("mnist", "svhn", "texture", "places365")])
        assert by["msp", member, "near"]["auroc"] == pytest.approx(near)
        assert by["msp", member, "far"]["auroc"] == pytest.approx(far)
    assert not any("val_tin" in r["ood"] for r in recs)  # the OOD validation set is never evaluated
    # the views are the network on the listed images, preprocessed as OpenOOD does (cifar preset)
    code, _, err = run(["extract", *args, "--export", str(tmp_path / "v")], capsys)
    assert code == 0, err
    lst = (tmp_path / "data" / C10 / "test_cifar10.txt").read_text().split()
    imgs = [tmp_path / "data" / CLASSIC / rel for rel in lst[0::2]]
    x = torch.tensor(np.stack([_normalised(Image.open(p), "cifar") for p in imgs]), dtype=torch.float32)
    model = discover_modes(modes)[1].load()
    with torch.no_grad():
        z = model(x).numpy()
    got = np.load(tmp_path / "v" / "s1" / "openood-cifar10" / "test" / "logits.npy")
    np.testing.assert_allclose(got, z, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.load(tmp_path / "v" / "s1" / "openood-cifar10" / "test" / "labels.npy"),
                                  [int(v) for v in lst[1::2]])


def test_eval_reports_accuracy_under_shift_on_cifar10c(tmp_path):
    write_openood_cifar10(tmp_path / "data")
    exp = oodens.Experiment(oodens.load_modes(save_openood_run(tmp_path / "results", seeds=(0, 1))),
                            oodens.get_benchmark("openood-cifar10", tmp_path / "data"), cache_dir=tmp_path / "c")
    recs = [r for r in exp.evaluate("msp").records if r["ood"] == "cifar10c"]
    assert recs and {r["kind"] for r in recs} == {"shift"}
    views = exp.views()
    for r in recs:
        if r["member"] in views:
            v = views[r["member"]].ood["cifar10c"]
            want = float(np.mean(np.asarray(v.logits).argmax(1) == np.asarray(v.labels)))
            assert r["ood_accuracy"] == pytest.approx(want)
