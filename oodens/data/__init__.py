"""Data: preprocessing presets, dataset sources and benchmarks (ID train/test + OOD sets)."""

from oodens.data.benchmarks import BENCHMARKS, Benchmark, DataSource, get_benchmark
from oodens.data.presets import PRESETS, Preset, get_preset

__all__ = ["BENCHMARKS", "Benchmark", "DataSource", "get_benchmark", "PRESETS", "Preset", "get_preset"]
