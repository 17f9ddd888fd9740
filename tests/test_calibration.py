"""Calibration metrics against direct computations."""

import numpy as np
import torch
from scipy.special import softmax

from oodens.metrics import calibration as cal


def _data(seed=0, n=400, c=5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 3
    y = np.where(rng.random(n) < 0.7, z.argmax(1), rng.integers(0, c, n))
    return z, y


def test_nll_and_brier_match_torch_and_a_loop():
    z, y = _data()
    p = softmax(z, axis=1)
    ref = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y)).item()
    assert abs(cal.nll(p, y) - ref) < 1e-10
    loop = np.mean([sum((p[i, c] - (c == y[i])) ** 2 for c in range(p.shape[1])) for i in range(len(y))])
    assert abs(cal.brier(p, y) - loop) < 1e-12


def test_ece_by_a_loop_over_equal_width_bins():
    z, y = _data(1)
    p = softmax(z, axis=1)
    total, n = 0.0, len(y)
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        members = [i for i in range(n) if lo < p[i].max() <= hi]
        if members:
            acc = np.mean([p[i].argmax() == y[i] for i in members])
            conf = np.mean([p[i].max() for i in members])
            total += len(members) / n * abs(acc - conf)
    assert abs(cal.ece(p, y) - total) < 1e-12
    # a perfectly calibrated toy: confidence 0.8 and 80 % right
    p2 = np.tile([0.8, 0.2], (10, 1))
    y2 = np.array([0] * 8 + [1] * 2)
    assert abs(cal.ece(p2, y2)) < 1e-12
    rel = cal.reliability(p2, y2)
    assert rel[11] == (0.8, 0.8, 10) and sum(r[2] for r in rel) == 10


def test_temperature_scaling_minimises_nll_on_a_grid():
    z, y = _data(2)
    t = cal.fit_temperature(z, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    losses = [cal.nll(softmax(z / g, axis=1), y) for g in grid]
    assert abs(t - grid[int(np.argmin(losses))]) / t < 5e-3
    assert cal.nll(cal.probs(z, t), y) <= cal.nll(cal.probs(z), y) + 1e-12
