"""OGM / OGM-GE — On-the-fly Gradient Modulation (Peng et al., CVPR 2022), as in methods.md.

After backward, each modality's score s_m = Σ_i softmax(o_m,i)[y_i] gives ρ_m = s_m / mean_{k≠m} s_k
(the two-modality rule ρ_a = s_a/s_v for M = 2); k_m = 1 − tanh(α·ρ_m) when ρ_m > 1, else 1.
Inside epochs [start_epoch, end_epoch] (inclusive, as the reference), every 4-D gradient (conv
kernel) of encoder m is multiplied by k_m; OGM-GE then adds N(0, std(original grad)² ) noise.
Per-modality logits come from the fusion's split (exact for concat/sum, zero-masking otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from pdmp_cli.diagnostics import modality_scores, score_ratios
from pdmp_cli.methods.base import Method, check_window, in_window, positive, register


@dataclass
class OGMParams:
    alpha: float = 0.1
    start_epoch: int = 0  # modulation acts in epochs [start_epoch, end_epoch], end inclusive as the reference
    end_epoch: int = 50


def ogm_coefficients(scores: dict[str, float], alpha: float) -> tuple[dict[str, float], dict[str, float]]:
    """(ratios ρ_m, coefficients k_m) from per-modality scores."""
    ratios = score_ratios(scores)
    coeffs = {m: (1.0 - math.tanh(alpha * r) if r > 1 else 1.0) for m, r in ratios.items()}
    return ratios, coeffs


@register
class OGM(Method):
    name = "ogm"
    description = "on-the-fly gradient modulation: damp the leading modality's conv gradients by 1 − tanh(αρ)"
    Params = OGMParams
    min_modalities = 2
    noise = False

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        positive(cls.name, "alpha", resolved["alpha"])
        check_window(cls.name, resolved, inclusive_end=True)
        return resolved

    def after_backward(self, out, batch) -> None:
        """Logs the epoch means of the score ratio ρ_m and of the coefficient k_m in force."""
        scores = modality_scores(out.modality_logits, batch.labels, self.trainer.all_reduce)
        ratios, coeffs = ogm_coefficients(scores, self.p.alpha)
        active = in_window(self.epoch, self.p.start_epoch, self.p.end_epoch, inclusive_end=True)
        self.stats.add(ratio=ratios, coef=coeffs if active else {m: 1.0 for m in coeffs})
        if not active:
            return
        for m, k in coeffs.items():
            grads = [p.grad for p in self.model.encoders[m].parameters() if p.grad is not None and p.grad.dim() == 4]
            if not grads:
                continue
            if self.noise:  # as the reference: every conv kernel of every encoder, k_m = 1 included
                stds = torch._foreach_add([g.std() for g in grads], 1e-8)  # σ of the original gradient, per tensor
                noise = [torch.randn_like(g) for g in grads]  # (no fused std or randn: one call per tensor)
                torch._foreach_mul_(noise, stds)
                torch._foreach_mul_(grads, k)
                torch._foreach_add_(grads, noise)
            elif k != 1.0:
                torch._foreach_mul_(grads, k)


@register
class OGMGE(OGM):
    name = "ogm-ge"
    description = "OGM with generalisation enhancement: modulated conv gradients plus N(0, std(grad)²) noise"
    noise = True
