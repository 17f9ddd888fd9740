"""oodens: post-hoc ensemble out-of-distribution evaluation of image classifiers.

Data flow (one direction): checkpoints -> modes -> extraction -> views (cached)
-> detectors -> strategies -> metrics -> results -> report.
"""

__version__ = "0.1.0"
