"""Metrics: the metric registry and the OOD metrics (:mod:`oodens.metrics.ood`), ID quality and
calibration (:mod:`oodens.metrics.calibration`) and the statistics over modes (:mod:`oodens.metrics.stats`)."""

from oodens.metrics.ood import (KINDS, METRICS, OOD_METRICS, POSITIVES, QUALITY_METRICS, Metric, accuracy,
                                detection_error, fpr_at_95_tpr, ood_metrics)

__all__ = ["KINDS", "METRICS", "OOD_METRICS", "POSITIVES", "QUALITY_METRICS", "Metric", "accuracy",
           "detection_error", "fpr_at_95_tpr", "ood_metrics"]
