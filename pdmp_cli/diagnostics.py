"""Imbalance diagnostics computed while evaluating, for every method.

The OGM-style score ratio (Peng et al., CVPR 2022): s_m = Σ_i softmax(o_m,i)[y_i] is how much
probability modality m's own logits put on the true labels; ρ_m = s_m / mean_{k≠m} s_k. ρ_m > 1
means modality m leads. OGM uses the same ratio on training batches to modulate gradients; here it
is measured on a whole evaluation split after each epoch, so runs of any method can be compared.
"""
from __future__ import annotations

from typing import Callable

import torch


def score_ratios(scores: dict[str, float]) -> dict[str, float]:
    """ρ_m = s_m / mean_{k≠m} s_k (empty with a single modality: there is nothing to compare)."""
    names = list(scores)
    ratios = {}
    for m in names:
        others = [scores[k] for k in names if k != m]
        if others:
            ratios[m] = scores[m] / max(sum(others) / len(others), 1e-12)  # all others at 0: ρ huge
    return ratios


@torch.no_grad()
def modality_scores(modality_logits: dict[str, torch.Tensor], labels: torch.Tensor,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """s_m = Σ_i softmax(o_m,i)[y_i] over a batch, per modality (OGM's score). `reduce` sums the
    per-process sums over processes (Trainer.all_reduce), so every process sees the global batch's scores."""
    sums = torch.stack([torch.softmax(logits.float(), dim=1).gather(1, labels[:, None]).sum()  # fp32 even from half logits
                        for logits in modality_logits.values()])
    if reduce is not None:
        sums = reduce(sums)
    return dict(zip(modality_logits, sums.tolist()))


class ScoreRatio:
    """Accumulates s_m over the batches of a split; `ratios()` gives ρ_m."""

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}

    def add(self, modality_logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        for m, s in modality_scores(modality_logits, labels).items():
            self.scores[m] = self.scores.get(m, 0.0) + s

    def ratios(self) -> dict[str, float]:
        return score_ratios(self.scores)
