"""Training N linear heads on one frozen backbone's cached features (SED: Scalable Ensemble Diversification).

``oodens train-heads --backbone CKPT|--features DIR --heads N [--diversity a2d|none] --out DIR`` (:func:`train_heads`):
the backbone's penultimate features of the ID train split are extracted once (cached like any view: the backbone
is one ordinary mode) or read from precomputed files; N heads (weight C x D, bias C each) train on them; the
result is a heads folder (:mod:`oodens.modes.heads`) that ``oodens eval`` reads as N members.

The objective per batch (SED; :func:`heads_loss`)::

    loss = (1 - λ) · CE + λ_div · λ · A2D,    λ = 0.5 (--lambda), λ_div = 1 for --diversity a2d, 0 for none

- **random_select** (``--random-select``, default 2): each batch, that many heads are drawn at random (without
  replacement) and only they take a step; the others get no gradient and their parameters (and optimiser
  state) do not change. 0 = every head every batch.
- **CE**: the mean over the stepped heads of their mean cross-entropy on the batch.
- **A2D** ("agree to disagree"): one stepped head m is drawn at random; for every other stepped head i with
  predicted class k_i = argmax p_i, per sample ``a_i = -log(p_i(k_i)·(1 - p_m(k_i)) + p_m(k_i)·(1 - p_i(k_i)) + ε)``,
  summed over i (the issue's "add"; SED's code averages over i, the same at random_select = 2), ε = 1e-6 (SED's
  code's guard). Gradients flow into both p_i and p_m; k_i is an index (no gradient).
- **OOD proxies without OOD data**: the A2D term is a weighted sum over the batch's ID samples with weights
  ``w_s = CE_ens(s) / Σ_s' CE_ens(s')``, CE_ens the cross-entropy of the ensemble (the mean softmax of all N heads,
  no gradient) on sample s: samples hard for the ensemble weigh most. (SED's code divides by the squared batch
  mean of CE_ens and then averages, a differently scaled variant of the same re-weighting.)
- ``--diversity none`` keeps everything else (the same (1 - λ)·CE, the same draws of heads, m and batches from
  the same seed), so the baseline differs from a2d by the diversity term alone.

Choices the SED facts leave open (documented here and in the sidecar): head i is initialised as ``nn.Linear``
(uniform ±1/√D, weight and bias) from its own seed ``seed·1000 + i``; batches are a seeded permutation per epoch
(the last one short); the learning rate follows a cosine decay per global step to 0; AdamW uses weight decay 0.01
(torch's default), SGD momentum 0.9 and no weight decay. Recipes (:data:`HEAD_RECIPES`; flags override):

| recipe | when | epochs | batch | optimiser |
|---|---|---|---|---|
| SED | any dataset but digits, N < 50 | 11 | 256 | AdamW lr 1e-3 |
| SED, 50 heads | N ≥ 50 | 11 | 256 | SGD lr 1e-3 |
| digits | digits | 200 | 64 | AdamW lr 1e-2 (SGD: lr 0.1) |

The digits recipe trains longer: 758 training images give 12 batches per epoch, and with random_select = 2 each
of 50 heads is stepped on ~4 % of them, so SED's 11 epochs would leave the heads near their initialisation.

Seeded and deterministic on one machine: the seed draws the heads' initialisation, every epoch's permutation,
the stepped heads and m per batch from one generator (the draws do not depend on --diversity); the same seed,
data and environment give bit-identical heads (the sidecar records the environment).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodens.errors import OodensError, format_value

EPS = 1e-6
#: below this many multiply-adds per step (batch x D x C x N) training on the CPU runs on one thread
SMALL_STEP = 50_000_000
DIVERSITIES = ("a2d", "none")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class HeadRecipe:
    source: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: dict  # optimiser -> learning rate
    weight_decay: dict  # optimiser -> weight decay
    momentum: float = 0.9


HEAD_RECIPES = {
    "sed": HeadRecipe("SED (DeiT-3-B features, ImageNet)", 11, 256, "adamw", {"adamw": 1e-3, "sgd": 1e-3},
                      {"adamw": 0.01, "sgd": 0.0}),
    "sed-50": HeadRecipe("SED, 50 heads (SGD)", 11, 256, "sgd", {"adamw": 1e-3, "sgd": 1e-3},
                         {"adamw": 0.01, "sgd": 0.0}),
    "digits": HeadRecipe("SED objective at the digits scale", 200, 64, "adamw", {"adamw": 1e-2, "sgd": 0.1},
                         {"adamw": 0.01, "sgd": 0.0}),
}


def recipe_for(dataset: str, n_heads: int) -> tuple[str, HeadRecipe]:
    name = "digits" if dataset == "digits" else ("sed-50" if n_heads >= 50 else "sed")
    return name, HEAD_RECIPES[name]


# --------------------------------------------------------------------------- the objective


def a2d_term(probs: torch.Tensor, m: int) -> torch.Tensor:
    """A2D per sample (B,): ``sum_{i != m} -log(p_i(k_i)(1 - p_m(k_i)) + p_m(k_i)(1 - p_i(k_i)) + EPS)``, k_i = argmax
    p_i, for ``probs`` (r heads, B, C) and the drawn head m."""
    r = probs.shape[0]
    if r < 2:
        return probs.new_zeros(probs.shape[1])
    others = torch.cat([probs[:m], probs[m + 1:]])  # (r-1, B, C)
    p_i, k = others.max(dim=-1)  # (r-1, B)
    p_m = probs[m].unsqueeze(0).expand_as(others).gather(-1, k.unsqueeze(-1)).squeeze(-1)
    return (-torch.log(p_i * (1 - p_m) + p_m * (1 - p_i) + EPS)).sum(dim=0)


def ensemble_weights(all_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SED's re-weighting of ID samples as OOD proxies (B,): the ensemble's (mean softmax of all heads) CE on each
    sample, normalised to sum 1 over the batch; no gradient."""
    with torch.no_grad():
        p = all_logits.softmax(dim=-1).mean(dim=0)
        ce = -torch.log(p.gather(1, y.unsqueeze(1)).squeeze(1).clamp_min(1e-30))
        total = ce.sum()
        return ce / total if float(total) > 0 else torch.full_like(ce, 1.0 / len(ce))


def heads_loss(x: torch.Tensor, y: torch.Tensor, weight: list[torch.Tensor], bias: list[torch.Tensor],
               selected: list[int], m: int, lam: float, lam_div: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits of the stepped heads (r, B, C)) for one batch: ``(1 - lam)·CE + lam_div·lam·A2D`` over the heads
    ``selected`` (m indexes into them)."""
    w = torch.stack([weight[i] for i in selected])
    b = torch.stack([bias[i] for i in selected])
    z = torch.einsum("bd,kcd->kbc", x, w) + b[:, None, :]
    r, n, c = z.shape
    ce = F.cross_entropy(z.reshape(r * n, c), y.repeat(r))
    loss = (1 - lam) * ce
    if lam_div > 0 and lam > 0 and r >= 2:
        with torch.no_grad():
            z_all = torch.einsum("bd,kcd->kbc", x, torch.stack([t.detach() for t in weight])) + \
                torch.stack([t.detach() for t in bias])[:, None, :]
        wts = ensemble_weights(z_all, y)
        loss = loss + lam_div * lam * (wts * a2d_term(z.softmax(dim=-1), m)).sum()
    return loss, z


# --------------------------------------------------------------------------- training


@dataclass
class HeadsResult:
    weight: np.ndarray  # (N, C, D)
    bias: np.ndarray  # (N, C)
    seeds: list[int]
    steps: int
    history: list[dict]


def init_heads(n: int, c: int, d: int, seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Head i as ``nn.Linear(d, c)`` initialises it (uniform ±1/√d), from its own seed ``seed·1000 + i``."""
    seeds = [seed * 1000 + i for i in range(n)]
    bound = 1 / math.sqrt(d)
    w, b = np.empty((n, c, d), np.float32), np.empty((n, c), np.float32)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        w[i] = torch.empty(c, d).uniform_(-bound, bound, generator=g).numpy()
        b[i] = torch.empty(c).uniform_(-bound, bound, generator=g).numpy()
    return seeds, w, b


def check_settings(n_heads: int, diversity: str, lam: float, random_select: int, epochs: int, lr: float,
                   batch_size: int, optimizer: str) -> None:
    def bad(flag, value, expected):
        raise OodensError(f"{flag} {format_value(value)}: expected {expected}")

    if n_heads < 1:
        bad("--heads", n_heads, "a positive number of heads")
    if diversity not in DIVERSITIES:
        bad("--diversity", diversity, f"one of {', '.join(DIVERSITIES)}")
    if diversity == "a2d" and n_heads < 2:
        bad("--heads", n_heads, "at least 2 heads for --diversity a2d (it makes heads disagree)")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0 <= lam <= 1):
        bad("--lambda", lam, "a weight in [0, 1]")
    if random_select < 0:
        bad("--random-select", random_select, "0 (every head) or a number of heads >= 1")
    if diversity == "a2d" and random_select == 1:
        bad("--random-select", random_select, "0 or >= 2 with --diversity a2d (A2D compares stepped heads)")
    if epochs < 1:
        bad("--epochs", epochs, "a positive number of epochs")
    if not (math.isfinite(lr) and lr > 0):
        bad("--lr", lr, "a finite learning rate > 0")
    if batch_size < 1:
        bad("--batch-size", batch_size, "a positive batch size")
    if optimizer not in OPTIMIZERS:
        bad("--optimizer", optimizer, f"one of {', '.join(OPTIMIZERS)}")


def fit_heads(features: np.ndarray, labels: np.ndarray, num_classes: int, n_heads: int, *, seed: int = 1000,
              diversity: str = "a2d", lam: float = 0.5, random_select: int = 2, epochs: int = 11,
              batch_size: int = 256, optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
              momentum: float = 0.9, device: str | torch.device = "cpu", progress: bool = True,
              title: str = "train-heads") -> HeadsResult:
    """Train ``n_heads`` linear heads on ``features`` (n, D) / ``labels`` (n,) with SED's objective (module doc)."""
    check_settings(n_heads, diversity, lam, random_select, epochs, lr, batch_size, optimizer)
    from oodens.runtime.progress import progress_bar

    dev = torch.device(device)
    x_all = torch.tensor(np.asarray(features, dtype=np.float32), device=dev)
    y_all = torch.tensor(np.asarray(labels, dtype=np.int64), device=dev)
    n, d = x_all.shape
    if len(y_all) != n or n == 0:
        raise OodensError(f"training features {tuple(x_all.shape)} and labels {tuple(y_all.shape)}: expected the same "
                          "number of samples, at least one")
    if int(y_all.min()) < 0 or int(y_all.max()) >= num_classes:
        raise OodensError(f"training labels span {int(y_all.min())}..{int(y_all.max())}: expected classes "
                          f"0..{num_classes - 1}")
    seeds, w0, b0 = init_heads(n_heads, num_classes, d, seed)
    weight = [torch.nn.Parameter(torch.from_numpy(w0[i]).to(dev)) for i in range(n_heads)]
    bias = [torch.nn.Parameter(torch.from_numpy(b0[i]).to(dev)) for i in range(n_heads)]
    params = [p for pair in zip(weight, bias) for p in pair]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw" else \
        torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = -(-n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    r = n_heads if random_select == 0 else min(random_select, n_heads)
    lam_div = 1.0 if diversity == "a2d" else 0.0
    g = torch.Generator().manual_seed(seed)
    history = []
    threads = torch.get_num_threads()
    if dev.type == "cpu" and batch_size * d * num_classes * n_heads < SMALL_STEP:
        torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and stall on a busy machine)
    try:
        with progress_bar(transient=False, disable=not progress) as bar:
            task = bar.add_task(f"{title}: {n_heads} heads ({diversity}) seed {seed}", total=epochs * steps, info="")
            every = max(1, epochs // 20)  # at most ~20 log lines
            for epoch in range(1, epochs + 1):
                perm = torch.randperm(n, generator=g).to(dev)
                total, seen, correct, stepped = 0.0, 0, 0, 0
                for s in range(steps):
                    idx = perm[s * batch_size:(s + 1) * batch_size]
                    selected = sorted(torch.randperm(n_heads, generator=g)[:r].tolist())
                    m = int(torch.randint(r, (1,), generator=g))
                    x, y = x_all[idx], y_all[idx]
                    loss, z = heads_loss(x, y, weight, bias, selected, m, lam, lam_div)
                    if not torch.isfinite(loss):
                        raise OodensError(f"training diverged: the loss is {float(loss)} at epoch {epoch}, step "
                                          f"{s + 1} of {steps} (--lr {lr:g}): expected a finite loss; nothing saved "
                                          "(try a smaller --lr)")
                    opt.zero_grad(set_to_none=True)  # heads not stepped keep grad None: no update, no decay
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(y)
                    seen += len(y)
                    correct += int((z.argmax(-1) == y).sum())
                    stepped += z.shape[0] * len(y)
                    bar.advance(task)
                history.append({"epoch": epoch, "loss": total / seen, "accuracy": correct / stepped})
                if epoch % every == 0 or epoch == epochs:
                    bar.update(task, info=f"epoch {epoch}/{epochs}: loss {total / seen:.3f}, "
                                          f"acc {100 * correct / stepped:.1f}%",
                               milestone="epoch" if every == 1 else f"{every} epochs")
    finally:
        torch.set_num_threads(threads)
    w = np.stack([p.detach().cpu().numpy() for p in weight])
    b = np.stack([p.detach().cpu().numpy() for p in bias])
    return HeadsResult(w, b, seeds, epochs * steps, history)


# --------------------------------------------------------------------------- the command


def _accuracy(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(z.argmax(-1) == y)) if len(y) else float("nan")


def _backbone_mode(path: Path):
    """The mode a ``--backbone`` checkpoint file or mode folder is."""
    from oodens.modes.discovery import discover_modes

    path = Path(path)
    if not path.exists():
        raise OodensError(f"--backbone {path} does not exist: expected a checkpoint file or a mode folder")
    if path.is_dir():
        modes = discover_modes(path)
        if len(modes) != 1:
            raise OodensError(f"--backbone {path} holds {len(modes)} modes: expected one checkpoint (a mode folder "
                              "or the checkpoint file)")
        return modes[0]
    found = [m for m in discover_modes(path.parent) if m.checkpoint.resolve() == path.resolve()]
    if not found:
        raise OodensError(f"--backbone {path} is not a checkpoint oodens can read: expected a .pth/.pth.tar/.pt/"
                          ".safetensors file with its oodens.json")
    return found[0]


def _copy_backbone(mode, out: Path) -> Path:
    """The backbone into ``out/backbone/`` (a hard link where the file system allows, else a copy; atomic), with an
    ``oodens.json`` saying what it is."""
    import json

    from oodens.modes.checkpoints import SIDECAR, atomic_write_bytes

    folder = out / "backbone"
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / mode.checkpoint.name
    if not (dst.exists() and dst.resolve() == mode.checkpoint.resolve()):
        tmp = folder / f".{dst.name}.tmp-{os.getpid()}"
        try:
            try:
                os.link(mode.checkpoint, tmp)
            except OSError:
                shutil.copyfile(mode.checkpoint, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    side = {**mode.sidecar, "arch": mode.arch, "dataset": mode.dataset, "num_classes": mode.num_classes,
            "preset": mode.preset}
    atomic_write_bytes(folder / SIDECAR, (json.dumps(side, indent=2, sort_keys=True) + "\n").encode())
    return dst


def _find_feature_dataset(root: Path, dataset: str | None) -> str:
    from oodens.modes.heads import feature_paths

    if dataset:
        return dataset
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and any(q.exists() for q in
                                                                          feature_paths(root, p.name, "train")))
    if len(names) != 1:
        raise OodensError(f"--features {root}: {'no' if not names else 'several'} dataset folders with a train split "
                          f"({', '.join(names) or 'expected <dataset>/train/features.npy or <dataset>/train.h5'}): "
                          "expected one, or --dataset")
    return names[0]


def train_heads(out: Path, n_heads: int, *, backbone: Path | None = None, features: Path | None = None,
                dataset: str | None = None, diversity: str = "a2d", lam: float = 0.5, random_select: int = 2,
                epochs: int | None = None, optimizer: str | None = None, lr: float | None = None,
                batch_size: int | None = None, seed: int = 1000, device: str = "auto", data_root: Path | None = None,
                cache_dir: Path | None = None, progress: bool = True) -> Path:
    """``oodens train-heads``: train the heads and write the heads folder ``out``; returns ``out``."""
    from oodens.data.datasets import find_dataset
    from oodens.modes.heads import FORMAT, HEADS_FILE, VERSION, read_features, save_heads
    from oodens.runtime.device import resolve_device
    from oodens.train.loop import _determinism, environment
    from oodens.version import __version__

    if (backbone is None) == (features is None):
        raise OodensError("train-heads needs exactly one of --backbone CKPT and --features DIR: expected one")
    if diversity not in DIVERSITIES:  # before any extraction
        raise OodensError(f"--diversity {diversity}: expected one of {', '.join(DIVERSITIES)}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise OodensError(f"--optimizer {optimizer}: expected one of {', '.join(OPTIMIZERS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OodensError(f"--out {out}: it is a file, expected a folder")
    dev = resolve_device(device)
    if backbone is not None:
        from oodens.data import data_root as resolve_root, get_benchmark
        from oodens.runtime.paths import default_cache_dir
        from oodens.views.cache import ViewCache
        from oodens.views.extract import extract

        mode = _backbone_mode(backbone)
        ds = mode.dataset
        bench = get_benchmark(ds, resolve_root(data_root))
        recipe_name, recipe = recipe_for(ds, n_heads)
        cache = ViewCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        ex = extract([mode], [bench.id_train, bench.id_test], cache, device=dev, base_only=[bench.id_train])
        train_v, test_v = ex.get(mode.name, bench.id_train), ex.get(mode.name, bench.id_test)
        x_tr, y_tr = np.asarray(train_v.features, np.float32), np.asarray(train_v.labels)
        x_te, y_te = np.asarray(test_v.features, np.float32), np.asarray(test_v.labels)
        num_classes, preset, arch = mode.num_classes, mode.preset, mode.arch
    else:
        features = Path(features)
        if not features.is_dir():
            raise OodensError(f"--features {features}: expected a folder of <dataset>/<split>/features.npy + "
                              "labels.npy (or <dataset>/<split>.h5)")
        ds = _find_feature_dataset(features, dataset)
        facts = find_dataset(ds)
        recipe_name, recipe = recipe_for(facts.name if facts else ds, n_heads)
        x_tr, y_tr = read_features(features, ds, "train")
        try:
            x_te, y_te = read_features(features, ds, "test")
        except OodensError:
            x_te, y_te = x_tr[:0], y_tr[:0]
        num_classes = facts.num_classes if facts else int(y_tr.max()) + 1
        preset, arch = (facts.preset if facts else "features"), "features"
        ds = facts.name if facts else ds
    optimizer = optimizer or recipe.optimizer
    settings = dict(seed=seed, diversity=diversity, lam=lam, random_select=random_select,
                    epochs=epochs or recipe.epochs, batch_size=batch_size or recipe.batch_size, optimizer=optimizer,
                    lr=lr if lr is not None else recipe.lr[optimizer], weight_decay=recipe.weight_decay[optimizer],
                    momentum=recipe.momentum)
    with _determinism(True):
        res = fit_heads(x_tr, y_tr, num_classes, n_heads, device=dev, progress=progress, **settings)
    # ID test accuracy of each head, the soup and the ensemble (mean softmax)
    z = np.einsum("nd,kcd->knc", x_te, res.weight) + res.bias[:, None, :]
    accs = [_accuracy(zk, y_te) for zk in z]
    soup_z = x_te @ res.weight.mean(0).T + res.bias.mean(0)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    objective = {"diversity": diversity, "lambda": lam, "lambda_div": 1.0 if diversity == "a2d" else 0.0,
                 "random_select": random_select, "a2d_eps": EPS,
                 "proxy_weights": "ensemble CE per sample / its batch sum (no gradient)"}
    width = max(2, len(str(n_heads - 1)))
    sidecar = {
        "format": FORMAT, "version": VERSION, "oodens_version": __version__, "heads_file": HEADS_FILE,
        "dataset": ds, "num_classes": num_classes, "feature_dim": int(res.weight.shape[2]), "preset": preset,
        "arch": arch, "feature_layer": "penultimate",
        "backbone": None, "features": None,
        "heads": [{"name": f"head-{i:0{width}d}", "seed": s, "objective": objective, "test_accuracy": a}
                  for i, (s, a) in enumerate(zip(res.seeds, accs))],
        "training": {**settings, "recipe": recipe_name, "recipe_source": HEAD_RECIPES[recipe_name].source,
                     "schedule": "cosine per step to 0", "steps": res.steps, "train_samples": int(len(y_tr)),
                     "init": "nn.Linear uniform ±1/sqrt(D), head i from seed*1000+i",
                     "soup_test_accuracy": _accuracy(soup_z, y_te),
                     "ensemble_test_accuracy": _accuracy(probs.mean(0), y_te), "history": res.history,
                     "environment": environment(dev)},
    }
    out.mkdir(parents=True, exist_ok=True)
    if backbone is not None:
        dst = _copy_backbone(mode, out)
        sidecar["backbone"] = {"checkpoint": str(dst.relative_to(out)), "sha256": mode.sha256, "arch": mode.arch,
                               "dataset": mode.dataset, "num_classes": mode.num_classes, "preset": mode.preset,
                               "source": str(mode.checkpoint)}
    else:
        f = features.resolve()
        sidecar["features"] = str(f.relative_to(out.resolve())) if out.resolve() in f.parents else str(f)
    save_heads(out, res.weight, res.bias, sidecar)
    return out
