"""MLA — Multimodal Learning with Alternating unimodal adaptation (Zhang, Latham, Yao, "Multimodal
Representation Learning by Alternating Unimodal Adaptation", CVPR 2024).

Training: one linear head shared by every modality (in `self.modules`; features z_m → logits). Per
batch, for each modality m in the run's modality order: forward modality m alone, CE(head(z_m), y),
backward, modify the head's weight gradient, optimizer step — M updates per batch, each touching
only encoder m and the head (the other encoders have no gradient, so the optimizer skips them).
MLA replaces fusion by the shared head (so it works for any M ≥ 2): its runs are built with the
concat fusion whatever `--fusion` says (`uses_fusion = False`; its weights stay at their
initialisation), so a grid over fusions trains MLA once.

Gradient modification (the paper's orthogonal projection, as its official code): a projector
P (d × d, d the feature size, starting at the identity) accumulates over every update of every
modality, for the whole run. For each update but the very first: with r the batch mean of the
current features (1 × d) and k = P rᵀ,
    P ← P − k kᵀ / (α + r k),    P ← P / ‖P‖_F,    ∇W_head ← ∇W_head Pᵀ
(bias untouched), so the head moves away from the input directions earlier modalities used;
α = alpha^(1 + i/n) for batch i of n in the epoch (official: alpha = 0.1). The official code gates
this on a parameter name ("module.weight") that a plain nn.Linear head never has, so as released it
may never project; pdmp applies it as the paper describes (`projection=false` turns it off).

Inference (`predict`, from the features in the ModelOutput): o_m = head(z_m) and
- `entropy` (default, the paper's): per sample, e_m = −Σ_c p_m,c log p_m,c (p_m = softmax(o_m)),
  λ_m = exp(max_j e_j − e_m) / Σ_i exp(max_j e_j − e_i) = softmax(−e)_m, output Σ_m λ_m o_m. (The
  official code takes the softmax over the batch axis and one entropy per batch; pdmp uses the
  paper's per-sample rule, so a prediction does not depend on the rest of its batch.)
- `fixed`: (1/M) Σ_m o_m (the official two-modality default 0.5/0.5).
Per-modality logits reported by evaluation are head(z_m). The logged training loss is the mean of
the M unimodal losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmp_cli.errors import PdmpError
from pdmp_cli.methods.base import Method, check_choice, positive, register
from pdmp_cli.models import ModelOutput
from pdmp_cli.models.encoders import init_weights


@dataclass
class MLAParams:
    inference: str = "entropy"  # entropy | fixed: how the unimodal predictions are fused at test time
    projection: bool = True  # orthogonal projection of the shared head's gradient (the paper's gradient modification)
    alpha: float = 0.1  # projector regulariser: α = alpha^(1 + i/n) in batch i of n (official: 0.1)


class SharedHead(nn.Linear):
    """One linear classifier for every modality's feature; `modality_logits` lets a ModelOutput use it."""

    def modality_logits(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self(z) for z in feats]


def entropy_weights(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample fusion weights λ_m = softmax over modalities of −entropy(softmax(o_m))."""
    entropies = torch.stack([-(F.softmax(o, 1) * F.log_softmax(o, 1)).sum(1) for o in logits.values()])
    return dict(zip(logits, F.softmax(-entropies, dim=0)))


def fuse(logits: dict[str, torch.Tensor], rule: str) -> torch.Tensor:
    if rule == "fixed":
        return sum(logits.values()) / len(logits)
    weights = entropy_weights(logits)
    return sum(weights[m].unsqueeze(1) * o for m, o in logits.items())


def projected(projector: torch.Tensor, grad: torch.Tensor, r: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated projector, projected head-weight gradient) for the mean feature r [1, d]."""
    k = projector @ r.t()
    projector = projector - (k @ k.t()) / (alpha + r @ k)
    projector = projector / projector.norm()
    return projector, grad @ projector.t()


@register
class MLA(Method):
    name = "mla"
    description = "alternating unimodal updates through a shared head (projected head gradients); entropy-weighted inference"
    Params = MLAParams
    min_modalities = 2
    uses_fusion = False

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        check_choice(cls.name, "inference", resolved["inference"], ("entropy", "fixed"))
        positive(cls.name, "alpha", resolved["alpha"])
        return resolved

    def setup(self) -> None:
        dims = {m: enc.out_dim for m, enc in self.model.encoders.items()}
        if len(set(dims.values())) != 1:
            sizes = ", ".join(f"{m} {d}" for m, d in dims.items())
            raise PdmpError(f"mla shares one head across modalities, so every feature must have the same size "
                            f"(got {sizes}); use the same encoder and width for every modality")
        d = next(iter(dims.values()))
        self.modules["head"] = SharedHead(d, self.model.num_classes)
        init_weights(self.modules)
        self.projector = torch.eye(d, device=self.trainer.device)
        self.updates = 0  # head updates so far (the projection starts at the second)
        data = self.trainer.data  # None under `pdmp bench` (fixed batches): α then follows only the batch count
        self.batches_per_epoch = math.ceil(len(data.splits["train"]) / self.config.optim.batch_size) if data else 1

    @property
    def head(self) -> SharedHead:
        return self.modules["head"]

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.batch_in_epoch = 0

    def step(self, batch):
        trainer = self.trainer
        alpha = self.p.alpha ** (1 + self.batch_in_epoch / self.batches_per_epoch)
        features, logits, losses = {}, {}, {}
        for m in self.model.modalities:
            with trainer.autocast():
                z = self.model.encode_modality(m, batch.inputs[m])
                logits[m] = self.head(z)
                loss = F.cross_entropy(logits[m], batch.labels)
            trainer.zero_grad()
            trainer.backward(loss)
            trainer.sync_gradients()
            if self.p.projection:
                self.modify_head_gradient(z.detach(), alpha)
            trainer.optimizer_step()
            self.updates += 1
            features[m], logits[m] = z.detach(), logits[m].detach()
            losses[m] = loss.detach()
        self.batch_in_epoch += 1
        self.stats.add(loss=losses)  # logged: epoch means of each modality's loss through the shared head
        return torch.stack(list(losses.values())).mean(), ModelOutput(fuse(logits, self.p.inference), features, self.head)

    def modify_head_gradient(self, z: torch.Tensor, alpha: float) -> None:
        """Project the head's (unscaled, synchronised) weight gradient; r is the mean over the global batch."""
        if self.updates == 0:  # the official code leaves the very first update alone
            return
        total = self.trainer.all_reduce(z.float().sum(0, keepdim=True))
        count = self.trainer.all_reduce(torch.tensor(float(len(z)), device=z.device))
        weight = self.head.weight
        projector, grad = projected(self.projector, weight.grad.float(), total / count, alpha)
        if not bool(torch.isfinite(grad).all()):  # an fp16 overflow: .grad keeps the inf the scaler found when
            return  # unscaling (it skips the step); a projector from non-finite features is not kept either
        self.projector = projector
        weight.grad.copy_(grad)

    def modality_logits(self, out) -> dict[str, torch.Tensor]:
        return {m: self.head(z) for m, z in out.features.items()}

    def predict(self, out) -> torch.Tensor:
        return fuse(self.modality_logits(out), self.p.inference)

    def state_dict(self):
        return super().state_dict() | {"projector": self.projector.clone(), "updates": self.updates}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.projector = state["projector"].to(self.head.weight.device)
        self.updates = state["updates"]
