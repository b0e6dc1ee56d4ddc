"""AGM — Adaptive Gradient Modulation (Li et al., "Boosting Multi-modal Model Performance with Adaptive
Gradient Modulation", ICCV 2023), as in methods.md: the formulas of the authors' reference code, applied in
pdmp's step, which differs from the reference's training loop in the ways listed under Choices.

Per training step, with the batch's encoder features z_1..z_M and the fusion head F:
1. Shapley unimodal outputs. v(S) = F(z with every modality outside S set to 0) (zero masking);
   φ_m = Σ_{S ⊆ N∖{m}} |S|!(M−|S|−1)!/M! · (v(S ∪ {m}) − v(S)), exact over all 2^M subsets (M ≤ 8;
   more modalities are refused). For M = 2: φ_a = ½[(F(a,v) − F(0,v)) + (F(a,0) − F(0,0))].
2. Score s_m = mean over the batch of −log softmax(φ_m)[y] (probabilities clamped at 1e-8, as the
   reference): lower is better. Sums and counts go through trainer.all_reduce (global batch).
3. ratio_m = exp(mean_{k≠m} s_k − s_m) (for M = 2 the reference's exp(s_v − s_a)); the same of the running
   averages S_m gives optimal_ratio_m; coeff_m = exp(α · min(optimal_ratio_m − ratio_m, 10)).
   S_m is the mean of s_m over every training step so far (not reset per epoch; saved for resume),
   updated after the coefficient is computed, as the reference.
4. coeff_m multiplies the gradient flowing into encoder m (pdmp.ScaleGrad) in epochs [start_epoch,
   end_epoch] (end inclusive, as the reference); 1 outside. Steps 1–3 run in transform_features, on the
   step's own features (detached), and the coefficients go straight into ScaleGrad.
Choices (where pdmp differs from the reference training loop):
- Masking: the reference zeroes a modality's *input* and runs the whole network (encoders and head) in
  eval mode under no_grad for each masked pass; pdmp zeroes the *features* of the training forward
  (train mode: the features the step trains on) and runs only the fusion head per subset, so one
  encoder pass serves all 2^M subsets and the masking needs nothing fusion-specific.
- Where the coefficient acts: the reference's hooks scale the gradient of each modality's whole
  output, head included (for a linear head the head's gradient gets (c_a + c_v)/2); pdmp scales the
  gradient into encoder m by its own coeff_m and leaves the fusion head's gradient unscaled.
- When: the reference applies a step's coefficient in the next step's backward (one step late) and
  skips modulation on each epoch's first step (a logging artefact); pdmp applies the coefficient of the
  current batch in the same step, every step.
- α defaults to 1.0 (BalanceBenchmark's default; the paper tunes it per dataset).
Every fusion; any M from 2 to 8.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from pdmp_cli.errors import PdmpError
from pdmp_cli.methods.base import Method, check_window, in_window, positive, register, run_modalities
from pdmp_cli.methods.pdmp import ScaleGrad

MAX_EXACT_MODALITIES = 8  # 2^8 head forwards per step; beyond that exact Shapley values get costly
COEFF_EXPONENT_CAP = 10.0


@dataclass
class AGMParams:
    alpha: float = 1.0
    start_epoch: int = 0  # modulation acts in epochs [start_epoch, end_epoch], end inclusive as the reference
    end_epoch: int = 50


def shapley_outputs(fusion, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exact Shapley values φ_m of the zero-masked fusion outputs (one tensor per modality, like the logits)."""
    n = len(features)
    zeros = [torch.zeros_like(z) for z in features]
    value = {}
    for size in range(n + 1):
        for subset in itertools.combinations(range(n), size):
            value[subset] = fusion([features[k] if k in subset else zeros[k] for k in range(n)])
    phis = []
    for m in range(n):
        phi = torch.zeros_like(value[()])
        for subset in value:
            if m in subset:
                continue
            weight = math.factorial(len(subset)) * math.factorial(n - len(subset) - 1) / math.factorial(n)
            phi = phi + weight * (value[tuple(sorted(subset + (m,)))] - value[subset])
        phis.append(phi)
    return phis


def agm_coefficients(scores: dict[str, float], running: dict[str, float], alpha: float
                     ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(ratio_m, optimal_ratio_m, coeff_m) from the batch's scores s_m and their running averages S_m."""
    def ratio(s: dict[str, float], m: str) -> float:
        others = [s[k] for k in s if k != m]
        return math.exp(sum(others) / len(others) - s[m])

    ratios = {m: ratio(scores, m) for m in scores}
    optimal = {m: ratio(running, m) for m in running}
    coeffs = {m: math.exp(alpha * min(optimal[m] - ratios[m], COEFF_EXPONENT_CAP)) for m in scores}
    return ratios, optimal, coeffs


@register
class AGM(Method):
    name = "agm"
    description = ("adaptive gradient modulation: Shapley unimodal outputs → coeff_m = exp(α·min(optimal ratio − "
                   "ratio, 10)) on the gradient into encoder m")
    Params = AGMParams
    min_modalities = 2

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        positive(cls.name, "alpha", resolved["alpha"])
        check_window(cls.name, resolved, inclusive_end=True)
        n = len(run_modalities(config))
        if n > MAX_EXACT_MODALITIES:
            raise PdmpError(f"agm computes exact Shapley values for at most {MAX_EXACT_MODALITIES} modalities "
                            f"(got {n}); train it on fewer modalities")
        return resolved

    def setup(self) -> None:
        modalities = self.model.modalities
        self.running = torch.zeros(len(modalities), dtype=torch.float64)  # S_m, on the host (plain numbers)
        self.steps_done = 0

    def transform_features(self, features, batch):
        modalities = self.model.modalities
        with torch.no_grad():
            phis = shapley_outputs(self.model.fusion, [features[m].detach() for m in modalities])
            true = [torch.softmax(phi.float(), dim=1).gather(1, batch.labels[:, None]).clamp_min(1e-8) for phi in phis]
            sums = torch.stack([-p.log().sum() for p in true] + [torch.tensor(float(len(batch.labels)), device=phis[0].device)])
            sums = self.trainer.all_reduce(sums).tolist()
        scores = {m: s / sums[-1] for m, s in zip(modalities, sums)}
        running = dict(zip(modalities, self.running.tolist()))
        ratios, _, coeffs = agm_coefficients(scores, running, self.p.alpha)
        if not in_window(self.epoch, self.p.start_epoch, self.p.end_epoch, inclusive_end=True):
            coeffs = {m: 1.0 for m in modalities}
        self.steps_done += 1
        self.running += (torch.tensor([scores[m] for m in modalities], dtype=torch.float64) - self.running) / self.steps_done
        self.stats.add(ratio=ratios, coef=coeffs)
        return {m: ScaleGrad.apply(z, coeffs[m]) for m, z in features.items()}

    def log(self) -> dict[str, float]:
        """Epoch means of ratio_m and of coeff_m in force, and the running scores S_m."""
        return super().log() | {f"running_score/{m}": s for m, s in zip(self.model.modalities, self.running.tolist())}

    def state_dict(self):
        return super().state_dict() | {"running": self.running.clone(), "steps_done": self.steps_done}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.running = state["running"].clone()
        self.steps_done = int(state["steps_done"])
