"""OPM — On-the-fly Prediction Modulation (Wei, Li, Hu; "On-the-fly Modulation for Balanced Multimodal
Learning", TPAMI 2024), as the official code (GeWu-Lab/BML_TPAMI2024, models/Classifier.py). OGM, the
gradient half of that paper, is methods/ogm.py.

Per step, before the fusion head: s_m = Σ_i softmax(o_m,i)[y_i] from the per-modality logits of the
undropped features (summed over processes), ρ_m = s_m / mean_{k≠m} s_k (ρ_a = s_a / s_v for two
modalities, the reference's rule) and the drop probability
    q_m = clip(q_base·(1 + λ·tanh(ρ_m − 1)), 0, 1) if ρ_m > 1, else 0.
With probability p_exe (one draw per batch) dropping happens: every sample's feature z_m is zeroed
with probability q_m, independently per sample and modality, and all features are scaled by
1/(1 − θ), θ = Σ_m d_m q_m / Σ_m d_m (d_m the feature width), as the reference. The weakest modality
always has ρ ≤ 1, hence q = 0, so no sample loses every modality (the reference drops such samples;
here they cannot occur). No dropping in the first `warmup_epochs` epochs (reference: epochs 0–5).
Inference is undropped.

Random draws come from the method's own generator (seeded from the run's seed, saved for resume), so
OPM never shifts the run's other random streams; q_base = 0 or p_exe = 0 is joint training bit for bit.
Dropping acts on features, so OPM works with every fusion (concat, sum, FiLM, gated) and any M.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdmp_cli.diagnostics import modality_scores, score_ratios
from pdmp_cli.methods.base import Method, check_range, register


@dataclass
class OPMParams:
    q_base: float = 0.5  # base drop probability of a leading modality (reference 0.5)
    lam: float = 0.5  # λ: how much the lead (tanh(ρ − 1)) raises it (reference 0.5)
    p_exe: float = 0.7  # probability that a batch is modulated at all (reference 0.7)
    warmup_epochs: int = 6  # no dropping in epochs [0, warmup_epochs) (reference: epoch ≤ 5)


def drop_probabilities(ratios: dict[str, float], q_base: float, lam: float) -> dict[str, float]:
    """q_m = clip(q_base·(1 + λ·tanh(ρ_m − 1)), 0, 1) for a leading modality (ρ_m > 1), else 0."""
    return {m: (min(max(q_base * (1 + lam * math.tanh(r - 1)), 0.0), 1.0) if r > 1 else 0.0) for m, r in ratios.items()}


@register
class OPM(Method):
    name = "opm"
    description = "on-the-fly prediction modulation: drop the leading modality's features with probability from its score ratio"
    Params = OPMParams
    min_modalities = 2

    @classmethod
    def resolve_params(cls, params, config):
        resolved = super().resolve_params(params, config)
        for key in ("q_base", "p_exe"):
            check_range(cls.name, key, resolved[key], 0, 1)
        check_range(cls.name, "lam", resolved["lam"], 0)
        check_range(cls.name, "warmup_epochs", resolved["warmup_epochs"], 0)
        return resolved

    def setup(self) -> None:
        self.generator = torch.Generator(device=self.trainer.device)
        self.generator.manual_seed(self.config.seed)

    def transform_features(self, features, batch):
        names = list(features)
        with torch.no_grad():
            logits = self.model.fusion.modality_logits([features[m] for m in names])
        ratios = score_ratios(modality_scores(dict(zip(names, logits)), batch.labels, self.trainer.all_reduce))
        warm = self.epoch >= self.p.warmup_epochs
        q = drop_probabilities(ratios, self.p.q_base, self.p.lam) if warm else {m: 0.0 for m in ratios}
        neutral = self.p.p_exe == 0 or not any(q.values())
        executed = not neutral and bool(torch.rand((), generator=self.generator, device=self.trainer.device) < self.p.p_exe)
        # Logged: epoch means of ρ_m, of the q_m in force (0 in the warm-up) and the share of executed batches.
        self.stats.add(executed=float(executed), ratio=ratios, q=q)
        if not executed:
            return features
        # drawn for the global batch (Trainer.rand), so every process's generator stays in step, `executed` included
        keep = self.trainer.rand(batch, len(names), self.generator) >= torch.tensor([q[m] for m in names],
                                                                                     device=self.trainer.device)
        dims = [features[m].shape[1] for m in names]
        theta = sum(d * q[m] for d, m in zip(dims, names)) / sum(dims)
        scale = 1.0 / (1.0 - theta)
        return {m: features[m] * keep[:, i, None].to(features[m].dtype) * scale for i, m in enumerate(names)}

    def state_dict(self):
        return super().state_dict() | {"generator": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
