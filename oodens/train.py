"""Training one mode (one seed).

The digits recipe: SGD (momentum 0.9, Nesterov off), lr 0.05, weight decay 5e-4,
cosine schedule over the epochs, batch 64, random shifts of up to 1 pixel. The seed
sets initialisation, data order and augmentation; deterministic algorithms are on,
so the same seed on the same machine gives bit-identical weights.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodens import __version__
from oodens.archs import canonical_arch, create_model
from oodens.checkpoints import save_checkpoint
from oodens.data import get_benchmark, get_preset
from oodens.errors import OodensError
from oodens.extract import resolve_device
from oodens.metrics import accuracy
from oodens.modes import mode_dir
from oodens.progress import progress_bar


@dataclass(frozen=True)
class Recipe:
    dataset_folder: str
    preset: str
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    momentum: float
    shift: int  # random translation in pixels


#: dataset -> its training recipe (the real CIFAR/ImageNet recipes are their own issue)
RECIPES = {
    "digits": Recipe("Digits", "digits", epochs=30, lr=0.05, batch_size=64, weight_decay=5e-4, momentum=0.9, shift=1),
}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _random_shift(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels (zero fill)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=g)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def train_mode(
    seed: int,
    arch: str = "cnn",
    dataset: str = "digits",
    epochs: int | None = None,
    out: Path = Path("save"),
    lr: float | None = None,
    batch_size: int | None = None,
    device: str = "auto",
) -> Path:
    """Train one mode and write ``out/<Dataset>/<Arch>/seed-<S>/checkpoint.pth.tar`` plus its sidecar."""
    arch = canonical_arch(arch)
    try:
        recipe = RECIPES[dataset.lower()]
    except KeyError:
        raise OodensError(f"cannot train on dataset {dataset!r} yet: expected one of {', '.join(RECIPES)}") from None
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    batch_size = recipe.batch_size if batch_size is None else batch_size
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise OodensError(f"--epochs, --batch-size and --lr must be positive (got {epochs}, {batch_size}, {lr})")
    bench = get_benchmark(dataset)
    preset = get_preset(recipe.preset)
    dev = resolve_device(device)

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        g = seed_everything(seed)
        model = create_model(arch, bench.num_classes).to(dev)
        x_np, y_np = bench.id_train.arrays
        x_all, y_all = torch.from_numpy(x_np), torch.from_numpy(y_np)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
        steps_per_epoch = math.ceil(len(y_all) / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        with progress_bar(transient=False) as bar:
            task = bar.add_task(f"train {arch} seed {seed}", total=epochs, info="")
            for epoch in range(epochs):
                model.train()
                perm = torch.randperm(len(y_all), generator=g)
                seen = correct = 0
                loss_sum = 0.0
                for s in range(0, len(perm), batch_size):
                    idx = perm[s : s + batch_size]
                    x = preset.normalize(_random_shift(x_all[idx], recipe.shift, g)).to(dev)
                    y = y_all[idx].to(dev)
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    seen += len(y)
                    correct += int((logits.argmax(1) == y).sum())
                    loss_sum += float(loss.detach()) * len(y)
                bar.update(task, advance=1, info=f"loss {loss_sum / seen:.3f} acc {100 * correct / seen:.1f}%")
        model.eval()
        xt, yt = bench.id_test.arrays
        with torch.inference_mode():
            test_logits = model(preset.normalize(torch.from_numpy(xt)).to(dev)).float().cpu().numpy()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    test_acc = accuracy(test_logits, yt)
    folder = mode_dir(out, recipe.dataset_folder, arch, seed)
    sidecar = {
        "arch": arch,
        "dataset": dataset.lower(),
        "num_classes": bench.num_classes,
        "seed": seed,
        "preset": recipe.preset,
        "test_accuracy": test_acc,
        "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": recipe.weight_decay,
                  "momentum": recipe.momentum, "schedule": "cosine", "shift": recipe.shift},
        "oodens_version": __version__,
    }
    path = folder / "checkpoint.pth.tar"
    save_checkpoint(path, model.cpu(), sidecar)
    return path
