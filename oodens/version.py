"""The package version, in a module of its own: modules record it (view and checkpoint metadata)
without importing the ``oodens`` package, whose ``__init__`` imports the whole public API."""

__version__ = "0.1.0"
