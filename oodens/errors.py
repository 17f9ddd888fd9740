"""The one exception type for bad input (and its refinements).

Anything the user can fix (a missing folder, an unknown detector, a truncated
checkpoint...) raises :class:`OodensError` with a one-line message naming the
culprit and what was expected. The CLI prints it and exits with code 2; any
other exception is a bug and keeps its traceback.

Two refinements for library use: :class:`ParameterError` (a hyperparameter out of range,
naming the parameter and its owner, which the CLI turns into the ``--<owner>-<param>`` flag)
and :class:`NotFittedError` (a detector asked to score before ``fit``).
"""


class OodensError(Exception):
    """A user-facing error: one line, names the culprit and what was expected."""


def format_value(value) -> str:
    """A parameter value as a user would type it: ``100`` for 100.0, ``0.0014``, ``None``."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar -> python
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class ParameterError(OodensError, ValueError):
    """A hyperparameter out of range, e.g. ``k=500 exceeds the 300 training samples: expected 1..300``.

    Names the parameter, not a command-line flag: ``owner`` is the registry name of what the
    parameter belongs to (a detector, e.g. ``"knn"``), ``param`` the parameter (``"k"``),
    ``value`` its value and ``problem`` the rest of the message. The message reads
    ``f"{param}={value} {problem}"``; the CLI shows ``f"--{owner}-{param} {value} {problem}"``.
    """

    def __init__(self, owner: str, param: str, value, problem: str):
        self.owner, self.param, self.value, self.problem = owner, param, value, problem
        super().__init__(f"{param}={format_value(value)} {problem}")

    def __reduce__(self):  # picklable although the constructor takes more than the message
        return type(self), (self.owner, self.param, self.value, self.problem)


class NotFittedError(OodensError, ValueError):
    """A detector that learns from the ID training views was asked to score before ``fit``
    (scikit-learn's ``NotFittedError``, also a ``ValueError``)."""


class OodensWarning(UserWarning):
    """Something skipped or repaired that the user may want to know about (an OOD set not on disk, a
    detector that does not apply to these modes, a damaged cached view being recomputed). The CLI prints
    each as one ``warning:`` line."""
