"""Seconds of a 2-d t-SNE of random 256-d points: openTSNE (the `features` extra, what
`python -m tune_kd.analysis EXPERIMENT --features` uses) against scikit-learn's `TSNE`.

    python bench/tsne.py --points 20000 --library opentsne --threads 2
    python bench/tsne.py --points 20000 --library sklearn --threads 2

20,000 points are one CIFAR-100 test set's teacher and student features; 256 is ResNet-32x4's
width. Both start from PCA with their default perplexity (30) and Barnes-Hut or FFT as they choose.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--library", choices=("opentsne", "sklearn"), default="opentsne")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    points = np.random.default_rng(0).standard_normal((args.points, args.width), np.float32)
    start = time.perf_counter()
    if args.library == "opentsne":
        from openTSNE import TSNE

        TSNE(2, initialization="pca", random_state=0, n_jobs=args.threads).fit(points)
    else:
        from sklearn.manifold import TSNE

        TSNE(2, init="pca", random_state=0, n_jobs=args.threads).fit_transform(points)
    seconds = time.perf_counter() - start
    load = os.getloadavg()[0]
    print(
        f"{args.library}: {args.points} points, {args.threads} threads: {seconds:.1f} s "
        f"(load average {load:.1f})"
    )


if __name__ == "__main__":
    main()
