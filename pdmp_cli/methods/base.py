"""The hooks through which a method plugs into the one training loop (pdmp_cli/engine.py).

One training step, as the loop runs it:

    features = model.encode(batch.inputs)
    features = method.transform_features(features)        # PDMP: gradient scaling; OPM: dropping
    out      = model.head(features)                       # fused + per-modality logits
    losses   = method.loss(out, batch)                    # a tensor, or named losses (extra heads)
    loss     = method.backward(losses, model)             # sum + backward; MMPareto: one pass per loss
    method.after_backward(model, out, batch)              # OGM-GE: modulate encoder gradients
    method.before_step(optimizer); optimizer.step(); method.after_step(optimizer)

plus `setup` (extra heads, teachers, state), `on_epoch_start/end`, `predict` (inference rule),
`log` (coefficients and ratios for metrics.jsonl) and `state_dict/load_state_dict`. A method
implements only the hooks it needs; each lives in one small module registered in METHODS.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pdmp_cli.errors import PdmpError
from pdmp_cli.registry import Registry


@dataclasses.dataclass
class NoParams:
    pass


@dataclasses.dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor  # positions in the split, for methods that keep per-sample state


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    needs_ranking: ClassVar[bool] = False  # the experiment layer fills params["ranking"] from rank.json
    unimodal: ClassVar[bool] = False  # trains a one-modality model (ranking)

    def __init__(self, params: dict[str, Any], config: Any) -> None:
        self.p = self.Params(**params)
        self.config = config
        self.epoch = 0
        # Trainable modules a method adds (extra heads); optimised and checkpointed with the model.
        self.modules = nn.ModuleDict()

    # ---- configuration -------------------------------------------------------------------------
    @classmethod
    def resolve_params(cls, params: dict[str, Any], config: Any) -> dict[str, Any]:
        """Validate and complete the hyperparameters; the result is stored in the run's config."""
        hints = typing.get_type_hints(cls.Params)
        unknown = sorted(set(params) - set(hints))
        if unknown:
            known = ", ".join(sorted(hints)) or "none"
            raise PdmpError(f"method {cls.name!r} has no option {unknown[0]!r} (its options: {known})")
        typed = {k: coerce(f"{cls.name}.{k}", v, hints[k]) for k, v in params.items()}
        return dataclasses.asdict(cls.Params(**typed))

    # ---- hooks -----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any) -> None:
        pass

    def param_groups(self, model: nn.Module) -> list[dict]:
        groups = model.param_groups()
        if len(self.modules):
            groups.append({"name": f"method:{self.name}", "params": list(self.modules.parameters())})
        return groups

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def transform_features(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return features

    def loss(self, out: Any, batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
        """The training loss; methods with extra heads return named losses, e.g. {"fused": …, "audio": …}."""
        return F.cross_entropy(out.logits, batch.labels)

    def backward(self, losses: torch.Tensor | dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        """Fill the gradients; returns the scalar loss that is logged. Default: backward of the sum."""
        total = sum(losses.values()) if isinstance(losses, dict) else losses
        total.backward()
        return total

    def after_backward(self, model: nn.Module, out: Any, batch: Batch) -> None:
        pass

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def predict(self, out: Any) -> torch.Tensor:
        """Logits used for evaluation (MLA/UME-style methods override the inference rule)."""
        return out.logits

    def log(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything the method carries from one epoch to the next (running averages, prototypes, extra
        heads), as tensors and plain values: saved every epoch for resume and with the selected checkpoint.
        State rebuilt by `setup` or reset by `on_epoch_start` need not be saved (OGM's per-epoch sums, PDMP's γ)."""
        return {"modules": self.modules.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.modules.load_state_dict(state["modules"])


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the annotated type (ints are accepted for floats); a one-line error otherwise."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    if value is None and len(options) < len(typing.get_args(hint)):
        return None
    for option in options:
        base = typing.get_origin(option) or option
        if isinstance(value, bool) != (base is bool):
            continue
        if base is float and isinstance(value, (int, float)):
            return float(value)
        if base is int and isinstance(value, int):
            return value
        if base in (str, list) and isinstance(value, base):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise PdmpError(f"{name} takes {wanted} (got {value!r})")


METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls.name)(cls)


def positive(name: str, value: float) -> None:
    if not 0 < value < float("inf"):
        raise PdmpError(f"--{name.replace('_', '-')} must be > 0 and finite (got {value})")
