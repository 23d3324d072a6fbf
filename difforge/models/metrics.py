"""Distances between feature sets: Fréchet distance (Heusel et al.), KID (Bińkowski et al.),
precision and recall of k-NN manifolds (Kynkäänniemi et al.)."""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    import numpy as np

    return frechet_from_stats(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )


def frechet_from_stats(mu_a, s_a, mu_b, s_b) -> float:
    """The Fréchet distance of two Gaussians given by their means and covariances."""
    import numpy as np
    from scipy import linalg

    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


class FeatureStats:
    """What the metrics need of a feature set, gathered from a stream of batches in bounded
    memory: the mean and covariance (float64 sums, D x D) and a fixed random subset of at most
    `keep` rows (for KID and precision/recall), chosen by `seed` among `total` rows."""

    def __init__(self, total: int, keep: int, seed: int):
        import numpy as np

        self.n = 0
        chosen = np.random.default_rng(seed).choice(total, min(keep, total), replace=False)
        self._chosen = np.sort(chosen)
        self._sum = self._outer = None
        self._kept: list[np.ndarray] = []

    def add(self, feats: np.ndarray) -> None:
        import numpy as np

        f = feats.astype(np.float64)
        if self._sum is None:
            self._sum = np.zeros(f.shape[1])
            self._outer = np.zeros((f.shape[1], f.shape[1]))
        self._sum += f.sum(0)
        self._outer += f.T @ f
        lo, hi = np.searchsorted(self._chosen, [self.n, self.n + len(f)])
        self._kept.append(f[self._chosen[lo:hi] - self.n])
        self.n += len(f)

    @property
    def mean(self) -> np.ndarray:
        return self._sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (as numpy's `cov`)."""
        mu = self.mean
        return (self._outer - self.n * np.outer(mu, mu)) / max(1, self.n - 1)

    @property
    def subset(self) -> np.ndarray:
        import numpy as np

        return np.concatenate(self._kept) if self._kept else np.zeros((0, 0))


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
        vals.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
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
