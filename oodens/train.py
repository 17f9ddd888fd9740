"""Training modes: independent seeds, SDDE ensembles and ELOC leave-out ensembles.

Three methods, one loop (:func:`train`):

- **independent** (``oodens train --seed S``): one network, cross-entropy. The mode-ensemble
  paper's recipes for CIFAR and ImageNet, and the digits recipe the shipped modes were made with.
- **sdde** (``--members N --diversity D``): N networks trained jointly on the same batches with
  ``mean_n CE(f_n(x), y) + lambda * L_div`` (:mod:`oodens.diversity`); each member is saved as a mode.
- **eloc** (``--leave-out K``): K networks, member k leaves out the k-th class group
  (:mod:`oodens.eloc`); trained side by side on the same batches (the summed loss keeps their
  gradients separate, so each is trained as on its own), each saved as a mode with its
  ``kept_classes``.

The recipes are the table :data:`RECIPES` (method x dataset family); ``--epochs``, ``--lr`` and
``--batch-size`` override it. The seed sets initialisation, data order and augmentation: one
generator draws each epoch's permutation and the augmentation (the shift offsets of a batch, or a
seed per sample for per-sample augmentation in DataLoader workers), so results do not depend on
the number of workers. The digits recipe always runs with deterministic algorithms (the same seed
in the same environment gives bit-identical weights); ``--deterministic`` turns them on for every recipe
(plus cuDNN's deterministic flags). Bit-identity holds within one environment only: the CPU kernels
(oneDNN, MKL, ATen's vectorised code) are chosen per instruction set and change between torch
releases, so every sidecar records :func:`environment` (torch release, CPU, kernel ISA caps) and
weights are comparable bit for bit only where that record matches.

Under ``torchrun`` each process takes every world_size-th sample of each global batch (``--batch-size``
is the global batch), the members are wrapped in DistributedDataParallel, and rank 0 saves.

After every epoch rank 0 writes the resumable state ``<mode-set>/seed-<S>.last.pth`` atomically
(members, optimiser, scheduler, epoch, RNG states: tensors, numbers and dicts only, loadable with
``torch.load(..., weights_only=True)``); ``--resume`` continues from it.
"""

from __future__ import annotations

import io
import os
import platform
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodens import __version__
from oodens.archs import arch_folder, canonical_arch, create_model
from oodens.checkpoints import atomic_write_bytes, save_checkpoint
from oodens.data import DataSource, Preset, get_benchmark, get_preset
from oodens.data.feeds import AUGMENTS, make_feed
from oodens.data.sources import ArraySource
from oodens.distributed import all_reduce_sum, barrier, process_group
from oodens.diversity import DIVERSITIES, Diversity
from oodens.eloc import BETA, MARGIN, SPLIT_SEED, eloc_loss, leave_out_split, relabel_table
from oodens.errors import OodensError
from oodens.progress import progress_bar

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
    preset: str
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


DIGITS_ARCHS = ("cnn",)
CIFAR_ARCHS = ("R18", "WRN28X10", "DNBC100")
IMAGENET_ARCHS = ("R50", "DN121")

#: (method, dataset family) -> recipe
RECIPES: dict[tuple[str, str], Recipe] = {
    # the shipped digits modes were made with this one: keep it as it is
    ("independent", "digits"): Recipe(
        "oodens digits", DIGITS_ARCHS, "digits", epochs=30, lr=0.05, batch_size=64, weight_decay=5e-4, momentum=0.9,
        nesterov=False, schedule=Schedule("cosine", per="step"), augment="shift1", checkpoint="checkpoint.pth.tar",
        deterministic=True),
    ("independent", "cifar"): Recipe(
        "mode-ensemble paper, CIFAR", CIFAR_ARCHS, "cifar", epochs=150, lr=0.1, batch_size=256, weight_decay=1e-4,
        momentum=0.9, nesterov=False, schedule=Schedule("cosine", per="epoch"), augment="crop32-flip",
        checkpoint="epoch150.pth"),
    ("independent", "imagenet"): Recipe(
        "mode-ensemble paper, ImageNet", IMAGENET_ARCHS, "imagenet", epochs=90, lr=0.1, batch_size=256,
        weight_decay=1e-4, momentum=0.9, nesterov=False, schedule=Schedule("step", every=30), augment="rrc224-flip",
        checkpoint="checkpoint.pth.tar", module_prefix=True),
    # SDDE's code: SGD Nesterov 0.1, momentum 0.9, wd 5e-4, batch 128, 100 epochs, per-step cosine to 1e-6
    ("sdde", "cifar"): Recipe(
        "SDDE code, CIFAR", CIFAR_ARCHS, "cifar", epochs=100, lr=0.1, batch_size=128, weight_decay=5e-4,
        momentum=0.9, nesterov=True, schedule=Schedule("cosine", per="step", eta_min=1e-6), augment="crop32-flip",
        checkpoint="epoch150.pth"),
    # digits: SDDE's optimiser and schedule at the digits scale (epochs, lr, batch, shift of the digits recipe)
    ("sdde", "digits"): Recipe(
        "SDDE optimiser at the digits scale", DIGITS_ARCHS, "digits", epochs=30, lr=0.05, batch_size=64,
        weight_decay=5e-4, momentum=0.9, nesterov=True, schedule=Schedule("cosine", per="step", eta_min=1e-6),
        augment="shift1", checkpoint="checkpoint.pth.tar", deterministic=True),
    # ELOC: SGD 0.1, momentum 0.9, wd 5e-4, 100 epochs, x0.1 at 50% and 75%; ELOC's CIFAR normalisation
    ("eloc", "cifar"): Recipe(
        "ELOC paper, CIFAR", CIFAR_ARCHS, "cifar-eloc", epochs=100, lr=0.1, batch_size=128, weight_decay=5e-4,
        momentum=0.9, nesterov=False, schedule=Schedule("step", at=(0.5, 0.75)), augment="crop32-flip",
        checkpoint="epoch150.pth"),
    ("eloc", "digits"): Recipe(
        "ELOC schedule at the digits scale", DIGITS_ARCHS, "digits", epochs=30, lr=0.05, batch_size=64,
        weight_decay=5e-4, momentum=0.9, nesterov=False, schedule=Schedule("step", at=(0.5, 0.75)),
        augment="shift1", checkpoint="checkpoint.pth.tar", deterministic=True),
}

#: dataset -> (folder in save/<Dataset>/..., recipe family)
DATASETS = {
    "digits": ("Digits", "digits"),
    "cifar10": ("CIFAR10", "cifar"),
    "cifar100": ("CIFAR100", "cifar"),
    "imagenet": ("ImageNet", "imagenet"),
}

#: benchmark -> outlier sets made for training with ``--diversity oe`` (never an evaluation OOD set)
TRAIN_OUTLIERS: dict[str, dict[str, Callable[[], DataSource]]] = {
    "digits": {"letters-lower": lambda: _digits_outliers()},
}


def _digits_outliers() -> DataSource:
    from oodens.data import digits

    return ArraySource("letters-lower", "train", digits.letters_lower)


# --------------------------------------------------------------------------- objectives


class Objective(nn.Module):
    """The members and the training loss on a batch: ``forward(x, y, x_out) -> (loss, [correct, seen])``.

    The whole objective is one module, so DistributedDataParallel can wrap it (gradients sync
    whichever member methods the loss calls)."""

    method = "independent"

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
    """N members trained jointly: mean_n CE(f_n(x), y) + lambda * L_div (:mod:`oodens.diversity`)."""

    method = "sdde"

    def __init__(self, members, diversity: Diversity, lam: float, outliers: str | None = None):
        super().__init__(members)
        self.diversity, self.lam, self.outliers = diversity, lam, outliers

    def forward(self, x, y, x_out=None):
        needs = self.diversity.needs
        if needs == "input":
            x = x.detach().requires_grad_(True)
        n_in = len(y)
        inputs = torch.cat([x, x_out]) if needs == "outliers" else x  # OE: one pass over ID + outliers
        logits, maps, out_logits = [], [], []
        for m in self.members:
            if needs == "maps":
                a, last = m.rankfeat_stages(inputs)
                z = m.logits_from_last_stage(last)
                maps.append(a)
            else:
                z = m(inputs)
            logits.append(z[:n_in])
            out_logits.append(z[n_in:])
        ce = torch.stack([F.cross_entropy(z, y) for z in logits]).mean()
        if needs == "maps":
            div = self.diversity.fn(maps, logits, y)
        elif needs == "input":
            div = self.diversity.fn(x, logits, y)
        elif needs == "outliers":
            div = self.diversity.fn(out_logits)
        else:
            div = self.diversity.fn(logits, y)
        return ce + self.lam * div, self._stats([(z, y) for z in logits])

    def member_sidecar(self, k):
        return {"ensemble": {"method": "sdde", "members": len(self.members), "member": k,
                             "diversity": self.diversity.name, "lambda": self.lam, "outliers": self.outliers}}


class LeaveOut(Objective):
    """ELOC: member k trained on its kept classes with the margin-entropy loss (:mod:`oodens.eloc`);
    the members' losses are summed, which leaves each member's gradient its own."""

    method = "eloc"

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


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a run wrote: one checkpoint per member (empty if it stopped early), their ID test
    accuracies, and the resumable state file."""

    paths: list[Path]
    accuracies: list[float]
    state: Path
    main: bool = True


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


def _load_state(path: Path, config: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OodensError(f"cannot read training state {path}: {str(e).strip()[:200]} (expected a file written by "
                          f"oodens train; start without --resume to train from scratch)") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise OodensError(f"{path} is not an oodens training state (format {STATE_FORMAT})")
    saved = state["config"]
    diff = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    if diff:
        k = diff[0]
        raise OodensError(f"--resume: {path} was trained with {k} = {saved.get(k)!r} but this run has "
                          f"{config.get(k)!r}: expected the same settings (or no --resume to start over)")
    return state


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


def _outlier_source(spec: str, bench, root: Path | None) -> DataSource:
    """``--outliers NAME|PATH``: a training outlier set of the benchmark, or an image folder / image list /
    .mat; never one of the benchmark's evaluation OOD sets."""
    from oodens.data import source_from_path
    from oodens.data.benchmarks import CIFAR_OOD, IMAGENET_OOD

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
    ood_table = {"cifar10": CIFAR_OOD, "cifar100": CIFAR_OOD, "imagenet": IMAGENET_OOD}.get(bench.name, {})
    for name, (rel, _) in ood_table.items():
        where = (root / rel).resolve() if root else None
        if where is not None and (path.resolve() == where or where in path.resolve().parents
                                  or path.resolve() in where.parents):
            raise OodensError(f"--outliers {path} overlaps the evaluation OOD set {name} ({where}): "
                              f"expected a distinct outlier set")
    return source_from_path("outliers", path)()


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

    # ---- what to train
    if leave_out is not None and (members is not None or diversity is not None):
        raise OodensError("--leave-out (ELOC) and --members/--diversity (SDDE) are different methods: "
                          "expected one of them")
    method = "eloc" if leave_out is not None else "sdde" if (members is not None or diversity is not None) \
        else "independent"
    key = dataset.lower()
    if key not in DATASETS:
        raise OodensError(f"cannot train on dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    folder_name, family = DATASETS[key]
    if (method, family) not in RECIPES:
        have = sorted({f for m, f in RECIPES if m == method})
        raise OodensError(f"no {method} recipe for {dataset}: expected a dataset of {', '.join(have)}")
    recipe = RECIPES[(method, family)]
    arch = canonical_arch(arch)
    if arch not in recipe.archs:
        raise OodensError(f"the {dataset} recipe trains {', '.join(recipe.archs)}, not {arch!r}")
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    batch_size = recipe.batch_size if batch_size is None else batch_size
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise OodensError(f"--epochs, --batch-size and --lr must be positive (got {epochs}, {batch_size}, {lr})")
    if workers < 0:
        raise OodensError(f"--workers {workers}: expected 0 or more")
    div = None
    if method == "sdde":
        members = 5 if members is None else members
        diversity = diversity or "gradcam"
        if diversity not in DIVERSITIES:
            raise OodensError(f"unknown diversity {diversity!r}: expected one of {', '.join(DIVERSITIES)}")
        if members < 2:
            raise OodensError(f"--members {members}: an SDDE ensemble needs at least 2 members")
        div = DIVERSITIES[diversity]
        lam = div.default_lambda if lam is None else lam
        if div.needs == "outliers" and not outliers:
            raise OodensError("--diversity oe needs --outliers NAME|PATH (a training outlier set; on digits: "
                              "letters-lower)")
        if div.needs != "outliers" and outliers:
            raise OodensError(f"--outliers is only used by --diversity oe, not {diversity}")
    elif lam is not None or outliers:
        raise OodensError("--lambda and --outliers belong to SDDE training (--members/--diversity)")
    root = resolve_root(data_root)
    bench = get_benchmark(key, root)
    num_classes = bench.num_classes
    split = None
    if method == "eloc":
        if not 2 <= leave_out <= num_classes:
            raise OodensError(f"--leave-out {leave_out}: expected 2 <= K <= {num_classes} (the classes of {dataset})")
        split = leave_out_split(num_classes, leave_out)
    n_members = {"independent": 1, "sdde": members, "eloc": leave_out}[method]
    set_name = arch_folder(arch) + {"independent": "", "sdde": f"-sdde-{diversity}", "eloc": f"-eloc-{leave_out}"}[method]
    set_dir = Path(out) / folder_name / set_name
    mode_dirs = [set_dir / (f"seed-{seed}" if method == "independent" else f"seed-{seed}-m{k}")
                 for k in range(n_members)]
    state_path = set_dir / f"seed-{seed}.last.pth"
    preset = get_preset(recipe.preset)
    augment = AUGMENTS[recipe.augment]
    train_source = bench.id_train
    outlier_source = _outlier_source(outliers, bench, root) if outliers else None
    config = {"method": method, "arch": arch, "dataset": key, "seed": seed, "members": n_members,
              "diversity": diversity, "lambda": lam, "outliers": outliers, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "recipe": recipe.source}

    with process_group(device) as (ctx, dev), _determinism(deterministic or recipe.deterministic):
        if batch_size < ctx.world_size:
            raise OodensError(f"--batch-size {batch_size} is the global batch: expected at least one sample per "
                              f"process ({ctx.world_size})")
        g = seed_everything(seed)
        nets = [create_model(arch, len(split[k][0]) if split else num_classes) for k in range(n_members)]
        if method == "independent":
            objective = CrossEntropy(nets)
        elif method == "sdde":
            objective = SDDE(nets, div, lam, outliers)
        else:
            objective = LeaveOut(nets, split, num_classes)
        objective.to(dev)
        generators = {"data": g}
        feed = make_feed(train_source, preset, augment, batch_size, ctx, workers)
        out_feed = None
        if outlier_source is not None:
            out_feed = make_feed(outlier_source, preset, augment, batch_size, ctx, workers)
            generators["outliers"] = torch.Generator().manual_seed(seed + 1)
        steps = feed.steps()
        opt = torch.optim.SGD(objective.parameters(), lr=lr, momentum=recipe.momentum,
                              weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
        sched = _scheduler(opt, recipe.schedule, epochs, steps)
        start = 0
        if resume:
            if state_path.is_file():
                state = _load_state(state_path, config)
                for m, sd in zip(objective.members, state["members"]):
                    m.load_state_dict(sd)
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                _set_rng_state(state["rng"], generators)
                start = int(state["epoch"])
            elif ctx.is_main:
                from oodens.progress import stderr

                stderr.print(f"--resume: no training state at {state_path}, starting from epoch 1")
        net = objective
        if ctx.enabled:
            net = nn.parallel.DistributedDataParallel(objective, device_ids=[dev.index] if dev.type == "cuda" else None)
        last = epochs if stop_after is None else min(epochs, stop_after)
        per_step = recipe.schedule.kind == "cosine" and recipe.schedule.per == "step"
        members_txt = f" x{n_members} ({method}{', ' + diversity if diversity else ''})" if n_members > 1 else ""
        with progress_bar(transient=False) as bar:
            bar.disable = bar.disable or not ctx.is_main
            task = bar.add_task(f"train {arch}{members_txt} seed {seed}", total=epochs * steps,
                                completed=start * steps, info="")
            for epoch in range(start, last):
                objective.train()
                totals = torch.zeros(4, dtype=torch.float64, device=dev)  # loss * n, n, correct, seen
                outs = out_feed.epoch(generators["outliers"], count=steps) if out_feed else None
                for x, y in feed.epoch(g):
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    x_out = next(outs)[0].to(dev, non_blocking=True) if outs is not None else None
                    loss, stats = net(x, y, x_out)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if per_step:
                        sched.step()
                    totals += torch.stack([loss.detach().double() * len(y), torch.tensor(float(len(y)), device=dev,
                                          dtype=torch.float64), stats[0].double(), stats[1].double()])
                    bar.advance(task)
                if not per_step:
                    sched.step()
                loss_sum, n, correct, seen = all_reduce_sum(totals.tolist(), ctx, dev)
                bar.update(task, info=f"epoch {epoch + 1}/{epochs} loss {loss_sum / max(n, 1.0):.3f} "
                                      f"acc {100 * correct / max(seen, 1.0):.1f}%")
                if ctx.is_main:
                    _save_state(state_path, config, epoch + 1, objective, opt, sched, generators)
        barrier(ctx)
        if last < epochs:
            return TrainResult([], [], state_path, ctx.is_main)
        accuracies, paths = [], [d / recipe.checkpoint for d in mode_dirs]
        if ctx.is_main:
            accuracies = _test_accuracies(objective, bench.id_test, preset, max(batch_size, 256), dev, workers)
            for k, (m, path) in enumerate(zip(objective.members, paths)):
                sidecar = {
                    "arch": arch,
                    "dataset": key,
                    "num_classes": num_classes,
                    "seed": seed,
                    "preset": recipe.preset,
                    "method": objective.method,
                    "test_accuracy": accuracies[k],
                    "train": {"recipe": recipe.source, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                              "weight_decay": recipe.weight_decay, "momentum": recipe.momentum,
                              "nesterov": recipe.nesterov, "schedule": recipe.schedule.describe(),
                              "augment": recipe.augment, "processes": ctx.world_size,
                              "deterministic": deterministic or recipe.deterministic},
                    **objective.member_sidecar(k),
                    "environment": environment(dev),
                    "oodens_version": __version__,
                }
                save_checkpoint(path, m.cpu(), sidecar, prefix="module." if recipe.module_prefix else "")
        barrier(ctx)
    return TrainResult(paths, accuracies, state_path, ctx.is_main)


def _save_state(path: Path, config: dict, epoch: int, objective: Objective, opt, sched, generators) -> None:
    state = {
        "format": STATE_FORMAT,
        "config": config,
        "epoch": epoch,
        "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in objective.members],
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": _rng_state(generators),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


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
    """Train one independent mode; returns its checkpoint (``out/<Dataset>/<Arch>/seed-<S>/...``)."""
    return train(seed, arch, dataset, epochs, out, lr, batch_size, device).paths[0]
