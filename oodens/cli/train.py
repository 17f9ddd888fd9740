"""``oodens train``: one mode, an SDDE ensemble or an ELOC ensemble (:func:`oodens.train.loop.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oodens.cli.options import DeviceOpt, expect_folder, stderr


def train_cmd(
    seed: int = typer.Option(1000, "--seed", help="Random seed: initialisation, data order, augmentation."),
    arch: str = typer.Option("cnn", "--arch", help="Architecture (digits: cnn; CIFAR: R18, WRN28X10, DNBC100; "
                             "ImageNet: R50, DN121)."),
    dataset: str = typer.Option("digits", "--dataset", help="Training dataset: digits, CIFAR10, CIFAR100, ImageNet "
                                "(its benchmark's ID train split)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the recipe's: digits 30, CIFAR 150, "
                                         "ImageNet 90, SDDE/ELOC on CIFAR 100).", show_default=False),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the recipe's).", show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size, split over torchrun "
                                             "processes (default: the recipe's).", show_default=False),
    out: Path = typer.Option(Path("save"), "--out", help="Writes OUT/<Dataset>/<Arch>/seed-<S>/<checkpoint> "
                             "(SDDE: <Arch>-sdde-<D>/seed-<S>-m<n>; ELOC: <Arch>-eloc-<K>/seed-<S>-m<k>)."),
    device: str = DeviceOpt,
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic algorithms and cuDNN flags "
                                       "(always on for the digits recipes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/.../seed-<S>.last.pth (model, "
                                "optimiser, scheduler, RNG states), saved after every epoch."),
    members: Optional[int] = typer.Option(None, "--members", help="SDDE: train N members jointly (default 5 with "
                                          "--diversity).", show_default=False),
    diversity: Optional[str] = typer.Option(None, "--diversity", help="SDDE diversity loss: gradcam, input-grad, "
                                            "ncl, adp, oe (default gradcam with --members).", show_default=False),
    lam: Optional[float] = typer.Option(None, "--lambda", help="SDDE diversity weight (default: gradcam 0.005, "
                                        "input-grad 0.005, ncl 0.1, adp 0.1, oe 0.5).", show_default=False),
    outliers: Optional[str] = typer.Option(None, "--outliers", help="Training outliers for --diversity oe: a named "
                                           "set (digits: letters-lower) or an image folder/list/.mat; never an "
                                           "evaluation OOD set.", show_default=False),
    leave_out: Optional[int] = typer.Option(None, "--leave-out", help="ELOC: K members, member k leaves out the "
                                            "k-th of K class groups.", show_default=False),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (else $OODENS_DATA, else "
                                             "data_root in $XDG_CONFIG_HOME/oodens/config.toml).",
                                             show_default=False),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes for training."),
):
    """Train one mode (one seed), an SDDE ensemble (--members/--diversity) or an ELOC ensemble (--leave-out),
    and save every member as a mode with its JSON sidecar. Under torchrun: DistributedDataParallel, rank 0 saves."""
    from oodens.train.loop import train

    expect_folder("--out", out)  # before any work
    result = train(seed, arch, dataset, epochs, out, lr, batch_size, device, members=members,
                   diversity=diversity, lam=lam, outliers=outliers, leave_out=leave_out, data_root=data_root,
                   workers=workers, deterministic=deterministic, resume=resume)
    if result.main:
        for path, acc in zip(result.paths, result.accuracies):
            stderr.print(f"saved {path} (ID test accuracy {100 * acc:.2f}%)")
