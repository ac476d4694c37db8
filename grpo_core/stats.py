"""The statistics behind every accuracy the project reports: pass@k, intervals, paired tests.

    pass_at_k(n=8, c=3, k=2)                 # unbiased pass@k from n samples, c of them correct
    bootstrap_ci([1, 0, 1, 1])               # 95 % percentile-bootstrap interval of a mean (items)
    bootstrap_ci([[1, 0], [1, 1, 0]])        # nested: resample seeds, then items within each seed
    paired_test(a, b)                        # mean(a − b), its paired-bootstrap interval, p-value
    mcnemar_exact(b=7, c=1)                  # exact two-sided McNemar p from the discordant counts

Math (each function states its own):
  pass@k = 1 − C(n−c, k) / C(n, k) = 1 − ∏_{i=n−c+1}^{n} (1 − k/i)  (Chen et al. 2021; the product
  never forms a binomial coefficient, so n = 1000 is as stable as n = 4).
  Bootstrap: R resamples with replacement; the interval is the (α/2, 1 − α/2) quantiles of the
  resampled means (percentile method). Over seeds: resample seeds, then items within each chosen
  seed; the statistic is the mean of the per-seed means, so both sources of spread are in it.
  McNemar (exact): under H0 the b + c discordant pairs split Binomial(b + c, ½);
  p = min(1, 2 · P(X ≤ min(b, c))).
Plain Python + NumPy: a few thousand resamples of a few hundred items take milliseconds.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

LEVEL = 0.95  # every interval the project prints
RESAMPLES = 2000  # bootstrap resamples (Monte-Carlo error of a 95 % bound ≈ ±0.5 % of its quantile)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(one of k draws without replacement from n samples is correct), c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, … up to n (and n itself)."""
    ks = [1 << j for j in range(n.bit_length()) if (1 << j) <= n]
    return ks + ([n] if ks[-1] != n else [])


def _nested(values) -> list[np.ndarray]:
    """A flat list of item scores → one group; a list of lists → one group per seed."""
    if len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
        groups = [np.asarray(v, dtype=np.float64) for v in values]
    else:
        groups = [np.asarray(values, dtype=np.float64)]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("bootstrap: every group (seed) needs at least one item score")
    return groups


def bootstrap_means(values, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """R bootstrap replicates of the mean (of per-seed means, when ``values`` is nested)."""
    rng = np.random.default_rng(seed)
    groups = _nested(values)
    if len(groups) == 1:
        g = groups[0]
        return g[rng.integers(0, g.size, (resamples, g.size))].mean(axis=1)
    S = len(groups)
    picks = rng.integers(0, S, (resamples, S))  # seeds, with replacement
    # slot (r, j) holds seed picks[r, j] with its own, independent item resample
    slots = np.empty((resamples, S))
    for s, g in enumerate(groups):
        where = picks == s
        slots[where] = g[rng.integers(0, g.size, (int(where.sum()), g.size))].mean(axis=1)
    out = slots.sum(axis=1)
    return out / S


def bootstrap_ci(
    values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (flat: items; nested: seeds)."""
    reps = bootstrap_means(values, resamples, seed)
    a = (1.0 - level) / 2
    return float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p from the discordant counts b (A right, B wrong), c (A wrong,
    B right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """A vs B on the same items (a[i], b[i] score item i): the difference of means, its paired
    percentile-bootstrap interval, and a two-sided p-value: exact McNemar when every score is 0/1,
    else a sign-flip permutation test on the per-item differences (``resamples`` flips)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"paired_test: need two equal-length, non-empty score lists, got {x.shape} and "
            f"{y.shape}"
        )
    d = x - y
    lo, hi = bootstrap_ci(d.tolist(), level, resamples, seed)
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    out = {
        "n": int(d.size),
        "a": float(x.mean()),
        "b": float(y.mean()),
        "difference": float(d.mean()),
        "ci": [lo, hi],
        "level": level,
    }
    if binary:
        nb, nc = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        out.update(test="mcnemar_exact", a_only=nb, b_only=nc, p_value=mcnemar_exact(nb, nc))
    else:
        rng = np.random.default_rng(seed)
        flips = rng.choice((-1.0, 1.0), size=(resamples, d.size))
        null = np.abs((flips * d).mean(axis=1))
        p = (1 + int((null >= abs(d.mean()) - 1e-12).sum())) / (resamples + 1)
        out.update(test="sign_flip_permutation", p_value=float(p))
    return out


def describe(t: dict) -> str:
    """One line: 'A − B = +4.0 points [95 % CI +1.0, +7.0], p = 0.012 (mcnemar_exact, n = 200)'."""
    lo, hi = t["ci"]
    return (
        f"A − B = {100 * t['difference']:+.1f} points "
        f"[{100 * t['level']:.0f} % CI {100 * lo:+.1f}, {100 * hi:+.1f}], "
        f"p = {t['p_value']:.3g} ({t['test']}, n = {t['n']})"
    )
