"""Runtime helpers beside the data flow: the device, the process group under ``torchrun``, the
terminal (consoles and progress bars) and where things live on disk. They import nothing of the flow."""

from oodens.runtime.device import resolve_device
from oodens.runtime.distributed import DistContext, all_reduce_sum, barrier, process_group
from oodens.runtime.paths import (config, config_file, default_cache_dir, default_results_dir, safe_name,
                                  shipped_modes_dir)
from oodens.runtime.progress import progress_bar, stderr, stdout

__all__ = ["DistContext", "all_reduce_sum", "barrier", "config", "config_file", "default_cache_dir",
           "default_results_dir", "process_group", "progress_bar", "resolve_device", "safe_name",
           "shipped_modes_dir", "stderr", "stdout"]
