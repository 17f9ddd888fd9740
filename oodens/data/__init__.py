"""Data: dataset facts, preprocessing presets, dataset sources, corruptions and benchmarks (ID train/test + OOD
sets)."""

from oodens.data.benchmarks import BENCHMARKS, Benchmark, data_root, get_benchmark, source_from_path
from oodens.data.datasets import DATASETS, Dataset, find_dataset
from oodens.data.presets import PRESETS, Preset, get_preset
from oodens.data.sources import DataSource

__all__ = ["BENCHMARKS", "Benchmark", "DATASETS", "DataSource", "Dataset", "data_root", "find_dataset",
           "get_benchmark", "source_from_path", "PRESETS", "Preset", "get_preset"]
