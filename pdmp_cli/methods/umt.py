"""UMT — uni-modal teacher (Du et al., "On uni-modal feature learning in supervised multi-modal learning",
ICML 2023): the unimodal models `pdmp rank` trained (same seed as the run), frozen and in eval mode, teach
the multimodal model's encoders their features while it trains on the fused loss:

    L = CE(o, y) + λ Σ_m MSE(z_m, z_m^teacher)        (λ = `distill_weight`, default 10 per methods.md)

Choices: MSE is the mean over the batch and feature dimensions of each modality's encoder output (the
pooled feature the fusion receives); the teacher's feature is computed without gradient, with the
teacher's own input normalisation. Any number of modalities; every fusion (distillation acts on the
encoders only). λ = 0 reproduces joint training bit for bit (tested): loading the teachers draws no
random numbers. The checkpoints used are recorded as in UME (SHA-256 in the identity, paths as provenance).
The teachers must have the run's encoder architecture and width (checked, one-line error).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmp_cli.methods.base import Method, check_range, register
from pdmp_cli.methods.ume import load_member_encoder


@dataclass
class UMTParams:
    distill_weight: float = 10.0  # λ
    unimodal_sha256: dict[str, str] | None = None  # filled from rank's checkpoints of the run's seed
    unimodal_source: dict[str, str] | None = None  # their paths (provenance, outside the config hash)


def distillation_loss(features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_m MSE(z_m, z_m^teacher), each MSE the mean over batch and feature dimensions."""
    return sum(F.mse_loss(features[m].float(), targets[m].float()) for m in targets)


@register
class UMT(Method):
    name = "umt"
    description = "uni-modal teacher: CE + λ Σ_m MSE(z_m, z_m of rank's frozen unimodal model)"
    Params = UMTParams
    needs_unimodal_models = True

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        check_range(cls.name, "distill_weight", resolved["distill_weight"], 0)
        return resolved

    def setup(self) -> None:
        self.teachers = {m: load_member_encoder(self, m) for m in self.model.modalities}  # not trained, not saved

    def loss(self, out, batch):
        with torch.no_grad():
            targets = {m: t.encode(batch.inputs)[m] for m, t in self.teachers.items()}
        # Logged: per-modality epoch means of the MSE (device tensors: no host sync per step).
        self.stats.add(mse={m: F.mse_loss(out.features[m].detach().float(), targets[m].float()) for m in targets})
        return {"ce": F.cross_entropy(out.logits, batch.labels),
                "distill": self.p.distill_weight * distillation_loss(out.features, targets)}
