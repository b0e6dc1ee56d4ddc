"""UME — uni-modal ensemble (Du et al., "On uni-modal feature learning in supervised multi-modal learning",
ICML 2023): no multimodal training at all. Each modality's model is trained alone — here, the unimodal
models `pdmp rank` already trained, of the same seed as the run — and the prediction averages their
softmax probabilities: p(y|x) = (1/M) Σ_m softmax(o_m^uni).

Choices:
- Nothing is trained (`trains = False`): the engine runs no step, evaluates once (epoch 0, selected on
  the configured split as any run) and tests that checkpoint once, so UME gets a normal run directory,
  result.json and report row. Training options (epochs, lr) are recorded but have no effect; the run is
  built with the concat fusion whatever `--fusion` says (`uses_fusion = False`), so a grid over fusions
  makes one UME run.
- The members' encoders are loaded into the run's model (so best.pt holds them) and their linear heads
  into the method's modules (saved with the checkpoint): best.pt is the whole ensemble.
- Evaluation logits are log p̄ (log of the averaged probabilities), so argmax and the logged loss (NLL of
  the ensemble) are the ensemble's; the per-modality accuracy and score ratio of metrics.jsonl are those
  of the members (their own logits).
- Any number of modalities.
- The checkpoints used are recorded in the config: their SHA-256 (part of the run's identity: a new
  `pdmp rank` makes a different run) and their paths (`unimodal_source`, provenance only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmp_cli.errors import PdmpError
from pdmp_cli.methods.base import Method, register


@dataclass
class UMEParams:
    unimodal_sha256: dict[str, str] | None = None  # filled from rank's checkpoints of the run's seed
    unimodal_source: dict[str, str] | None = None  # their paths (provenance, outside the config hash)


def ensemble_log_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    """log((1/M) Σ_m softmax(logits_m)), computed stably as logsumexp of log-softmaxes − log M."""
    stacked = torch.stack([F.log_softmax(x.float(), dim=1) for x in logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


def load_member_encoder(method: Method, modality: str) -> torch.nn.Module:
    """Rank's model of `modality`, checked against the run's encoder (same architecture and width)."""
    member = method.trainer.unimodal_model(modality)
    mine, theirs = method.model.encoders[modality], member.encoders[modality]
    if type(mine) is not type(theirs) or mine.out_dim != theirs.out_dim:
        raise PdmpError(f"the unimodal model of {modality} has a {type(theirs).__name__} encoder of {theirs.out_dim} "
                        f"features, this run a {type(mine).__name__} of {mine.out_dim}; use the --encoder and --width "
                        f"that `pdmp rank` used")
    return member


@register
class UME(Method):
    name = "ume"
    description = "uni-modal ensemble: averages the softmax probabilities of rank's unimodal models (no training)"
    Params = UMEParams
    needs_unimodal_models = True
    trains = False
    uses_fusion = False

    def setup(self) -> None:
        for m in self.model.modalities:
            member = load_member_encoder(self, m)
            self.model.encoders[m].load_state_dict(member.encoders[m].state_dict())
            for stat in (f"mean_{m}", f"std_{m}"):  # the input normalisation the member was trained with
                getattr(self.model, stat).copy_(getattr(member, stat))
            self.modules[m] = member.fusion  # the member's linear head

    def modality_logits(self, out) -> dict[str, torch.Tensor]:
        """The members' own logits (their heads on their features): the per-modality diagnostics describe them."""
        return {m: self.modules[m]([out.features[m]]) for m in self.model.modalities}

    def predict(self, out) -> torch.Tensor:
        return ensemble_log_probs(list(self.modality_logits(out).values()))
