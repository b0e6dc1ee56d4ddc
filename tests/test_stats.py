"""Statistics and the score-ratio diagnostic against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from pdmp_cli.diagnostics import ScoreRatio, score_ratios
from pdmp_cli.stats import paired, summarise_values


def t3_cdf(t: float) -> float:
    """Student's t CDF with 3 degrees of freedom, closed form (independent of scipy)."""
    return 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi


def test_mean_std_and_t_interval():
    s = summarise_values([0.80, 0.85, 0.90])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.85), pytest.approx(0.05))
    assert s.ci95 == pytest.approx(4.302652729911275 * 0.05 / math.sqrt(3))  # t(0.975, df=2) from a table
    assert (s.low, s.high) == (pytest.approx(0.85 - s.ci95), pytest.approx(0.85 + s.ci95))
    one = summarise_values([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci95)


def test_paired_by_seed():
    a = {0: 0.90, 1: 0.80, 2: 0.85, 3: 0.60}
    b = {0: 0.80, 1: 0.60, 2: 0.55, 3: 0.65, 4: 0.99}  # seed 4 has no partner: left out
    p = paired(a, b)
    assert p.seeds == [0, 1, 2, 3] and p.n == 4 and (p.wins, p.ties, p.losses) == (3, 0, 1)
    # d = 0.1, 0.2, 0.3, −0.05: mean 0.1375, sample std sqrt(0.066875 / 3)
    assert p.mean_diff == pytest.approx(0.1375) and p.std_diff == pytest.approx(math.sqrt(0.066875 / 3))
    t = 0.1375 / (math.sqrt(0.066875 / 3) / 2)
    assert p.t_pvalue == pytest.approx(2 * (1 - t3_cdf(t)), rel=1e-6)
    # Wilcoxon: |d| ranks 2, 3, 4 positive and 1 negative; W− = 1. Of the 16 sign patterns, W− ≤ 1 in 2
    # ({} and {1}): one-sided 2/16, two-sided 0.25 (exact).
    assert p.wilcoxon_pvalue == pytest.approx(0.25)


def test_paired_ties_and_too_few_seeds_give_no_p_value():
    same = paired({0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})
    assert (same.wins, same.ties, same.losses) == (0, 2, 0) and same.mean_diff == 0
    assert math.isnan(same.t_pvalue) and math.isnan(same.wilcoxon_pvalue)
    single = paired({0: 0.9}, {0: 0.8})
    assert single.n == 1 and single.wins == 1 and math.isnan(single.t_pvalue) and math.isnan(single.std_diff)


def test_score_ratio_by_hand():
    assert score_ratios({"a": 3.0, "v": 1.0, "t": 2.0}) == {
        "a": pytest.approx(3 / 1.5), "v": pytest.approx(1 / 2.5), "t": pytest.approx(2 / 2)}
    assert score_ratios({"a": 1.0}) == {}
    tracker = ScoreRatio()
    # audio: softmax of [0, ln 3] puts 3/4 on class 1; visual: uniform, 1/2 each
    tracker.add({"audio": torch.tensor([[0.0, math.log(3)]] * 2), "visual": torch.zeros(2, 2)}, torch.tensor([1, 1]))
    tracker.add({"audio": torch.tensor([[0.0, math.log(3)]]), "visual": torch.zeros(1, 2)}, torch.tensor([0]))
    # s_audio = 3/4 + 3/4 + 1/4 = 1.75, s_visual = 1.5
    assert tracker.ratios() == {"audio": pytest.approx(1.75 / 1.5), "visual": pytest.approx(1.5 / 1.75)}
