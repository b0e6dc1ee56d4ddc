"""Fusion heads: features [z_1..z_M] → fused logits, plus per-modality logits (methods.md).

concat and sum split exactly (Σ o_m = o for concat); every other fusion gets per-modality logits by
zero-masking: o_m = F(z with every other modality's feature set to 0).
"""
from __future__ import annotations

import torch
from torch import nn

from pdmp_cli.errors import PdmpError
from pdmp_cli.registry import Registry

FUSIONS: Registry[type["Fusion"]] = Registry("fusion")


class Fusion(nn.Module):
    description = ""
    min_modalities, max_modalities = 2, None

    def __init__(self, dims: list[int], num_classes: int) -> None:
        super().__init__()
        self.check_modalities(len(dims))

    @classmethod
    def check_modalities(cls, n: int) -> None:
        lo, hi = cls.min_modalities, cls.max_modalities
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            raise PdmpError(f"fusion {cls.name!r} takes {want} modalities, got {n}; use concat or sum instead")

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def modality_logits(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for m in range(len(feats)):
            masked = [z if k == m else torch.zeros_like(z) for k, z in enumerate(feats)]
            out.append(self(masked))
        return out


def register(name: str):
    def decorator(cls):
        cls.name = name
        return FUSIONS.register(name)(cls)

    return decorator


@register("concat")
class ConcatFusion(Fusion):
    description = "Linear([z_1; …; z_M]); exact per-modality split W_m z_m + b/M; any M"
    min_modalities = 1  # with one modality it is the unimodal linear head

    def __init__(self, dims: list[int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.dims = list(dims)
        self.fc = nn.Linear(sum(dims), num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat(feats, dim=1))

    def modality_logits(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        blocks = torch.split(self.fc.weight, self.dims, dim=1)
        bias = self.fc.bias / len(feats)
        return [z @ w.t() + bias for z, w in zip(feats, blocks)]


@register("sum")
class SumFusion(Fusion):
    description = "Σ_m Linear_m(z_m); exact per-modality split; any M"

    def __init__(self, dims: list[int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(self.modality_logits(feats)).sum(dim=0)

    def modality_logits(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(z) for head, z in zip(self.heads, feats)]


@register("film")
class FiLMFusion(Fusion):
    description = "(γ, β) = Linear(z_1); Linear(γ ⊙ z_2 + β): modality 1 conditions modality 2; M = 2"
    max_modalities = 2

    def __init__(self, dims: list[int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.film = nn.Linear(dims[0], 2 * dims[1])
        self.fc_out = nn.Linear(dims[1], num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(feats[0]).chunk(2, dim=1)
        return self.fc_out(gamma * feats[1] + beta)


@register("gated")
class GatedFusion(Fusion):
    description = "Linear(σ(Linear(z_1)) ⊙ Linear(z_2)): modality 1 gates modality 2; M = 2"
    max_modalities = 2

    def __init__(self, dims: list[int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        hidden = dims[1]
        self.fc_gate = nn.Linear(dims[0], hidden)
        self.fc_value = nn.Linear(dims[1], hidden)
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.fc_out(torch.sigmoid(self.fc_gate(feats[0])) * self.fc_value(feats[1]))
