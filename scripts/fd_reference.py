"""Make testdata/eval/fd_reference.json: two fixed random feature sets and their Fréchet distance
computed the way pytorch-fid does it (scipy.linalg.sqrtm of the covariance product), so the Rust
FD can be checked against an independent implementation.

    python3 -m venv venv && venv/bin/pip install numpy scipy
    venv/bin/python scripts/fd_reference.py > testdata/eval/fd_reference.json
"""
import json

import numpy as np
from scipy import linalg

rng = np.random.default_rng(20261126)
n, d = 300, 12
# Correlated, non-isotropic features; b differs in mean, scale and correlation.
mix_a = rng.normal(size=(d, d))
mix_b = mix_a + 0.3 * rng.normal(size=(d, d))
a = (rng.normal(size=(n, d)) @ mix_a).astype(np.float32)
b = (rng.normal(size=(n, d)) @ mix_b + 0.5).astype(np.float32)


def fd(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


print(json.dumps({
    "dim": d,
    "a": a.ravel().tolist(),
    "b": b.ravel().tolist(),
    "fd_ab": fd(a, b),
    "fd_aa": fd(a, a),
    "scipy": __import__("scipy").__version__,
}))
