"""Hyperparameter defaults that depend on the benchmark (DESIGN.md section 5: ODIN eps = 0 and DICE p = 70 on
ImageNet, knn k = 1000 on the full ImageNet bank scaled with its fraction, the class defaults elsewhere)."""

from __future__ import annotations

import pytest

import oodens
from oodens.api import detector_list, make_detector
from oodens.detectors import DICE, KNN, ODIN


@pytest.mark.parametrize("bench", ["imagenet", "openood-imagenet"])
def test_imagenet_paper_defaults(bench):
    assert make_detector("odin", bench).eps == 0.0
    assert make_detector("odin", bench).temperature == ODIN().temperature
    assert make_detector("dice", bench).p == 70.0
    assert make_detector(KNN, bench).k == 1000
    assert make_detector("knn", bench, fit_fraction=0.01).k == 10  # the KNN paper's 1 % bank: k = 10
    assert make_detector("knn", bench, fit_fraction=0.0001).k == 1


def test_other_benchmarks_keep_the_class_defaults():
    for bench in ("digits", "cifar10", "cifar100", None):
        assert make_detector("odin", bench).eps == ODIN().eps == 0.0014
        assert make_detector("dice", bench).p == DICE().p == 90.0
        assert make_detector("knn", bench).k == KNN().k == 50
    # ImageNet-200 (OpenOOD): ImageNet's images and networks, a sixth of its bank
    assert make_detector("odin", "openood-imagenet200").eps == 0.0
    assert make_detector("knn", "openood-imagenet200").k == 50


def test_an_instance_keeps_its_hyperparameters():
    assert make_detector(KNN(k=7), "imagenet").k == 7
    assert [d.k for d in detector_list([KNN(k=7), "knn"], "imagenet", 0.5)] == [7, 500]


def test_experiment_detectors_use_its_benchmark(tmp_path):
    exp = oodens.Experiment(cache_dir=tmp_path)  # digits
    assert [d.settings() for d in exp.detectors("odin,knn")] == [ODIN().settings(), KNN().settings()]
