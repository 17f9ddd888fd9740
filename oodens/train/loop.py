"""Training modes: independent seeds, SDDE ensembles and ELOC leave-out ensembles.

Three methods, one loop:

- **independent** (``oodens train --seed S``): one network, cross-entropy. The mode-ensemble
  paper's recipes for CIFAR and ImageNet, and the digits recipe the shipped modes were made with.
- **sdde** (``--members N --diversity D``): N networks trained jointly on the same batches with
  ``mean_n CE(f_n(x), y) + lambda * L_div`` (:mod:`oodens.train.diversity`); each member is saved as a mode.
- **eloc** (``--leave-out K``): K networks, member k leaves out the k-th class group
  (:mod:`oodens.train.eloc`); trained side by side on the same batches (the summed loss keeps their
  gradients separate, so each is trained as on its own), each saved as a mode with its
  ``kept_classes``.

How a run flows (:func:`train`):

1. :func:`resolve` turns the flags into a :class:`Plan`, reading no data: the dataset's facts
   (:data:`oodens.data.datasets.DATASETS`: class count, save folder, recipe family, default preset), the
   recipe of :data:`RECIPES` for (method, family) with ``--epochs``, ``--lr`` and ``--batch-size``
   overriding it, the diversity or the leave-out split, and where everything is saved.
2. The benchmark gives the ID train and test splits; ``--outliers`` names an outlier set for
   ``--diversity oe`` (checked to be no evaluation OOD set).
3. :func:`_start` seeds everything, builds the members and their :class:`Objective` (the members
   plus the loss of the method; ``forward(x, y, x_out) -> (loss, [correct, seen])``), the batches
   (:class:`_Batches`: feeds of :mod:`oodens.train.feeds` drawing each epoch from seeded generators), the
   optimiser and the schedule: a :class:`TrainingState`, which ``--resume`` then fills from the last
   saved state.
4. :func:`_run_epochs` runs :func:`_train_epoch` (each batch through the objective, backward, an SGD
   step) until the last epoch; after every epoch rank 0 saves the state (:meth:`TrainingState.save`).
5. At the end rank 0 measures each member's ID test accuracy and saves each as a mode
   (:func:`_save_modes`: ``{"state_dict": ...}`` plus the sidecar of :meth:`Plan.sidecar`).

The seed sets initialisation, data order and augmentation: one generator draws each epoch's
permutation and the augmentation (the shift offsets of a batch, or a seed per sample for per-sample
augmentation in DataLoader workers), so results do not depend on the number of workers. The digits
recipe always runs with deterministic algorithms (the same seed in the same environment gives
bit-identical weights); ``--deterministic`` turns them on for every recipe (plus cuDNN's deterministic
flags). Bit-identity holds within one environment only: the CPU kernels (oneDNN, MKL, ATen's vectorised
code) are chosen per instruction set and change between torch releases, so every sidecar records
:func:`environment` (torch release, CPU, kernel ISA caps) and weights are comparable bit for bit only
where that record matches.

Under ``torchrun`` each process takes every world_size-th sample of each global batch (``--batch-size``
is the global batch), the members are wrapped in DistributedDataParallel, and rank 0 saves.

After every epoch rank 0 writes the resumable state ``<mode-set>/seed-<S>.last.pth`` atomically
(members, optimiser, scheduler, epoch, RNG states: tensors, numbers and dicts only, loadable with
``torch.load(..., weights_only=True)``); ``--resume`` continues from it. Once the modes are saved the
state is removed (mode discovery ignores ``*.last.pth`` files in any case); an unfinished run keeps it.

Bad input stops a run before it starts: non-finite or out-of-range ``--lr``, ``--epochs``,
``--batch-size``, ``--lambda`` are one-line errors. A loss that becomes NaN or Inf stops the run with
one line naming the epoch and step; nothing of that epoch is saved (no mode, no new resumable state).
"""

from __future__ import annotations

import io
import math
import os
import platform
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodens.archs import arch_folder, canonical_arch, create_model
from oodens.data import DATASETS, DataSource, Dataset, Preset, find_dataset, get_benchmark, get_preset
from oodens.data.sources import ArraySource
from oodens.errors import OodensError, format_value
from oodens.modes.checkpoints import atomic_write_bytes, check_finite, save_checkpoint
from oodens.runtime.distributed import DistContext, all_reduce_sum, barrier, process_group
from oodens.runtime.progress import progress_bar
from oodens.train.diversity import DIVERSITIES, Diversity
from oodens.train.eloc import BETA, MARGIN, SPLIT_SEED, eloc_loss, leave_out_split, relabel_table
from oodens.train.feeds import AUGMENTS, make_feed
from oodens.version import __version__

STATE_FORMAT = 1

# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Schedule:
    """Learning-rate schedule: ``cosine`` (to ``eta_min``, stepped per ``step`` or per ``epoch``) or
    ``step`` (x ``gamma`` every ``every`` epochs, or at the fractions ``at`` of the epochs)."""

    kind: str
    per: str = "epoch"
    eta_min: float = 0.0
    every: int | None = None
    at: tuple[float, ...] = ()
    gamma: float = 0.1

    def describe(self) -> str:
        if self.kind == "cosine":
            return f"cosine per {self.per} to {self.eta_min:g}"
        when = f"every {self.every} epochs" if self.every else "at " + ", ".join(f"{100 * a:g}%" for a in self.at)
        return f"step x{self.gamma:g} {when}"


@dataclass(frozen=True)
class Recipe:
    source: str  # where the recipe comes from
    archs: tuple[str, ...]
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    momentum: float
    nesterov: bool
    schedule: Schedule
    augment: str  # a key of AUGMENTS
    checkpoint: str  # file name in each mode folder (the reference layout's)
    module_prefix: bool = False  # keys saved as nn.DataParallel's "module.<name>"
    deterministic: bool = False  # always run with deterministic algorithms
    preset: str | None = None  # preprocessing, when not the dataset's default preset


DIGITS_ARCHS = ("cnn",)
CIFAR_ARCHS = ("R18", "WRN28X10", "DNBC100")
IMAGENET_ARCHS = ("R50", "DN121")

#: (method, dataset family) -> recipe
RECIPES: dict[tuple[str, str], Recipe] = {
    # the shipped digits modes were made with this one: keep it as it is
    ("independent", "digits"): Recipe(
        "oodens digits", DIGITS_ARCHS, epochs=30, lr=0.05, batch_size=64, weight_decay=5e-4, momentum=0.9,
        nesterov=False, schedule=Schedule("cosine", per="step"), augment="shift1", checkpoint="checkpoint.pth.tar",
        deterministic=True),
    ("independent", "cifar"): Recipe(
        "mode-ensemble paper, CIFAR", CIFAR_ARCHS, epochs=150, lr=0.1, batch_size=256, weight_decay=1e-4,
        momentum=0.9, nesterov=False, schedule=Schedule("cosine", per="epoch"), augment="crop32-flip",
        checkpoint="epoch150.pth"),
    ("independent", "imagenet"): Recipe(
        "mode-ensemble paper, ImageNet", IMAGENET_ARCHS, epochs=90, lr=0.1, batch_size=256,
        weight_decay=1e-4, momentum=0.9, nesterov=False, schedule=Schedule("step", every=30), augment="rrc224-flip",
        checkpoint="checkpoint.pth.tar", module_prefix=True),
    # SDDE's code: SGD Nesterov 0.1, momentum 0.9, wd 5e-4, batch 128, 100 epochs, per-step cosine to 1e-6
    ("sdde", "cifar"): Recipe(
        "SDDE code, CIFAR", CIFAR_ARCHS, epochs=100, lr=0.1, batch_size=128, weight_decay=5e-4,
        momentum=0.9, nesterov=True, schedule=Schedule("cosine", per="step", eta_min=1e-6), augment="crop32-flip",
        checkpoint="epoch150.pth"),
    # digits: SDDE's optimiser and schedule at the digits scale (epochs, lr, batch, shift of the digits recipe)
    ("sdde", "digits"): Recipe(
        "SDDE optimiser at the digits scale", DIGITS_ARCHS, epochs=30, lr=0.05, batch_size=64,
        weight_decay=5e-4, momentum=0.9, nesterov=True, schedule=Schedule("cosine", per="step", eta_min=1e-6),
        augment="shift1", checkpoint="checkpoint.pth.tar", deterministic=True),
    # ELOC: SGD 0.1, momentum 0.9, wd 5e-4, 100 epochs, x0.1 at 50% and 75%; ELOC's CIFAR normalisation
    ("eloc", "cifar"): Recipe(
        "ELOC paper, CIFAR", CIFAR_ARCHS, epochs=100, lr=0.1, batch_size=128, weight_decay=5e-4,
        momentum=0.9, nesterov=False, schedule=Schedule("step", at=(0.5, 0.75)), augment="crop32-flip",
        checkpoint="epoch150.pth", preset="cifar-eloc"),
    ("eloc", "digits"): Recipe(
        "ELOC schedule at the digits scale", DIGITS_ARCHS, epochs=30, lr=0.05, batch_size=64,
        weight_decay=5e-4, momentum=0.9, nesterov=False, schedule=Schedule("step", at=(0.5, 0.75)),
        augment="shift1", checkpoint="checkpoint.pth.tar", deterministic=True),
}

#: benchmark -> outlier sets made for training with ``--diversity oe`` (never an evaluation OOD set)
TRAIN_OUTLIERS: dict[str, dict[str, Callable[[], DataSource]]] = {
    "digits": {"letters-lower": lambda: _digits_outliers()},
}


def _digits_outliers() -> DataSource:
    from oodens.data import digits

    return ArraySource("letters-lower", "train", digits.letters_lower)


# --------------------------------------------------------------------------- resolving a run


@dataclass(frozen=True)
class Plan:
    """One training run, resolved from the flags by :func:`resolve` before any data is read: what is
    trained (method, members, architecture, dataset), how (the recipe and its overrides) and where
    it is saved."""

    method: str  # "independent", "sdde" or "eloc"
    seed: int
    arch: str  # canonical name
    dataset: Dataset
    recipe: Recipe
    epochs: int
    lr: float
    batch_size: int
    members: int
    deterministic: bool  # run with deterministic algorithms (the flag, or the recipe's)
    set_dir: Path  # out/<Dataset>/<mode set>
    diversity: Diversity | None = None  # sdde
    lam: float | None = None  # sdde
    outliers: str | None = None  # sdde with a diversity that uses outliers
    split: list[tuple[list[int], list[int]]] | None = None  # eloc: (kept, left-out classes) per member

    @property
    def preset(self) -> str:
        return self.recipe.preset or self.dataset.preset

    @property
    def per_step(self) -> bool:
        """Whether the schedule steps after every batch (else after every epoch)."""
        return self.recipe.schedule.kind == "cosine" and self.recipe.schedule.per == "step"

    @property
    def state_path(self) -> Path:
        return self.set_dir / f"seed-{self.seed}.last.pth"

    @property
    def checkpoints(self) -> list[Path]:
        """One checkpoint per member: ``seed-<S>/`` for an independent mode, ``seed-<S>-m<k>/`` for members."""
        folders = [f"seed-{self.seed}"] if self.method == "independent" else \
            [f"seed-{self.seed}-m{k}" for k in range(self.members)]
        return [self.set_dir / f / self.recipe.checkpoint for f in folders]

    def config(self) -> dict:
        """The settings a ``--resume`` must share with the run that saved the state (kept in the state)."""
        return {"method": self.method, "arch": self.arch, "dataset": self.dataset.name, "seed": self.seed,
                "members": self.members, "diversity": self.diversity.name if self.diversity else None,
                "lambda": self.lam, "outliers": self.outliers, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "recipe": self.recipe.source}

    def objective(self) -> Objective:
        """Fresh members (in member order, from the current RNG state) with the method's loss."""
        if self.split:
            return LeaveOut([create_model(self.arch, len(kept)) for kept, _ in self.split], self.split,
                            self.dataset.num_classes)
        nets = [create_model(self.arch, self.dataset.num_classes) for _ in range(self.members)]
        return SDDE(nets, self.diversity, self.lam, self.outliers) if self.diversity else CrossEntropy(nets)

    def sidecar(self, objective: Objective, k: int, accuracy: float, processes: int, dev) -> dict:
        """Member k's ``oodens.json``: what it is, how it was trained and in which environment."""
        r = self.recipe
        return {
            "arch": self.arch,
            "dataset": self.dataset.name,
            "num_classes": self.dataset.num_classes,
            "seed": self.seed,
            "preset": self.preset,
            "method": self.method,
            "test_accuracy": accuracy,
            "train": {"recipe": r.source, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                      "weight_decay": r.weight_decay, "momentum": r.momentum, "nesterov": r.nesterov,
                      "schedule": r.schedule.describe(), "augment": r.augment, "processes": processes,
                      "deterministic": self.deterministic},
            **objective.member_sidecar(k),
            "environment": environment(dev),
            "oodens_version": __version__,
        }


def resolve(
    seed: int,
    arch: str = "cnn",
    dataset: str = "digits",
    epochs: int | None = None,
    out: Path = Path("save"),
    lr: float | None = None,
    batch_size: int | None = None,
    *,
    members: int | None = None,
    diversity: str | None = None,
    lam: float | None = None,
    outliers: str | None = None,
    leave_out: int | None = None,
    deterministic: bool = False,
) -> Plan:
    """The :class:`Plan` the flags of :func:`train` describe; flags that do not fit together are a one-line
    :class:`OodensError`. Reads no data (the outlier set is checked against the benchmark later)."""
    if leave_out is not None and (members is not None or diversity is not None):
        raise OodensError("--leave-out (ELOC) and --members/--diversity (SDDE) are different methods: "
                          "expected one of them")
    method = "eloc" if leave_out is not None else "sdde" if (members is not None or diversity is not None) \
        else "independent"
    facts = find_dataset(dataset)
    if facts is None:
        raise OodensError(f"cannot train on dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if (method, facts.family) not in RECIPES:
        have = sorted({f for m, f in RECIPES if m == method})
        raise OodensError(f"no {method} recipe for {dataset}: expected a dataset of {', '.join(have)}")
    recipe = RECIPES[(method, facts.family)]
    arch = canonical_arch(arch)
    if arch not in recipe.archs:
        raise OodensError(f"the {dataset} recipe trains {', '.join(recipe.archs)}, not {arch!r}")
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    batch_size = recipe.batch_size if batch_size is None else batch_size
    _check_hyperparameters(epochs, lr, batch_size, lam)
    div = split = None
    if method == "sdde":
        members = 5 if members is None else members
        diversity = diversity or "gradcam"
        if diversity not in DIVERSITIES:
            raise OodensError(f"unknown diversity {diversity!r}: expected one of {', '.join(DIVERSITIES)}")
        if members < 2:
            raise OodensError(f"--members {members}: an SDDE ensemble needs at least 2 members")
        div = DIVERSITIES[diversity]
        lam = div.default_lambda if lam is None else lam
        if div.uses_outliers and not outliers:
            raise OodensError(f"--diversity {diversity} needs --outliers NAME|PATH (a training outlier set; on "
                              f"digits: letters-lower)")
        if not div.uses_outliers and outliers:
            raise OodensError(f"--outliers is only used by --diversity oe, not {diversity}")
    elif lam is not None or outliers:
        raise OodensError("--lambda and --outliers belong to SDDE training (--members/--diversity)")
    if method == "eloc":
        if not 2 <= leave_out <= facts.num_classes:
            raise OodensError(f"--leave-out {leave_out}: expected 2 <= K <= {facts.num_classes} (the classes of "
                              f"{dataset})")
        split = leave_out_split(facts.num_classes, leave_out)
    n_members = {"independent": 1, "sdde": members, "eloc": leave_out}[method]
    suffix = {"independent": "", "sdde": f"-sdde-{diversity}", "eloc": f"-eloc-{leave_out}"}[method]
    return Plan(method=method, seed=seed, arch=arch, dataset=facts, recipe=recipe, epochs=epochs, lr=lr,
                batch_size=batch_size, members=n_members, deterministic=deterministic or recipe.deterministic,
                set_dir=Path(out) / facts.folder / (arch_folder(arch) + suffix), diversity=div, lam=lam,
                outliers=outliers, split=split)


def _check_hyperparameters(epochs, lr, batch_size, lam) -> None:
    """Refuse what no run can use: a non-finite or non-positive learning rate, fewer than one epoch or
    sample per batch, a non-finite or negative diversity weight (before any data is read)."""
    def bad_number(v):
        return isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)

    if bad_number(lr) or lr <= 0:
        raise OodensError(f"--lr {format_value(lr)}: expected a finite learning rate > 0 (e.g. 0.1)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise OodensError(f"--epochs {epochs}: expected a whole number of epochs >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OodensError(f"--batch-size {batch_size}: expected a whole number of samples >= 1")
    if lam is not None and (bad_number(lam) or lam < 0):
        raise OodensError(f"--lambda {format_value(lam)}: expected a finite diversity weight >= 0")


# --------------------------------------------------------------------------- objectives


class Objective(nn.Module):
    """The members and the training loss on a batch: ``forward(x, y, x_out) -> (loss, [correct, seen])``.

    The whole objective is one module, so DistributedDataParallel can wrap it (gradients sync
    whichever member methods the loss calls)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def targets(self, k: int, y: torch.Tensor) -> torch.Tensor:
        """Member k's target for labels ``y`` (-1: a class member k does not predict)."""
        return y

    def member_sidecar(self, k: int) -> dict:
        return {}

    @staticmethod
    def _stats(pairs) -> torch.Tensor:
        with torch.no_grad():
            correct = sum((z.argmax(1)[t >= 0] == t[t >= 0]).sum() for z, t in pairs)
            seen = sum((t >= 0).sum() for _, t in pairs)
            return torch.stack([torch.as_tensor(correct), torch.as_tensor(seen)]).float()


class CrossEntropy(Objective):
    """One independent mode: CE(f(x), y)."""

    def forward(self, x, y, x_out=None):
        z = self.members[0](x)
        return F.cross_entropy(z, y), self._stats([(z, y)])


class SDDE(Objective):
    """N members trained jointly: mean_n CE(f_n(x), y) + lambda * L_div. The diversity runs the members on
    the batch the way its term needs and hands back their logits with the term (:mod:`oodens.train.diversity`)."""

    def __init__(self, members, diversity: Diversity, lam: float, outliers: str | None = None):
        super().__init__(members)
        self.diversity, self.lam, self.outliers = diversity, lam, outliers

    def forward(self, x, y, x_out=None):
        logits, div = self.diversity.loss(self.members, x, y, x_out)
        ce = torch.stack([F.cross_entropy(z, y) for z in logits]).mean()
        return ce + self.lam * div, self._stats([(z, y) for z in logits])

    def member_sidecar(self, k):
        return {"ensemble": {"method": "sdde", "members": len(self.members), "member": k,
                             "diversity": self.diversity.name, "lambda": self.lam, "outliers": self.outliers}}


class LeaveOut(Objective):
    """ELOC: member k trained on its kept classes with the margin-entropy loss (:mod:`oodens.train.eloc`);
    the members' losses are summed, which leaves each member's gradient its own."""

    def __init__(self, members, split: list[tuple[list[int], list[int]]], num_classes: int,
                 margin: float = MARGIN, beta: float = BETA):
        super().__init__(members)
        self.split, self.margin, self.beta = split, margin, beta
        for k, (kept, _) in enumerate(split):
            self.register_buffer(f"table{k}", relabel_table(kept, num_classes), persistent=False)

    def targets(self, k, y):
        return getattr(self, f"table{k}").to(y.device)[y]

    def forward(self, x, y, x_out=None):
        loss, pairs = 0.0, []
        for k, m in enumerate(self.members):
            z, t = m(x), self.targets(k, y)
            loss = loss + eloc_loss(z, t, self.margin, self.beta)
            pairs.append((z, t))
        return loss, self._stats(pairs)

    def member_sidecar(self, k):
        kept, left = self.split[k]
        return {"kept_classes": kept, "left_out_classes": left,
                "ensemble": {"method": "eloc", "members": len(self.members), "member": k, "margin": self.margin,
                             "beta": self.beta, "split_seed": SPLIT_SEED}}


# --------------------------------------------------------------------------- environment and determinism


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device | str = "cpu") -> dict:
    """What decides the floating-point result of training, recorded in every sidecar: the torch release,
    the machine and CPU, the ISA ATen dispatches to, the oneDNN ISA cap (``ONEDNN_MAX_CPU_ISA``, "native"
    when unset) and the device. The same seed reproduces weights bit for bit only where all of it matches."""
    dev = torch.device(device)
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
        "device": dev.type if dev.type == "cpu" else torch.cuda.get_device_name(dev),
    }


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@contextmanager
def _determinism(on: bool):
    """Deterministic algorithms and cuDNN flags while training; restored afterwards."""
    import torch.backends.cudnn as cudnn

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.deterministic, cudnn.benchmark = True, False
    else:
        cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


# --------------------------------------------------------------------------- training state


def _scheduler(opt, schedule: Schedule, epochs: int, steps: int):
    if schedule.kind == "cosine":
        t_max = epochs * steps if schedule.per == "step" else epochs
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t_max), eta_min=schedule.eta_min)
    if schedule.every:
        milestones = list(range(schedule.every, epochs, schedule.every))
    else:
        milestones = [int(round(a * epochs)) for a in schedule.at]
    gamma = schedule.gamma
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: gamma ** sum(e >= m for m in milestones))


@dataclass
class TrainingState:
    """What a run carries from epoch to epoch: the objective (the members), the optimiser, the schedule,
    the generators the feeds draw batches and augmentation from (``data``; ``outliers`` with an outlier
    set) and the number of epochs done. :meth:`save` writes it with the global RNG states and the
    run's :meth:`Plan.config`; :meth:`load` restores it from such a file."""

    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generators: dict[str, torch.Generator]
    epoch: int = 0

    def save(self, path: Path, config: dict) -> None:
        """Write ``path`` atomically: tensors, numbers, strings, lists and dicts only."""
        state = {
            "format": STATE_FORMAT,
            "config": config,
            "epoch": self.epoch,
            "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.objective.members],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.generators),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load(self, path: Path, config: dict) -> None:
        """Continue from ``path``, which must have been saved with the same ``config``."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise OodensError(f"cannot read training state {path}: {str(e).strip()[:200]} (expected a file written "
                              f"by oodens train; start without --resume to train from scratch)") from e
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise OodensError(f"{path} is not an oodens training state (format {STATE_FORMAT})")
        saved = state["config"]
        diff = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
        if diff:
            k = diff[0]
            raise OodensError(f"--resume: {path} was trained with {k} = {saved.get(k)!r} but this run has "
                              f"{config.get(k)!r}: expected the same settings (or no --resume to start over)")
        for m, sd in zip(self.objective.members, state["members"]):
            m.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.generators)
        self.epoch = int(state["epoch"])


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "generators": {k: g.get_state() for k, g in generators.items()},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }


def _set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


# --------------------------------------------------------------------------- data


def _outlier_source(spec: str, bench, facts: Dataset, root: Path | None) -> DataSource:
    """``--outliers NAME|PATH``: a training outlier set of the benchmark, or an image folder / image list /
    .mat; never one of the benchmark's evaluation OOD sets."""
    from oodens.data import source_from_path

    evaluation = set(bench.ood_factories) | set(bench.missing)
    table = TRAIN_OUTLIERS.get(bench.name, {})
    if spec in evaluation:
        raise OodensError(f"--outliers {spec} is an evaluation OOD set of {bench.name}: expected a distinct "
                          f"outlier set ({', '.join(table) or 'an image folder, image list or .mat'})")
    if spec in table:
        return table[spec]()
    path = Path(spec).expanduser()
    if not path.exists():
        raise OodensError(f"--outliers {spec}: not an outlier set of {bench.name} ({', '.join(table) or 'none'}) "
                          f"nor an existing image folder, image list .txt or .mat")
    for ood in facts.ood_sets:
        where = (root / ood.path).resolve() if root else None
        if where is not None and (path.resolve() == where or where in path.resolve().parents
                                  or path.resolve() in where.parents):
            raise OodensError(f"--outliers {path} overlaps the evaluation OOD set {ood.name} ({where}): "
                              f"expected a distinct outlier set")
    return source_from_path("outliers", path)()


class _Batches:
    """The training batches: ``epoch(generators)`` yields (x, y, x_out) for one pass over the ID train
    split, ``x_out`` an outlier batch drawn beside each ID batch (None without an outlier set)."""

    def __init__(self, plan: Plan, train: DataSource, outliers: DataSource | None, ctx: DistContext, workers: int):
        preset, augment = get_preset(plan.preset), AUGMENTS[plan.recipe.augment]
        self.feed = make_feed(train, preset, augment, plan.batch_size, ctx, workers)
        self.outliers = make_feed(outliers, preset, augment, plan.batch_size, ctx, workers) if outliers else None

    def steps(self) -> int:
        return self.feed.steps()

    def epoch(self, generators: dict[str, torch.Generator]) -> Iterator[tuple]:
        outs = self.outliers.epoch(generators["outliers"], count=self.steps()) if self.outliers else None
        for x, y in self.feed.epoch(generators["data"]):
            yield x, y, next(outs)[0] if outs is not None else None


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a run wrote: one checkpoint per member (empty if it stopped early), their ID test
    accuracies, and the resumable state file (removed once the modes are saved)."""

    paths: list[Path]
    accuracies: list[float]
    state: Path
    main: bool = True


def train(
    seed: int,
    arch: str = "cnn",
    dataset: str = "digits",
    epochs: int | None = None,
    out: Path = Path("save"),
    lr: float | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    *,
    members: int | None = None,
    diversity: str | None = None,
    lam: float | None = None,
    outliers: str | None = None,
    leave_out: int | None = None,
    data_root: Path | None = None,
    workers: int = 0,
    deterministic: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train one independent mode, an SDDE ensemble (``members``/``diversity``) or an ELOC ensemble
    (``leave_out``) and save each member as a mode. ``stop_after`` stops after that many epochs with
    only the resumable state written (as a preempted job would)."""
    from oodens.data import data_root as resolve_root

    plan = resolve(seed, arch, dataset, epochs, out, lr, batch_size, members=members, diversity=diversity, lam=lam,
                   outliers=outliers, leave_out=leave_out, deterministic=deterministic)
    if workers < 0:
        raise OodensError(f"--workers {workers}: expected 0 or more")
    root = resolve_root(data_root)
    bench = get_benchmark(plan.dataset.name, root)
    outlier_source = _outlier_source(outliers, bench, plan.dataset, root) if outliers else None

    with process_group(device) as (ctx, dev), _determinism(plan.deterministic):
        if plan.batch_size < ctx.world_size:
            raise OodensError(f"--batch-size {plan.batch_size} is the global batch: expected at least one sample "
                              f"per process ({ctx.world_size})")
        state, batches = _start(plan, bench.id_train, outlier_source, ctx, dev, workers)
        if resume:
            _resume(plan, state, ctx)
        last = plan.epochs if stop_after is None else min(plan.epochs, stop_after)
        _run_epochs(plan, state, batches, last, ctx, dev)
        barrier(ctx)
        if last < plan.epochs:
            return TrainResult([], [], plan.state_path, ctx.is_main)
        accuracies = _save_modes(plan, state.objective, bench.id_test, ctx, dev, workers) if ctx.is_main else []
        if ctx.is_main:  # finished: the resumable state is no longer needed (and is no mode)
            plan.state_path.unlink(missing_ok=True)
        barrier(ctx)
    return TrainResult(plan.checkpoints, accuracies, plan.state_path, ctx.is_main)


def _start(plan: Plan, train: DataSource, outliers: DataSource | None, ctx: DistContext, dev,
           workers: int) -> tuple[TrainingState, _Batches]:
    """Epoch 0 of the plan and its batches. The order is part of the result: everything is seeded, then
    the members are initialised, then the feeds, the optimiser and the schedule are built."""
    generators = {"data": seed_everything(plan.seed)}
    objective = plan.objective().to(dev)
    batches = _Batches(plan, train, outliers, ctx, workers)
    if outliers is not None:
        generators["outliers"] = torch.Generator().manual_seed(plan.seed + 1)
    r = plan.recipe
    opt = torch.optim.SGD(objective.parameters(), lr=plan.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                          nesterov=r.nesterov)
    sched = _scheduler(opt, r.schedule, plan.epochs, batches.steps())
    return TrainingState(objective, opt, sched, generators), batches


def _resume(plan: Plan, state: TrainingState, ctx: DistContext) -> None:
    """``--resume``: continue from the plan's saved state if there is one (else start from epoch 1)."""
    if plan.state_path.is_file():
        state.load(plan.state_path, plan.config())
    elif ctx.is_main:
        from oodens.runtime.progress import stderr

        stderr.print(f"--resume: no training state at {plan.state_path}, starting from epoch 1")


def _run_epochs(plan: Plan, state: TrainingState, batches: _Batches, last: int, ctx: DistContext, dev) -> None:
    """Train from ``state.epoch`` up to epoch ``last`` with a progress bar (rank 0), the members wrapped in
    DistributedDataParallel under torchrun; rank 0 saves the state after every epoch."""
    net = state.objective
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    steps = batches.steps()
    members_txt = f" x{plan.members} ({plan.method}{', ' + plan.diversity.name if plan.diversity else ''})" \
        if plan.members > 1 else ""
    with progress_bar(transient=False) as bar:
        bar.disable = bar.disable or not ctx.is_main
        task = bar.add_task(f"train {plan.arch}{members_txt} seed {plan.seed}", total=plan.epochs * steps,
                            completed=state.epoch * steps, info="")
        while state.epoch < last:
            try:
                totals, first_bad = _train_epoch(net, state, batches, plan.per_step, dev, lambda: bar.advance(task),
                                                 stop_at_once=not ctx.enabled)
            except _NonFiniteLoss as e:
                raise _diverged(plan, state.epoch + 1, e.step, steps, e.value) from None
            loss_sum, n, correct, seen, non_finite = all_reduce_sum(totals, ctx, dev)
            if non_finite or not math.isfinite(loss_sum):  # every process agrees: all stop here, nothing saved
                raise _diverged(plan, state.epoch + 1, first_bad, steps, None)
            state.epoch += 1
            bar.update(task, info=f"epoch {state.epoch}/{plan.epochs}: loss {loss_sum / max(n, 1.0):.3f}, "
                                  f"acc {100 * correct / max(seen, 1.0):.1f}%", milestone="epoch")
            if ctx.is_main:
                state.save(plan.state_path, plan.config())


class _NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float):
        self.step, self.value = step, value


def _diverged(plan: Plan, epoch: int, step: int | None, steps: int, value: float | None) -> OodensError:
    where = f"step {step} of {steps}" if step else "a step of another process"
    what = f"is {value}" if value is not None else "became NaN or Inf"
    return OodensError(f"training diverged: the loss {what} at epoch {epoch}, {where} (--lr {plan.lr:g}): expected "
                       f"a finite loss; no checkpoint saved (try a smaller --lr)")


def _train_epoch(net: nn.Module, state: TrainingState, batches: _Batches, per_step: bool, dev,
                 advance: Callable[[], None], stop_at_once: bool = True) -> tuple[list[float], int | None]:
    """One pass over the training split: per batch the objective's loss, its gradient, an SGD step (and a
    schedule step if the schedule is per step). Returns this process's [loss * n, n, correct, seen,
    non-finite steps] and the first step (1-based) whose loss was NaN or Inf (None if none).

    A non-finite loss raises :class:`_NonFiniteLoss` before its step is taken when ``stop_at_once`` (one
    process); under torchrun the processes run the epoch out and stop together on the summed count."""
    state.objective.train()
    totals = torch.zeros(5, dtype=torch.float64, device=dev)
    first_bad = torch.full((), float("inf"), dtype=torch.float64, device=dev)
    for step, (x, y, x_out) in enumerate(batches.epoch(state.generators), 1):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        x_out = x_out.to(dev, non_blocking=True) if x_out is not None else None
        loss, stats = net(x, y, x_out)
        finite = torch.isfinite(loss.detach())
        if stop_at_once and not bool(finite):
            raise _NonFiniteLoss(step, float(loss.detach()))
        first_bad = torch.where(finite, first_bad, torch.minimum(first_bad, torch.tensor(float(step), device=dev,
                                                                                          dtype=torch.float64)))
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        if per_step:
            state.scheduler.step()
        totals += torch.stack([loss.detach().double() * len(y), torch.tensor(float(len(y)), device=dev,
                              dtype=torch.float64), stats[0].double(), stats[1].double(),
                              (~finite).double()])
        advance()
    if not per_step:
        state.scheduler.step()
    bad = float(first_bad)
    return totals.tolist(), (int(bad) if math.isfinite(bad) else None)


def _save_modes(plan: Plan, objective: Objective, test: DataSource, ctx: DistContext, dev,
                workers: int) -> list[float]:
    """Each member's ID test accuracy, and each member saved as a mode with its sidecar; returns the accuracies."""
    for path, m in zip(plan.checkpoints, objective.members):  # no NaN weights saved as a mode
        check_finite(m.state_dict(), f"the trained mode {path.parent.name}")
    accuracies = _test_accuracies(objective, test, get_preset(plan.preset), max(plan.batch_size, 256), dev, workers)
    for k, (m, path) in enumerate(zip(objective.members, plan.checkpoints)):
        save_checkpoint(path, m.cpu(), plan.sidecar(objective, k, accuracies[k], ctx.world_size, dev),
                        prefix="module." if plan.recipe.module_prefix else "")
    return accuracies


def _test_accuracies(objective: Objective, source: DataSource, preset: Preset, batch_size: int, dev,
                     workers: int) -> list[float]:
    """Each member's accuracy on the ID test split (a leave-out member: on the samples of its kept classes)."""
    k = len(objective.members)
    correct, seen = [0] * k, [0] * k
    objective.eval()
    with torch.inference_mode():
        for x, y in source.loader(preset, batch_size, workers):
            x, y = x.to(dev), torch.as_tensor(y, dtype=torch.long).to(dev)
            for i, m in enumerate(objective.members):
                t = objective.targets(i, y)
                keep = t >= 0
                correct[i] += int((m(x).argmax(1)[keep] == t[keep]).sum())
                seen[i] += int(keep.sum())
    return [c / s if s else float("nan") for c, s in zip(correct, seen)]
