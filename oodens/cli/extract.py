"""``oodens extract``: fill the view cache (:meth:`oodens.Experiment.extract`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oodens.cli.options import expect_folder, experiment, stderr, warnings_to_stderr, with_experiment_options


def extract_cmd(
    export: Optional[Path] = typer.Option(None, "--export", help="Also write DIR/<mode>/<dataset>/<split>/"
                                          "{logits,features,labels}.npy.", show_default=False),
    **options,
):
    """Fill the view cache: one forward pass per mode and dataset split (ID train, ID test, each OOD set).

    Under `torchrun --nproc_per_node N -m oodens extract ...` the ranks share each pass (whole batches) and
    rank 0 writes the views: the same views as one process.
    """
    from oodens.runtime.paths import default_cache_dir
    from oodens.views.extract import export_views

    expect_folder("--cache-dir", options["cache_dir"] or default_cache_dir())  # before any work
    expect_folder("--export", export)
    with warnings_to_stderr():
        exp = experiment(options)
    ex = exp.extract(distributed=True)
    if ex is None:  # not rank 0
        return
    stderr.print(f"{len(exp.modes)} modes x {len(exp.sources())} splits: {ex.computed} views extracted, "
                 f"{ex.cached} from cache ({exp.cache.root})")
    if export:
        export_views(ex, export)
        stderr.print(f"exported views to {export}")


extract_cmd = with_experiment_options(extract_cmd)
