"""Training modes (:mod:`oodens.train.loop`): independent seeds, SDDE ensembles (diversity terms in
:mod:`oodens.train.diversity`) and ELOC leave-out ensembles (:mod:`oodens.train.eloc`), fed by
:mod:`oodens.train.feeds`."""

from oodens.train.loop import (RECIPES, Plan, Recipe, Schedule, TrainResult, environment, resolve, seed_everything,
                               train)

__all__ = ["Plan", "RECIPES", "Recipe", "Schedule", "TrainResult", "environment", "resolve", "seed_everything",
           "train"]
