"""The embedded digits benchmark: real sklearn data, fixed split, deterministic far-OOD sets."""

import numpy as np
from sklearn.datasets import load_digits

from oodens.data import get_benchmark
from oodens.data import digits as D


def test_id_split_is_stratified_disjoint_and_covers_classes_0_to_5():
    b = get_benchmark("digits")
    (xtr, ytr), (xte, yte) = b.id_train.arrays, b.id_test.arrays
    raw = load_digits()
    n_id = int(np.isin(raw.target, range(6)).sum())
    assert len(ytr) + len(yte) == n_id
    assert set(np.unique(ytr)) == set(range(6)) == set(np.unique(yte))
    # stratified: every class is ~30% test
    for c in range(6):
        frac = (yte == c).sum() / ((yte == c).sum() + (ytr == c).sum())
        assert abs(frac - 0.3) < 0.02
    # disjoint: no test image equals a train image at the same index set (rows are distinct samples)
    flat_tr = {row.tobytes() for row in xtr.reshape(len(xtr), -1)}
    dup = sum(row.tobytes() in flat_tr for row in xte.reshape(len(xte), -1))
    assert dup <= 2  # the raw data itself has a couple of exact duplicates
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == np.float32
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    # together the two splits hold exactly the ID pixels of sklearn's digits
    np.testing.assert_allclose(xtr.sum(dtype=np.float64) + xte.sum(dtype=np.float64),
                               raw.images[np.isin(raw.target, range(6))].sum() / 16, rtol=1e-9)


def test_near_ood_is_digits_6_to_9():
    x, y = get_benchmark("digits").ood["digits-6789"].arrays
    raw = load_digits()
    keep = raw.target >= 6
    assert len(x) == keep.sum()
    np.testing.assert_array_equal(x[:, 0], (raw.images[keep] / 16).astype(np.float32))
    assert (y == -1).all()


def test_far_ood_sets_are_deterministic_and_image_like():
    b1, b2 = get_benchmark("digits"), get_benchmark("digits")
    assert list(b1.ood) == ["digits-6789", "letters", "noise"]
    for name in ("letters", "noise"):
        assert b1.ood[name].fingerprint == b2.ood[name].fingerprint
        x, y = b1.ood[name].arrays
        assert x.shape == (D.N_FAR, 1, 8, 8) and (y == -1).all()
        # quantised to the digits' 17 grey levels
        np.testing.assert_allclose(x * 16, np.round(x * 16), atol=1e-5)
    letters = b1.ood["letters"].arrays[0]
    assert (letters.reshape(len(letters), -1).max(axis=1) == 1.0).all()  # every letter drawn
    assert len({row.tobytes() for row in letters.reshape(len(letters), -1)}) > 0.9 * len(letters)  # jittered
