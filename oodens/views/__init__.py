"""Views: what a detector reads (:mod:`oodens.views.types`), the on-disk view cache
(:mod:`oodens.views.cache`), the view kinds extraction computes (:mod:`oodens.views.kinds`) and
extraction itself, the only place a network runs (:mod:`oodens.views.extract`).

Only the types and the cache are re-exported here: ``kinds`` and ``extract`` need torch models and
modes, and are imported by their full path."""

from oodens.views.cache import FORMAT_VERSION, ViewCache, ViewWriter, view_key
from oodens.views.types import BASE, HEAD, Views, ViewSpec

__all__ = ["BASE", "FORMAT_VERSION", "HEAD", "ViewCache", "ViewSpec", "ViewWriter", "Views", "view_key"]
