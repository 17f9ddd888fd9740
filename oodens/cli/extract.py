"""``oodens extract``: fill the view cache (:meth:`oodens.Experiment.extract`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oodens.cli.options import (ArchOpt, BatchOpt, BenchOpt, CacheOpt, ChannelsLastOpt, ClassesOpt, CompileOpt,
                                CorruptOpt, DeviceOpt, FitOpt, ImglistOpt, ImglistRootOpt, ModesOpt, OodOpt,
                                PrecisionOpt, PresetOpt, RootOpt, WorkersOpt, experiment, stderr,
                                warnings_to_stderr)


def extract_cmd(
    modes_dir: Optional[Path] = ModesOpt,
    benchmark: Optional[str] = BenchOpt,
    export: Optional[Path] = typer.Option(None, "--export", help="Also write DIR/<mode>/<dataset>/<split>/"
                                          "{logits,features,labels}.npy.", show_default=False),
    arch: Optional[str] = ArchOpt,
    num_classes: Optional[int] = ClassesOpt,
    preset: Optional[str] = PresetOpt,
    data_root: Optional[Path] = RootOpt,
    ood: Optional[str] = OodOpt,
    imglist: Optional[list[Path]] = ImglistOpt,
    imglist_root: Optional[Path] = ImglistRootOpt,
    corruptions: Optional[str] = CorruptOpt,
    fit_fraction: float = FitOpt,
    cache_dir: Optional[Path] = CacheOpt,
    batch_size: int = BatchOpt,
    workers: int = WorkersOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    channels_last: bool = ChannelsLastOpt,
    compile: bool = CompileOpt,
):
    """Fill the view cache: one forward pass per mode and dataset split (ID train, ID test, each OOD set).

    Under `torchrun --nproc_per_node N -m oodens extract ...` the ranks share each pass (whole batches) and
    rank 0 writes the views: the same views as one process.
    """
    from oodens.extract import export_views

    with warnings_to_stderr():
        exp = experiment(modes_dir, benchmark, arch, num_classes, preset, data_root, ood, imglist, imglist_root,
                         corruptions, fit_fraction, cache_dir, batch_size, workers, device, precision, channels_last,
                         compile)
    ex = exp.extract(distributed=True)
    if ex is None:  # not rank 0
        return
    stderr.print(f"{len(exp.modes)} modes x {len(exp.sources())} splits: {ex.computed} views extracted, "
                 f"{ex.cached} from cache ({exp.cache.root})")
    if export:
        export_views(ex, export)
        stderr.print(f"exported views to {export}")
