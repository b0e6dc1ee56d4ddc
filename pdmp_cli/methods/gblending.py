"""G-Blending — Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020), online version.

Branches k ∈ {fused, one per modality}: `fused` is the run's fusion head (any fusion, any M); each
modality m gets its own linear head on its feature z_m (in `self.modules`), so its loss also trains
encoder m. Training loss = Σ_k w_k · CE(o_k, y); inference uses the fused branch only, as the paper.

Weights (the paper's practical estimate of its optimal blend, w_k* = <∇L*, v_k>/σ_k² / Z): at two
checkpoints N and N+n each branch's mean CE on the training split (L^T) and on the VALIDATION split
(L^V) — eval mode, no gradients — give

    overfitting       O_N = L^V_N − L^T_N            ΔO_k = O_{N+n} − O_N
    generalisation    ΔG_k = L^V_N − L^V_{N+n}        w_k = (ΔG_k / ΔO_k²) / Z

Choices (the paper leaves them open or pdmp deviates, each stated):
- Checkpoints are the starts of epochs 0, n, 2n, … (epoch 0: the initialised model), so the weights
  estimated at the start of epoch e from the losses at e − n and e are used in epochs [e, e + n);
  before the first estimate the weights are uniform, 1/(M+1) each (`init=fused`: (1, 0, …, 0)). A
  checkpoint costs one no-grad pass over the train and validation splits (`Trainer.split_mean`, shared
  by the processes of a multi-process run); the initial one is skipped when no estimate would follow it
  (every ≥ epochs).
- Z = Σ_k ΔG_k/ΔO_k², so the weights sum to 1 like the initial ones (the paper's Z = Σ_k ΔG_k/(2ΔO_k²)
  makes them sum to 2, a constant factor on the loss).
- A branch whose validation loss did not fall (ΔG_k ≤ 0) gets weight 0 rather than a negative one
  (which would make it ascend its loss); ΔO_k² is floored at 1e-12. If no branch generalised, the
  previous weights stay.
- `every=0` never re-estimates: the initial weights are fixed. With `init=fused, every=0` the loss is
  1·CE(fused) + 0·CE(unimodal heads): the gradients of the model are joint's exactly (adding 0.0 and
  multiplying by 1.0 are exact in floating point) and the extra heads draw nothing from the random
  streams training uses after setup, so the run reproduces `joint` bit for bit (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmp_cli.methods.base import Method, check_choice, check_range, register
from pdmp_cli.models.encoders import init_weights

FUSED = "fused"


@dataclass
class GBlendingParams:
    every: int = 10  # epochs per super-epoch: weights re-estimated at the start of every n-th epoch; 0 = fixed weights
    init: str = "uniform"  # weights before the first estimate: uniform (1/(M+1) each) | fused ((1, 0, …, 0))


def blend_weights(previous: dict[str, dict[str, float]], current: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """Gradient-Blending weights from the per-branch losses {"train": {k: L^T}, "val": {k: L^V}} at the
    previous and the current checkpoint; None when no branch's validation loss fell."""
    raw = {}
    for k, val_now in current["val"].items():
        gain = previous["val"][k] - val_now  # ΔG
        overfit = (val_now - current["train"][k]) - (previous["val"][k] - previous["train"][k])  # ΔO
        raw[k] = max(gain, 0.0) / max(overfit * overfit, 1e-12)
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()} if total > 0 else None


@register
class GBlending(Method):
    name = "gblending"
    description = "gradient blending: per-branch CE weights ∝ ΔG/ΔO² from train/val losses, re-estimated every n epochs"
    Params = GBlendingParams
    min_modalities = 2

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        check_range(cls.name, "every", resolved["every"], 0)
        check_choice(cls.name, "init", resolved["init"], ("uniform", "fused"))
        return resolved

    def setup(self) -> None:
        model, classes = self.model, self.model.num_classes
        for m in model.modalities:
            self.modules[m] = nn.Linear(model.encoders[m].out_dim, classes)
        init_weights(self.modules)
        branches = [FUSED, *model.modalities]
        if self.p.init == "fused":
            self.weights = {k: float(k == FUSED) for k in branches}
        else:
            self.weights = {k: 1.0 / len(branches) for k in branches}
        self.checkpoint: dict[str, dict[str, float]] | None = None  # losses at the last checkpoint

    def branch_logits(self, out) -> dict[str, torch.Tensor]:
        return {FUSED: out.logits} | {m: self.modules[m](z) for m, z in out.features.items()}

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        useful = self.checkpoint is not None or epoch + self.p.every < self.config.optim.epochs  # an estimate follows
        if self.p.every and epoch % self.p.every == 0 and useful and self.trainer.data is not None:  # None: `pdmp bench`
            current = {split: self.branch_losses(split) for split in ("train", "val")}
            if self.checkpoint is not None:
                self.weights = blend_weights(self.checkpoint, current) or self.weights
            self.checkpoint = current

    def branch_losses(self, split: str) -> dict[str, float]:
        """Mean CE of every branch on `split` (eval mode, no gradients)."""
        return self.trainer.split_mean(split, lambda out, batch: {
            k: F.cross_entropy(logits, batch.labels, reduction="sum") for k, logits in self.branch_logits(out).items()})

    def loss(self, out, batch):
        return {k: self.weights[k] * F.cross_entropy(logits, batch.labels) for k, logits in self.branch_logits(out).items()}

    def log(self) -> dict[str, float]:
        """The weights in force this epoch and the branch losses of the last checkpoint."""
        logged = super().log() | {f"weight/{k}": w for k, w in self.weights.items()}
        for split, losses in (self.checkpoint or {}).items():
            logged |= {f"{split}_loss/{k}": v for k, v in losses.items()}
        return logged

    def state_dict(self):
        return super().state_dict() | {"weights": dict(self.weights), "checkpoint": self.checkpoint}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.weights, self.checkpoint = dict(state["weights"]), state["checkpoint"]
