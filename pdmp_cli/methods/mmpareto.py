"""MMPareto — innocent unimodal assistance (Wei & Hu, ICML 2024), as the official code (code/MMPareto.py).

Each modality gets its own linear head h_m (an extra module); losses: L = CE(o, y) multimodal and
L_m = CE(h_m(z_m), y) unimodal. For every encoder m, with g = ∇θ_m L and g_m = ∇θ_m L_m (each the
concatenation over the encoder's tensors):
- cos(g, g_m) > 0 (no conflict): weights (w, w_m) = (½, ½), as the reference;
- otherwise (conflict): the min-norm (MGDA) point of the segment between g and g_m, in closed form
  for two vectors: w = clip(((g_m − g)·g_m) / ‖g − g_m‖², 0, 1), w_m = 1 − w (`min_norm_weights`).
The combined gradient per parameter tensor is d = 2(w·g + w_m·g_m); it is rescaled to the magnitude of
the plain sum, d ← γ·max(1, ‖g + g_m‖/‖d‖)·d (per tensor, as the reference), γ = `gamma` (1.5 there).
The fusion head receives the multimodal gradient and each unimodal head its own loss's gradient.
Inference uses the fused logits. Works with every fusion and any number of modalities (the rule is per
encoder); no neutral setting reproduces joint training (the unimodal losses always act).

Implementation: `backward` takes g and g_m with `Trainer.grads` (unscaled, .grad untouched), then
backward of L + Σ L_m fills .grad for the heads (and g + g_m for the encoders, the reference's
"three_norm"). After `sync_gradients` .grad is unscaled and summed over processes, as g and g_m already
are (Trainer.grads reduces them), and `after_backward` writes d into the encoders' .grad. Where d is not
finite (an fp16 overflow) .grad is left as it is: the scaler found the inf in it when unscaling and skips
the step, which writing a finite-looking d after that check would defeat.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdmp_cli.methods.base import Method, positive, register
from pdmp_cli.models.encoders import init_weights


@dataclass
class MMParetoParams:
    gamma: float = 1.5  # magnitude factor of the combined encoder gradient (reference 1.5)


def min_norm_weights(g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    """Weights (w, 1 − w), w ∈ [0, 1], minimising ‖w·g1 + (1 − w)·g2‖ (MGDA for two vectors)."""
    diff = g1 - g2
    denom = float(diff.dot(diff))
    if denom == 0.0:  # identical vectors: every point of the segment is the same
        return 0.5, 0.5
    w = min(max(float((g2 - g1).dot(g2)) / denom, 0.0), 1.0)
    return w, 1.0 - w


def pareto_weights(g: torch.Tensor, g_m: torch.Tensor) -> tuple[float, float, float]:
    """(cosine, multimodal weight, unimodal weight) for one encoder: ½/½ without conflict, min-norm otherwise."""
    cos = float(F.cosine_similarity(g, g_m, dim=0))
    return (cos, 0.5, 0.5) if cos > 0 else (cos, *min_norm_weights(g, g_m))


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@register
class MMPareto(Method):
    name = "mmpareto"
    description = "MMPareto: unimodal heads; per encoder, Pareto (min-norm) weights of multimodal and unimodal gradients"
    Params = MMParetoParams
    min_modalities = 2

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        positive(cls.name, "gamma", resolved["gamma"])
        return resolved

    def setup(self) -> None:
        n = self.model.num_classes
        for m in self.model.modalities:
            self.modules[m] = nn.Linear(self.model.encoders[m].out_dim, n)
        init_weights(self.modules)
        self.encoder_params = {m: list(self.model.encoders[m].parameters()) for m in self.model.modalities}

    def loss(self, out, batch):
        losses = {"fused": F.cross_entropy(out.logits, batch.labels)}
        for m, z in out.features.items():
            losses[m] = F.cross_entropy(self.modules[m](z), batch.labels)
        return losses

    def backward(self, losses):
        trainer = self.trainer
        all_params = [p for params in self.encoder_params.values() for p in params]
        g_fused = iter(trainer.grads(losses["fused"], all_params))
        self._grads = {m: ([next(g_fused) for _ in params], trainer.grads(losses[m], params))
                       for m, params in self.encoder_params.items()}
        total = sum(losses.values())
        trainer.backward(total)
        return total

    def after_backward(self, out, batch) -> None:
        """Logs per encoder the epoch means of the two gradients' cosine, the multimodal weight, the share of conflicts."""
        cosines, weights = {}, {}
        for m, params in self.encoder_params.items():
            g, g_m = (flat(t) for t in self._grads[m])  # of the global batch (Trainer.grads), like .grad after sync
            cos, w, w_m = pareto_weights(g, g_m)
            d = 2 * w * g + 2 * w_m * g_m
            if not bool(torch.isfinite(d).all()):  # leave .grad (not finite too): the scaler skips this step
                continue
            combined = list(torch.split(d, [p.numel() for p in params]))
            combined = [c.view_as(p) for c, p in zip(combined, params)]
            grads = [p.grad for p in params]  # g + g_m, unscaled and synced
            new_norms = torch.stack(torch._foreach_norm(combined))
            old_norms = torch.stack(torch._foreach_norm(grads))
            factors = self.p.gamma * torch.where(new_norms > 0, old_norms / new_norms, 1.0).clamp(min=1.0)
            torch._foreach_mul_(combined, list(factors.to(combined[0].dtype).unbind()))
            torch._foreach_copy_(grads, combined)
            cosines[m], weights[m] = cos, w
        self.stats.add(cos=cosines, w_fused=weights, conflict={m: float(c <= 0) for m, c in cosines.items()})
        self._grads = {}
