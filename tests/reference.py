"""Reference implementations for tests, independent of oodens: brute force, explicit loops."""

import numpy as np


def normalise64(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def ref_knn(train_feats, query_feats, k):
    bank = normalise64(train_feats)
    q = normalise64(query_feats)
    d = np.sqrt(((q[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2))
    return -np.sort(d, axis=1)[:, k - 1]


def ref_mahalanobis(train_feats, train_labels, query_feats):
    h = np.asarray(train_feats, dtype=np.float64)
    y = np.asarray(train_labels)
    classes = sorted(set(y.tolist()))
    means = {c: h[y == c].mean(axis=0) for c in classes}
    D = h.shape[1]
    cov = np.zeros((D, D))
    for i in range(len(h)):
        r = h[i] - means[y[i]]
        cov += np.outer(r, r)
    cov /= len(h)
    P = np.linalg.pinv(cov)
    q = np.asarray(query_feats, dtype=np.float64)
    out = np.empty(len(q))
    for i in range(len(q)):
        out[i] = -min(float((q[i] - means[c]) @ P @ (q[i] - means[c])) for c in classes)
    return out
