"""Modes: checkpoint files read as data (:mod:`oodens.modes.checkpoints`) and the modes of a mode-set
folder discovered from them (:mod:`oodens.modes.discovery`)."""

from oodens.modes.checkpoints import (CHECKPOINT_SUFFIXES, PREFERRED_NAMES, SIDECAR, atomic_write_bytes,
                                      load_weights, read_state_dict, save_checkpoint, sha256_file)
from oodens.modes.discovery import Mode, ModeFlags, check_consistent, discover_modes, mode_dir

__all__ = ["CHECKPOINT_SUFFIXES", "Mode", "ModeFlags", "PREFERRED_NAMES", "SIDECAR", "atomic_write_bytes",
           "check_consistent", "discover_modes", "load_weights", "mode_dir", "read_state_dict", "save_checkpoint",
           "sha256_file"]
