#!/usr/bin/env python3
"""The two-stage k-means of ddm (datasets/src/kmeans.rs::two_stage) written with scikit-learn, for a
like-for-like timing: FINE centroids by KMeans on a SUBSAMPLE-point random subsample, every point to
its nearest fine centroid, then K coarse centroids by KMeans over the fine centroids weighted by
their populations. Same settings as ../shared/bench/kmeans_sklearn.py otherwise. Prints one JSON line.
"""
import argparse, gzip, json, os, struct, time
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--k", type=int, default=8)
ap.add_argument("--fine", type=int, default=1024)
ap.add_argument("--subsample", type=int, default=20000)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--pca", type=int, default=0)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
a = ap.parse_args()
os.environ["OMP_NUM_THREADS"] = str(a.threads)
from threadpoolctl import threadpool_limits
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

with gzip.open(a.data, "rb") as f:
    b = f.read()
_, n, r, c = struct.unpack(">IIII", b[:16])
x = np.frombuffer(b, np.uint8, offset=16).reshape(n, r * c).astype(np.float32) / 127.5 - 1
with threadpool_limits(a.threads):
    t0 = time.perf_counter()
    if a.pca:
        x = PCA(a.pca, random_state=a.seed).fit_transform(x)
    rng = np.random.default_rng(a.seed)
    sub = rng.choice(n, size=min(a.subsample, n), replace=False)
    fine = KMeans(a.fine, n_init=1, max_iter=100, random_state=a.seed).fit(x[sub])
    fine_label = fine.predict(x)
    counts = np.bincount(fine_label, minlength=a.fine)
    keep = counts > 0
    coarse = KMeans(a.k, n_init=1, max_iter=100, random_state=a.seed).fit(
        fine.cluster_centers_[keep], sample_weight=counts[keep])
    f2c = np.zeros(a.fine, dtype=int)
    f2c[np.flatnonzero(keep)] = coarse.labels_
    labels = f2c[fine_label]
    dt = time.perf_counter() - t0
print(json.dumps({"impl": "sklearn-two-stage", "k": a.k, "n": n, "dims": x.shape[1], "pca": a.pca,
                  "fine": a.fine, "seconds": round(dt, 3),
                  "counts": np.bincount(labels, minlength=a.k).tolist()}))
