"""Where oodens keeps things on disk: view cache, results store, shipped modes."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "oodens"


def default_cache_dir() -> Path:
    """View cache: ``$XDG_CACHE_HOME/oodens`` (platformdirs elsewhere)."""
    return Path(platformdirs.user_cache_dir(APP))


def default_results_dir() -> Path:
    """Results store: ``$OODENS_RESULTS``, else ``$XDG_DATA_HOME/oodens/results``."""
    env = os.environ.get("OODENS_RESULTS")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir(APP)) / "results"


def config_file() -> Path:
    """``$XDG_CONFIG_HOME/oodens/config.toml`` (keys: ``data_root``)."""
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def config() -> dict:
    """The config file's settings, or {} when there is none."""
    path = config_file()
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from oodens.errors import OodensError

    try:
        return tomllib.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OodensError(f"cannot read config file {path}: {e} (expected TOML like data_root = \"/data\")") from e


def safe_name(name: str) -> str:
    """A dataset name usable as one path component (``digits-C/jpeg-3`` -> ``digits-C_jpeg-3``)."""
    return name.replace("/", "_").replace("\\", "_")


def shipped_modes_dir() -> Path:
    """The five digits CNN modes that ship with oodens.

    Installed wheels carry them inside the package (``oodens/_checkpoints``); a
    source checkout or editable install finds them at the repository top level.
    """
    here = Path(__file__).resolve().parents[1]  # the oodens package (this file is oodens/runtime/paths.py)
    for root in (here / "_checkpoints", here.parent / "checkpoints"):
        candidate = root / "Digits" / "CNN"
        if candidate.is_dir():
            return candidate
    return here.parent / "checkpoints" / "Digits" / "CNN"


def mode_set_name(path: str | Path, cwd: str | Path | None = None) -> str:
    """How captions, headers and figure names call a mode set: ``shipped`` for the shipped digits modes,
    else its folder relative to the working directory (``save/ImageNet/DN121``) when it lies below it,
    else ``~/...`` below the home folder, else the absolute path. Never depends on where oodens is installed."""
    p = Path(path).expanduser().resolve()
    if p == shipped_modes_dir().resolve():
        return "shipped"
    for base, prefix in ((Path(cwd) if cwd is not None else Path.cwd(), ""), (Path.home(), "~/")):
        try:
            rel = p.relative_to(base.resolve())
        except ValueError:
            continue
        return prefix + (rel.as_posix() if rel.parts else ".")
    return p.as_posix()
