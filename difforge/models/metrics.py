"""Distances between feature sets: Fréchet distance (Heusel et al.), KID (Bińkowski et al.),
precision and recall of k-NN manifolds (Kynkäänniemi et al.)."""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    import numpy as np
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def kid(a: np.ndarray, b: np.ndarray, subsets: int, size: int, seed: int) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel, averaged."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d = a.shape[1]
    size = min(size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        m = size
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                    + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())  # fmt: skip
    return float(np.mean(vals))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.: a sample is 'in' a set's manifold if it lies within the k-th
    nearest-neighbour radius of some member. Precision: fakes in the real manifold; recall:
    reals in the fake manifold."""
    import numpy as np

    def dists(x, y):
        return np.sqrt(np.maximum(((x**2).sum(1)[:, None] + (y**2).sum(1)[None] - 2 * x @ y.T), 0))

    def radii(x):
        d = dists(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    r_real, r_fake = radii(real), radii(fake)
    precision = float((dists(fake, real) <= r_real[None]).any(1).mean())
    recall = float((dists(real, fake) <= r_fake[None]).any(1).mean())
    return precision, recall
