"""``oodens train-heads``: N linear heads on one frozen backbone's features, SED's objective
(:func:`oodens.train.heads.train_heads`); the result is a heads folder ``oodens eval --modes`` reads as N members."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oodens.cli.options import CacheOpt, DeviceOpt, RootOpt, expect_folder, stderr


def train_heads_cmd(
    out: Path = typer.Option(..., "--out", help="The heads folder to write: heads.safetensors (N x C x D weights, "
                             "N x C biases), heads.json, backbone/ (a link or copy of --backbone)."),
    backbone: Optional[Path] = typer.Option(None, "--backbone", help="The frozen backbone: a checkpoint file or a "
                                            "mode folder (its penultimate features of ID train are extracted once, "
                                            "cached).", show_default=False),
    features: Optional[Path] = typer.Option(None, "--features", help="Precomputed features instead of a backbone: "
                                            "DIR/<dataset>/<split>/features.npy + labels.npy, or "
                                            "DIR/<dataset>/<split>.h5.", show_default=False),
    heads: int = typer.Option(5, "--heads", help="Number of heads N."),
    diversity: str = typer.Option("a2d", "--diversity", help="a2d (SED's agree-to-disagree on hard ID samples) "
                                  "or none (independent heads, the baseline)."),
    lam: float = typer.Option(0.5, "--lambda", help="λ in (1 - λ)·CE + λ_div·λ·A2D (λ_div = 1 for a2d, 0 for "
                              "none)."),
    random_select: int = typer.Option(2, "--random-select", help="Heads stepped per batch, drawn at random (0: all)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: SED's 11; digits 200).",
                                         show_default=False),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw or sgd (default: AdamW; SGD for 50+ "
                                            "heads as SED; digits AdamW).", show_default=False),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate, cosine-decayed per step (default: 1e-3; "
                                       "digits AdamW 1e-2, SGD 0.1).", show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default 256; digits 64).",
                                             show_default=False),
    seed: int = typer.Option(1000, "--seed", help="Seed: heads' initialisation (head i: seed·1000 + i), batch order, "
                             "stepped heads."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="With --features: the ID dataset folder under DIR "
                                          "(default: the one with a train split).", show_default=False),
    data_root: Optional[Path] = RootOpt,
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
):
    """Train N linear heads on a frozen backbone's cached ID-train features (SED: A2D diversity on hard ID samples,
    two heads stepped per batch) and write a heads folder: `oodens eval --modes OUT` scores the N heads as members,
    their ensemble and their soup, from one backbone pass per image."""
    from oodens.train.heads import train_heads

    expect_folder("--out", out)
    expect_folder("--cache-dir", cache_dir)
    path = train_heads(out, heads, backbone=backbone, features=features, dataset=dataset, diversity=diversity,
                       lam=lam, random_select=random_select, epochs=epochs, optimizer=optimizer, lr=lr,
                       batch_size=batch_size, seed=seed, device=device, data_root=data_root, cache_dir=cache_dir)
    import json

    meta = json.loads((path / "heads.json").read_text())
    accs = [h["test_accuracy"] for h in meta["heads"]]
    t = meta["training"]
    stderr.print(f"saved {path} ({len(accs)} heads; ID test accuracy: heads {100 * min(accs):.2f}–"
                 f"{100 * max(accs):.2f}%, soup {100 * t['soup_test_accuracy']:.2f}%, ensemble "
                 f"{100 * t['ensemble_test_accuracy']:.2f}%)")
