"""Statistics over seeds: mean ± sample std with a 95% t interval, and paired comparisons by seed.

Seeds are few (3–10), so the interval uses Student's t with n − 1 degrees of freedom, and a method
is compared with another only on the seeds both ran (paired: same seed = same initialisation and
data order). The paired t-test and the Wilcoxon signed-rank test come from scipy; with fewer than
two pairs (or no spread) a p-value is undefined and reported as NaN, never as a number.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np
from scipy import stats as sps

TIE_TOLERANCE = 1e-9  # accuracies are ratios of counts: equal values are exact ties


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # sample std (ddof 1); NaN for n = 1
    ci95: float  # half-width of the 95% t interval; NaN for n = 1

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95


def summarise_values(values: Iterable[float]) -> Summary:
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    if n == 1:
        return Summary(1, float(x[0]), math.nan, math.nan)
    std = float(x.std(ddof=1))
    return Summary(n, float(x.mean()), std, float(sps.t.ppf(0.975, n - 1) * std / math.sqrt(n)))


@dataclass
class Paired:
    n: int  # seeds both methods ran
    mean_diff: float  # mean of (a − b) over those seeds
    std_diff: float
    t_pvalue: float  # paired t-test, two-sided
    wilcoxon_pvalue: float  # Wilcoxon signed-rank, two-sided (exact for small n)
    wins: int
    ties: int
    losses: int
    seeds: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def paired(a: Mapping[int, float], b: Mapping[int, float], tol: float = TIE_TOLERANCE) -> Paired:
    """Compare a against b on their common seeds: a win is a seed where a > b + tol."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    n = len(d)
    wins, losses = int((d > tol).sum()), int((d < -tol).sum())
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    t_p = w_p = math.nan
    if n >= 2:
        if std > 0:
            t_p = float(sps.ttest_rel(np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])).pvalue)
        if (np.abs(d) > tol).any():
            w_p = float(sps.wilcoxon(d).pvalue)
    return Paired(n, mean, std, t_p, w_p, wins, n - wins - losses, losses, seeds)
