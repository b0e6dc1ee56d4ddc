"""Models: encoder and fusion registries and the multimodal classifier built from them."""
from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from pdmp_cli.models.encoders import ENCODERS, Encoder, init_weights
from pdmp_cli.models.fusions import FUSIONS, Fusion

__all__ = ["ENCODERS", "FUSIONS", "Encoder", "Fusion", "ModelOutput", "MultimodalClassifier"]


class ModelOutput:
    """Fused logits, per-modality features and (computed on first access) per-modality logits."""

    def __init__(self, logits: torch.Tensor, features: dict[str, torch.Tensor], fusion: Fusion) -> None:
        self.logits = logits
        self.features = features
        self._fusion = fusion

    @cached_property
    def modality_logits(self) -> dict[str, torch.Tensor]:
        names = list(self.features)
        # float: under autocast the features are bf16/fp16, and methods read these outside autocast
        return dict(zip(names, self._fusion.modality_logits([z.float() for z in self.features.values()])))


class MultimodalClassifier(nn.Module):
    """One encoder per modality → fusion head. With a single modality it is a unimodal model."""

    def __init__(
        self,
        modalities: list[str],
        in_channels: dict[str, int],
        num_classes: int,
        encoder: str = "small",
        fusion: str = "concat",
        width: int = 16,
        norm_stats: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.num_classes = num_classes  # for the extra heads and class statistics methods build
        encoder_cls = ENCODERS.get(encoder)
        self.encoders = nn.ModuleDict({m: encoder_cls(in_channels[m], width) for m in self.modalities})
        self.fusion = FUSIONS.get(fusion)([self.encoders[m].out_dim for m in self.modalities], num_classes)
        init_weights(self.fusion)
        # Input normalisation lives in the model (and its checkpoint), applied on the device.
        stats = norm_stats or {}
        for m in self.modalities:
            mean, std = stats.get(m, (0.0, 1.0))
            self.register_buffer(f"mean_{m}", torch.tensor(float(mean)), persistent=True)
            self.register_buffer(f"std_{m}", torch.tensor(float(std)), persistent=True)

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encode_modality(m, inputs[m]) for m in self.modalities}

    def encode_modality(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """One modality's feature (normalised input → its encoder), for methods that forward one at a time (MLA)."""
        return self.encoders[modality]((x.float() - getattr(self, f"mean_{modality}")) / getattr(self, f"std_{modality}"))

    def head(self, features: dict[str, torch.Tensor]) -> ModelOutput:
        logits = self.fusion([features[m] for m in self.modalities])
        return ModelOutput(logits, features, self.fusion)

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        return self.head(self.encode(inputs))

    def param_groups(self) -> list[dict]:
        """One optimizer group per encoder and one for the head, named so methods can find them."""
        groups = [{"name": f"encoder:{m}", "params": list(self.encoders[m].parameters())} for m in self.modalities]
        groups.append({"name": "fusion", "params": list(self.fusion.parameters())})
        return groups
