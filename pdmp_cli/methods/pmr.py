"""PMR — Prototypical Modal Rebalance (Fan, Xu, Wu, Huang, Liu, Yang; CVPR 2023).

Class prototypes per modality: P_m[c] = mean of encoder features z_m over the training samples of class
c, computed without gradients (eval mode) at the start of every epoch; from the second computation on,
P_m ← (1 − μ)·P_m(new) + μ·P_m(old) with μ = `momentum` (reference 0.2). Per step, the prototype
logits of modality m are −‖z_m − P_m[c]‖₂ (Euclidean distance, as the reference code), its prototype
score s_m = Σ_i softmax(−d_m,i)[y_i] (summed over processes) and ρ_m = s_m / mean_{k≠m} s_k.
Loss = CE(o, y) + Σ_m β_m·CE(−d_m, y) with β_m = α when ρ_m < 1 (the slow-learning modality), else 0 —
the reference's rule for two modalities (ρ_a > 1 → visual gets α, ρ_a < 1 → audio, ρ_a = 1 → neither),
which for M > 2 stimulates every modality below the mean of the others. Active in epochs
[start_epoch, end_epoch] (inclusive, as the reference).

Choices, stated:
- Prototypes come from the whole training split (the reference uses the first tenth of a shuffled
  loader, a cost saving); a class absent from the split keeps its previous prototype (zero at first).
  With several processes each reads its part of the split and the class sums are all-reduced.
- The paper's prototypical entropy regulariser (slows the dominant modality early on) is not in the
  official code (main_Prototype_grad.py); it is offered off by default: with `entropy_weight` μ_e > 0,
  in epochs < `entropy_epochs`, the loss gets −μ_e·H(softmax(−d_m)) (batch mean) for every modality
  with ρ_m > 1, i.e. its prototype predictions are pushed towards high entropy.
- Prototypes use the features only, so PMR works with every fusion (concat, sum, FiLM, gated) and any M.
  With α = 0 and μ_e = 0 it is joint training (the prototype pass touches neither weights nor RNGs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmp_cli.diagnostics import modality_scores, score_ratios
from pdmp_cli.methods.base import Method, check_range, check_window, in_window, register


@dataclass
class PMRParams:
    alpha: float = 1.0  # weight of the prototype CE for the slow-learning modality (reference default 1.0)
    momentum: float = 0.2  # weight of the previous prototypes when they are recomputed (reference 0.2)
    start_epoch: int = 0  # the prototype loss acts in epochs [start_epoch, end_epoch], end inclusive as the
    end_epoch: int = 100  # reference's modulation_ends
    entropy_weight: float = 0.0  # μ_e of the paper's entropy regulariser (0: off, as the official code)
    entropy_epochs: int = 0  # the regulariser acts in epochs [0, entropy_epochs)


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """−‖z − P_c‖₂ for every sample and class: the prototype classifier's logits."""
    return -torch.cdist(features.float(), prototypes)


def pmr_coefficients(ratios: dict[str, float], alpha: float) -> dict[str, float]:
    """β_m: α for every modality whose prototype score ratio is below 1, 0 otherwise."""
    return {m: (alpha if r < 1 else 0.0) for m, r in ratios.items()}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy of softmax(logits)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


@register
class PMR(Method):
    name = "pmr"
    description = "prototypical modal rebalance: α·CE(−dist(z_m, class prototypes)) for the slow-learning modality"
    Params = PMRParams
    min_modalities = 2

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        for key in ("alpha", "entropy_weight"):
            check_range(cls.name, key, resolved[key], 0)
        check_range(cls.name, "momentum", resolved["momentum"], 0, 1, hi_open=True)
        check_range(cls.name, "entropy_epochs", resolved["entropy_epochs"], 0)
        check_window(cls.name, resolved, inclusive_end=True)
        return resolved

    def setup(self) -> None:
        self.prototypes: dict[str, torch.Tensor] | None = None

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.p.alpha > 0 or self.p.entropy_weight > 0:  # every epoch, as the reference (the momentum chain)
            self.prototypes = self.compute_prototypes()

    def compute_prototypes(self) -> dict[str, torch.Tensor]:
        """Class means of each encoder's features over the training split, blended with the previous ones."""
        model, device = self.model, self.trainer.device
        n = model.num_classes
        sums = {m: torch.zeros(n, model.encoders[m].out_dim, dtype=torch.float64, device=device) for m in model.modalities}
        counts = torch.zeros(n, dtype=torch.long, device=device)
        for batch, out in self.trainer.forward_split("train", shard=True):  # each process its part, then summed
            for m, z in out.features.items():
                sums[m].index_add_(0, batch.labels, z.double())
            counts += torch.bincount(batch.labels, minlength=n)
        for total in (*sums.values(), counts):
            self.trainer.all_reduce(total)
        seen = (counts > 0)[:, None]
        old = self.prototypes or {m: torch.zeros(s.shape, device=device) for m, s in sums.items()}
        mu = 0.0 if self.prototypes is None else self.p.momentum
        return {m: torch.where(seen, (1 - mu) * (s / counts.clamp(min=1)[:, None]).float() + mu * old[m], old[m])
                for m, s in sums.items()}

    def loss(self, out, batch):
        ce = F.cross_entropy(out.logits, batch.labels)
        p = self.p
        stimulate = p.alpha > 0 and in_window(self.epoch, p.start_epoch, p.end_epoch, inclusive_end=True)
        regularise = p.entropy_weight > 0 and self.epoch < p.entropy_epochs
        if not (stimulate or regularise):
            return ce
        logits = {m: prototype_logits(z, self.prototypes[m]) for m, z in out.features.items()}
        ratios = score_ratios(modality_scores(logits, batch.labels, self.trainer.all_reduce))
        betas = pmr_coefficients(ratios, p.alpha) if stimulate else {m: 0.0 for m in ratios}
        total = ce
        for m, beta in betas.items():
            if beta:
                total = total + beta * F.cross_entropy(logits[m], batch.labels)
            if regularise and ratios[m] > 1:
                total = total - p.entropy_weight * entropy(logits[m])
        self.stats.add(ratio=ratios, beta=betas)  # logged: epoch means of ρ_m and of the β_m in force
        return total

    def state_dict(self):
        state = super().state_dict()
        if self.prototypes is not None:
            state["prototypes"] = {m: t.cpu() for m, t in self.prototypes.items()}
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        saved = state.get("prototypes")
        self.prototypes = None if saved is None else {m: t.to(self.trainer.device) for m, t in saved.items()}
