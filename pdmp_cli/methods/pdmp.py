"""PDMP — Performance-Dominant Modality Prioritization (arXiv 2604.05773), as reconstructed in
methods.md: the modality ranked first by independently trained unimodal models gets the gradient
coefficient γp, every other modality γr, so that the dominant modality leads the optimisation.

Two modes, chosen once at config time and recorded:
- ``grad`` (SGD): an autograd op, identity forward, multiplies the gradient flowing into encoder m
  by γ_m backward — every encoder parameter is scaled, the fusion head is not.
- ``lr`` (Adam/AdamW, which normalise gradient scale away): the encoder's learning rate is
  multiplied by γ_m for the epoch's optimizer steps (scaled in on_epoch_start, restored exactly in
  on_epoch_end — before the scheduler steps and state.pt is saved, so neither ever sees a scaled rate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmp_cli.errors import PdmpError
from pdmp_cli.methods.base import Method, check_choice, check_window, in_window, positive, register, run_modalities


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


@dataclass
class PDMPParams:
    gamma_p: float = 3.0  # coefficient of the performance-dominant (top-ranked) modality
    gamma_r: float = 0.25  # coefficient of every other modality
    start_epoch: int = 0  # coefficients act in epochs [start_epoch, end_epoch), end exclusive
    end_epoch: int | None = None  # None = until the end
    mode: str = "auto"  # auto | grad | lr  (auto: lr for adam/adamw, grad otherwise)
    schedule: str = "fixed"  # fixed | graded (M > 2: interpolate γp → γr down the ranking)
    ranking: list[str] | None = None  # best first; filled from rank.json unless given by hand
    ranking_source: str | None = None  # where the ranking came from (file and its hash, or "manual")


def coefficients(ranking: list[str], gamma_p: float, gamma_r: float, schedule: str = "fixed") -> dict[str, float]:
    """γ per modality from a ranking (best first)."""
    if schedule == "graded" and len(ranking) > 2:
        step = (gamma_r - gamma_p) / (len(ranking) - 1)
        return {m: gamma_p + i * step for i, m in enumerate(ranking)}
    return {m: (gamma_p if i == 0 else gamma_r) for i, m in enumerate(ranking)}


@register
class PDMP(Method):
    name = "pdmp"
    description = "performance-dominant modality prioritisation: γp for the top-ranked modality, γr for the rest"
    Params = PDMPParams
    needs_ranking = True
    min_modalities = 2

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        p = PDMPParams(**resolved)
        positive(cls.name, "gamma_p", p.gamma_p)
        positive(cls.name, "gamma_r", p.gamma_r)
        check_choice(cls.name, "mode", p.mode, ("auto", "grad", "lr"))
        check_choice(cls.name, "schedule", p.schedule, ("fixed", "graded"))
        check_window(cls.name, resolved, inclusive_end=False)
        if not p.ranking:
            raise PdmpError("pdmp needs a ranking: run `pdmp rank` first, or pass --ranking audio,visual")
        modalities = run_modalities(config)
        if sorted(p.ranking) != sorted(modalities):
            raise PdmpError(f"the ranking {','.join(p.ranking)} does not match the run's modalities "
                            f"{','.join(modalities)}; re-run `pdmp rank` or fix --ranking")
        if p.mode == "auto":
            resolved["mode"] = "lr" if config.optim.optimizer in ("adam", "adamw") else "grad"
        return resolved

    def setup(self) -> None:
        self.gammas = coefficients(self.p.ranking, self.p.gamma_p, self.p.gamma_r, self.p.schedule)
        self._saved_lrs: list[float] | None = None  # lr mode: the unscaled rates while an epoch runs

    def active(self) -> dict[str, float]:
        """Coefficients in force this epoch (1 outside the epoch window)."""
        inside = in_window(self.epoch, self.p.start_epoch, self.p.end_epoch, inclusive_end=False)
        return self.gammas if inside else {m: 1.0 for m in self.gammas}

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.p.mode != "lr" or self.trainer.optimizer is None:
            return
        self.restore_lrs()  # an epoch started again without ending (bench, tests) must not compound the scaling
        gammas, groups = self.active(), self.trainer.optimizer.param_groups
        self._saved_lrs = [group["lr"] for group in groups]
        for group in groups:
            kind, _, modality = group.get("name", "").partition(":")
            if kind == "encoder":
                group["lr"] = group["lr"] * gammas[modality]

    def on_epoch_end(self, epoch: int) -> None:
        self.restore_lrs()

    def restore_lrs(self) -> None:
        """Put back the unscaled rates exactly (the scheduler and state.pt must never see scaled ones)."""
        if self._saved_lrs is not None:
            for group, lr in zip(self.trainer.optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr
            self._saved_lrs = None

    def transform_features(self, features, batch):
        if self.p.mode != "grad":
            return features
        gammas = self.active()
        return {m: ScaleGrad.apply(z, gammas[m]) for m, z in features.items()}

    def log(self) -> dict[str, float]:
        return super().log() | {f"gamma/{m}": g for m, g in self.active().items()}
