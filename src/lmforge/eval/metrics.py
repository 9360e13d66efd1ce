"""Evaluation metrics shared by the tasks: pass@k (the unbiased estimator of Chen et al., 2021, "Evaluating Large
Language Models Trained on Code", eq. 1) and the mean with its standard error."""

from __future__ import annotations

import math
from typing import Iterable

__all__ = ["pass_at_k", "mean_stderr"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them correct) is
    correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021, eq. 1), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i),
    which stays finite for large n."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, found n={n}, c={c}")
    if k < 1 or n < k:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem, found n={n}")
    if n - c < k:
        return 1.0  # every draw of k holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(N); 0 for a single value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_stderr needs at least one value")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var / len(xs))
