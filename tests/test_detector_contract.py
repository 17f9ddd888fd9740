"""The detector contract, checked on every class in the registry (scikit-learn's estimator checks,
in small): a new detector registered with ``@register_detector`` is checked here without touching
this file.

- the constructor takes hyperparameters only; learned state (trailing-underscore attributes) exists
  only once ``fit`` has run, and ``validate()`` names a bad hyperparameter (``ParameterError``);
- a detector that needs ``fit`` raises ``NotFittedError`` when asked to score before it;
- a detector fitted on features (or logits) rejects features (logits) of another width;
- ``score`` gives one finite float per sample, and on a separable toy case (ID features clustered
  per class under a confident head, OOD features far away where the head barely looks) the ID
  scores are higher than the OOD scores (higher = more in-distribution).

The toy views are built with numpy only, logits = features @ W.T + b. Parametrised views (ODIN,
RankFeat) get those logits under their view id, the multi-layer views (layers, gram) arrays built from
the features (:data:`LAYER_VIEWS`); ensemble-only detectors get a list of members
(leave-out members, ``Views.classes`` set, for detectors that apply only to those: eloc).
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

import oodens.detectors
from oodens.detectors import DETECTORS, KNN, NotFittedError, ParameterError, check_is_fitted
from oodens.errors import OodensError
from oodens.views.types import Views

CLASSES = list(DETECTORS.values())
IDS = list(DETECTORS)
FITTING = [c for c in CLASSES if c.needs_fit]
PER_MEMBER = [c for c in CLASSES if not c.ensemble_only]
ENSEMBLE_ONLY = [c for c in CLASSES if c.ensemble_only]


# --------------------------------------------------------------------------- the toy problem


@dataclasses.dataclass
class Toy:
    """C classes, each owning a block of B feature dimensions in the first half of D = 2 C B; the
    second half is where OOD features live and the head (nearly) does not look."""

    C: int = 4
    B: int = 3
    seed: int = 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.D_id = self.C * self.B
        self.D = 2 * self.D_id

    def head(self, spread: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """A confident head: class c weighs its block by 2. ``spread`` > 0 gives the OOD half weights
        of that size (members with different such weights disagree on OOD inputs)."""
        w = self.rng.normal(0.0, 0.05, (self.C, self.D))
        for c in range(self.C):
            w[c, c * self.B : (c + 1) * self.B] += 2.0
        w[:, self.D_id :] = self.rng.normal(0.0, spread or 0.01, (self.C, self.D - self.D_id))
        return w, self.rng.normal(0.0, 0.1, self.C)

    def features(self, n: int, ood: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Non-negative (post-ReLU-like) features and labels (-1 for OOD)."""
        if ood:  # far away: active where ID features never are, quiet on the class blocks
            h = np.abs(self.rng.normal(0.0, 0.1, (n, self.D)))
            h[:, self.D_id :] += 2.0 + np.abs(self.rng.normal(0.0, 0.3, (n, self.D - self.D_id)))
            return h, np.full(n, -1)
        y = np.arange(n) % self.C
        h = np.abs(self.rng.normal(0.3, 0.3, (n, self.D)))
        h[:, self.D_id :] = np.abs(self.rng.normal(0.0, 0.02, (n, self.D - self.D_id)))
        for c in range(self.C):
            h[y == c, c * self.B : (c + 1) * self.B] += 4.0
        return h, y


#: toy multi-layer views from the features h: two "layers" (the class blocks, and all of h), pooled
#: (``layers``) or as (n, P, C_l) Gram-like features, the same for every order (``gram``)
LAYER_VIEWS = {
    "layers": lambda h, **_: {"layer00": h[:, : h.shape[1] // 2], "layer01": h},
    "gram": lambda h, orders: {"layer00": np.repeat(h[:, None, : h.shape[1] // 2], orders, axis=1),
                               "layer01": np.repeat(h[:, None, :], orders, axis=1)},
}


def make_views(det, h, y, w, b, kept=None) -> Views:
    """Consistent views: logits = h W^T + b (on the kept classes of a leave-out member), and those
    logits standing in for every parametrised view the detector reads (ODIN, RankFeat)."""
    cols = np.arange(len(b)) if kept is None else np.asarray(kept)
    z = h @ w[cols].T + b[cols]
    v = Views(logits=z, features=h.astype(np.float32), labels=y, weight=w[cols], bias=b[cols],
              classes=None if kept is None else cols)
    for spec in det.view_specs():
        v.extra[spec.id] = LAYER_VIEWS[spec.kind](h, **dict(spec.params)) if spec.kind in LAYER_VIEWS else z
    return v


def member_views(det, toy: Toy, n_id=120, n_ood=120, n_train=300):
    """One member's (train, ID test, OOD) views."""
    w, b = toy.head()
    train, test, ood = toy.features(n_train), toy.features(n_id), toy.features(n_ood, ood=True)
    return tuple(make_views(det, h, y, w, b) for h, y in (train, test, ood))


def leave_out(cls) -> bool:
    """Whether an ensemble-only detector applies only to leave-out members (eloc)."""
    plain = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    if cls.applies_to(plain) is None:
        return False
    kept = [{"name": n, "kept_classes": [0, 1]} for n in "abc"]
    assert cls.applies_to(kept) is None, f"{cls.name} applies neither to plain nor to leave-out members"
    return True


def ensemble_views(det, toy: Toy, n_members=3, n_id=120, n_ood=120):
    """The members' (ID test, OOD) views: heads that agree on ID inputs and disagree on OOD ones.
    Leave-out members (when the detector needs them) each drop one class in three."""
    lo = leave_out(type(det))
    members = []
    for k in range(n_members):
        w, b = toy.head(spread=0.6)
        kept = [c for c in range(toy.C) if c % n_members != k] if lo else None
        members.append((w, b, kept))
    (hi, yi), (ho, yo) = toy.features(n_id), toy.features(n_ood, ood=True)
    return ([make_views(det, hi, yi, w, b, kept) for w, b, kept in members],
            [make_views(det, ho, yo, w, b, kept) for w, b, kept in members])


def fitted(det, train):
    return det.fit(train) if det.needs_fit else det


def learned(det) -> list[str]:
    """The trailing-underscore attributes (learned state), as scikit-learn names them."""
    return [k for k in vars(det) if k.endswith("_") and not k.startswith("__")]


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_constructor_takes_hyperparameters_only(cls):
    det = cls()  # every hyperparameter has a default
    names = [f.name for f in cls.params()]
    assert set(vars(det)) == set(names), "the constructor sets attributes other than its hyperparameters"
    assert not learned(det), "learned state exists before fit"
    for f in cls.params():
        assert not f.name.endswith("_") and not f.name.startswith("_"), f.name
        assert f.metadata.get("help"), f"hyperparameter {f.name} has no help text (it becomes a CLI flag)"
    assert det.settings() == {n: getattr(det, n) for n in names}
    assert cls(**det.settings()) == det
    assert repr(det).startswith(f"{cls.__name__}(")
    assert det.validate() is det  # the defaults are valid


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_exported_by_name(cls):
    assert getattr(oodens.detectors, cls.__name__) is cls
    assert cls.__name__ in oodens.detectors.__all__


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_validate_names_a_bad_hyperparameter(cls):
    """Every numeric hyperparameter is checked without data: NaN is rejected by ``validate()`` with a
    ParameterError naming the detector (its registry name) and the parameter."""
    for f in cls.params():
        if isinstance(f.default, bool) or not isinstance(f.default, (int, float)):
            continue
        det = cls(**{f.name: float("nan")})
        with pytest.raises(ParameterError) as info:
            det.validate()
        e = info.value
        assert (e.owner, e.param) == (cls.name, f.name)
        assert str(e).startswith(f"{f.name}=nan ")
        assert isinstance(e, OodensError) and isinstance(e, ValueError)


# --------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("cls", FITTING, ids=[c.name for c in FITTING])
def test_scoring_before_fit_raises_not_fitted(cls):
    det = cls()
    _, test, _ = member_views(det, Toy())
    with pytest.raises(NotFittedError, match=rf"^{cls.__name__} is not fitted: call fit\(train_views\) first$"):
        det.score(test)
    with pytest.raises(NotFittedError):
        check_is_fitted(det)
    assert issubclass(NotFittedError, OodensError) and issubclass(NotFittedError, ValueError)


@pytest.mark.parametrize("cls", FITTING, ids=[c.name for c in FITTING])
def test_fit_learns_trailing_underscore_state(cls):
    det = cls()
    train, _, _ = member_views(det, Toy())
    assert det.fit(train) is det
    assert learned(det)
    check_is_fitted(det)
    assert set(vars(det)) - set(learned(det)) == {f.name for f in cls.params()}  # no other attributes
    if "features" in cls.needs:
        assert det.n_features_in_ == Toy().D
    if "logits" in cls.needs:
        assert det.n_logits_in_ == Toy().C


@pytest.mark.parametrize("cls", [c for c in PER_MEMBER if not c.needs_fit],
                         ids=[c.name for c in PER_MEMBER if not c.needs_fit])
def test_detectors_without_fit_score_without_fit(cls):
    det = cls()
    train, test, _ = member_views(det, Toy())
    assert len(det.score(test)) == len(test)
    check_is_fitted(det)  # nothing to fit: always "fitted"
    assert det.fit(train) is det and not learned(det)
    assert det.fit() is det  # no views needed


@pytest.mark.parametrize("cls", FITTING, ids=[c.name for c in FITTING])
def test_width_mismatch_names_both_widths(cls):
    det = cls()
    toy = Toy()
    train, _, _ = member_views(det, toy)
    det.fit(train)
    if hasattr(det, "n_features_in_"):
        narrow = Toy(C=4, B=2, seed=1)  # 16-d features instead of 24
        _, test, _ = member_views(det, narrow)
        with pytest.raises(OodensError, match=rf"^{cls.name} was fitted on {toy.D}-d features but got "
                                              rf"{narrow.D}-d features$"):
            det.score(test)
    if hasattr(det, "n_logits_in_"):
        other = Toy(C=6, B=2, seed=2)  # the same 24-d features, 6 classes instead of 4
        assert other.D == toy.D
        _, test, _ = member_views(det, other)
        with pytest.raises(OodensError, match=rf"^{cls.name} was fitted on {toy.C}-d logits but got "
                                              rf"{other.C}-d logits$"):
            det.score(test)


# --------------------------------------------------------------------------- scores


def _scores(cls):
    """(ID scores, OOD scores, number of ID samples) on the toy problem, default hyperparameters."""
    det = cls()
    toy = Toy()
    if cls.ensemble_only:
        ids, oods = ensemble_views(det, toy)
        return det.score_ensemble(ids), det.score_ensemble(oods), len(ids[0])
    train, test, ood = member_views(det, toy)
    det = fitted(det, train)
    return det.score(test), det.score(ood), len(test)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_one_finite_float_per_sample(cls):
    s_id, s_ood, n = _scores(cls)
    for s in (s_id, s_ood):
        assert isinstance(s, np.ndarray) and s.shape == (n,)
        assert np.issubdtype(s.dtype, np.floating)
        assert np.isfinite(s).all()


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_higher_score_is_more_in_distribution(cls):
    s_id, s_ood, _ = _scores(cls)
    assert s_id.mean() > s_ood.mean(), f"{cls.name}: ID mean {s_id.mean():.6g} <= OOD mean {s_ood.mean():.6g}"


@pytest.mark.parametrize("cls", ENSEMBLE_ONLY, ids=[c.name for c in ENSEMBLE_ONLY])
def test_ensemble_only_detectors_point_to_score_ensemble(cls):
    det = cls()
    ids, _ = ensemble_views(det, Toy())
    with pytest.raises(OodensError, match="score_ensemble"):
        det.score(ids[0])
    with pytest.raises(OodensError):
        det.score_ensemble([])


# --------------------------------------------------------------------------- parameter errors


def test_knn_k_errors_name_the_parameter():
    with pytest.raises(ParameterError, match=r"^k=0 is out of range: expected an integer >= 1$") as info:
        KNN(k=0).validate()
    assert (info.value.owner, info.value.param, info.value.value) == ("knn", "k", 0)
    train, test, _ = member_views(KNN(), Toy())
    with pytest.raises(ParameterError, match=r"^k=500 exceeds the 300 training samples: expected 1\.\.300$") as info:
        KNN(k=500).fit(train)
    e = info.value
    assert (e.owner, e.param, e.value) == ("knn", "k", 500)
    assert "--" not in str(e)  # a library error names the parameter, not a flag
    again = pickle.loads(pickle.dumps(e))
    assert (type(again), str(again), again.owner, again.param, again.value) == (ParameterError, str(e), "knn", "k",
                                                                                500)
    # k is read at query time: raising it past the bank after fit is caught when scoring
    det = KNN(k=5).fit(train)
    det.k = 301
    with pytest.raises(ParameterError, match="exceeds the 300 training samples"):
        det.score(test)


@pytest.mark.parametrize("name, params, message", [
    ("dice", {"p": 100}, r"^p=100 is out of range: expected a percentile in \[0, 100\)$"),
    ("react", {"p": -1.0}, r"^p=-1 is out of range: expected a percentile in \[0, 100\)$"),
    ("energy", {"temperature": 0.0}, r"^temperature=0 is out of range: expected a finite number > 0$"),
    ("odin", {"eps": -0.1}, r"^eps=-0.1 is out of range: expected a finite number >= 0$"),
    ("rankfeat", {"power_iters": 2.5}, r"^power_iters=2.5 is out of range: expected an integer >= 0$"),
    ("vim", {"dim": 0}, r"^dim=0 is out of range: expected an integer >= 1$"),
])
def test_parameter_errors(name, params, message):
    with pytest.raises(ParameterError, match=message) as info:
        DETECTORS[name](**params).validate()
    assert info.value.owner == name and info.value.param == next(iter(params))


def test_data_dependent_parameter_errors():
    toy = Toy()
    det = DETECTORS["vim"](dim=toy.D)
    train, test, _ = member_views(det, toy)
    with pytest.raises(ParameterError, match=rf"^dim={toy.D} is out of range for {toy.D}-d features: expected "
                                             rf"1\.\.{toy.D - 1}$"):
        det.fit(train)
    with pytest.raises(ParameterError, match=r"^p=99 prunes every feature") as info:
        DETECTORS["ash"](p=99.0).score(test)
    assert (info.value.owner, info.value.param) == ("ash", "p")


def test_missing_views_are_named():
    with pytest.raises(OodensError, match=r"knn reads views\.features, but these views have none"):
        KNN().fit(Views(logits=np.zeros((3, 2))))
    odin = DETECTORS["odin"]()
    with pytest.raises(OodensError, match=r"odin reads the odin\[.*\] logits view"):
        odin.score(Views(logits=np.zeros((3, 2))))


def test_cli_translates_parameter_errors_into_flags(monkeypatch, capsys):
    """The library says ``k=500 ...``; ``oodens`` says ``--knn-k 500 ...`` (exit code 2)."""
    import oodens.cli as cli

    def fail(**_):
        raise ParameterError("knn", "k", 500, "exceeds the 300 training samples: expected 1..300")

    monkeypatch.setattr(cli, "app", fail)
    with pytest.raises(SystemExit) as info:
        cli.main(["eval"])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "oodens: error: --knn-k 500 exceeds the 300 training samples: expected 1..300" in err

    def fail_other(**_):  # a parameter that is not a detector's flag keeps the library message
        raise ParameterError("elsewhere", "x", 1, "is wrong")

    monkeypatch.setattr(cli, "app", fail_other)
    with pytest.raises(SystemExit):
        cli.main(["eval"])
    assert "oodens: error: x=1 is wrong" in " ".join(capsys.readouterr().err.split())
