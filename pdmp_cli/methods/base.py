"""The hooks through which a method plugs into the one training loop (pdmp_cli/engine.py).

The engine builds the model, a `Trainer` (model, data, optimizer and the operations whose details it
owns: autocast, scaled backward, gradient synchronisation across processes, the optimizer step) and
calls `method.bind(trainer)`, which stores it as `self.trainer` and runs `setup()`. Then, per batch,
it calls `method.step(batch)`, whose default is the standard step:

    with trainer.autocast():
        features = model.encode(batch.inputs)
        features = self.transform_features(features, batch)  # PDMP, AGM: gradient scaling; OPM: dropping
        out      = model.head(features)                  # fused + per-modality logits
        losses   = self.loss(out, batch)                 # a tensor, or named losses (extra heads)
    loss = self.backward(losses)                         # trainer.backward of the sum; MMPareto: per-loss grads
    trainer.sync_gradients()                             # unscaled (fp16) and averaged over processes
    self.after_backward(out, batch)                      # OGM-GE: modulate encoder gradients
    trainer.optimizer_step()

A method that needs a different step (MLA's alternating unimodal updates) overrides `step` and builds
it from the same trainer operations. Other hooks: `setup` (extra heads, teachers, state),
`on_epoch_start/end` (PDMP's lr mode scales the encoders' learning rates for the epoch and restores them
before the scheduler steps and state.pt is saved), `predict` (inference rule), `modality_logits` (the
per-modality logits evaluation reports), `log` (coefficients and ratios for metrics.jsonl: by default the
epoch means of what the method added to `self.stats`, an EpochMeans) and `state_dict/load_state_dict`.
Gradients a method reads or writes in `after_backward` are always the true, unscaled gradients, already
summed over every process; statistics a method computes from its own batch (OGM's scores) go through
`trainer.all_reduce` so that N processes compute what one process with the whole batch would. A method
implements only the hooks it needs; each lives in one small module registered in METHODS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pdmp_cli import distributed
from pdmp_cli.errors import PdmpError
from pdmp_cli.registry import Registry


@dataclasses.dataclass
class NoParams:
    pass


class Trainer:
    """The run a method is part of. The engine owns how backward, synchronisation and stepping work
    (mixed precision, several processes); methods call these operations and never re-implement them."""

    amp_dtype: torch.dtype | None = None  # autocast dtype (bf16/fp16) set by the engine; None: full precision

    def __init__(self, model: nn.Module, data: Any, config: Any, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None, scaler: Any = None,
                 unimodal_models: typing.Callable[[str], nn.Module] | None = None) -> None:
        self.model, self.data, self.config, self.device = model, data, config, device
        self._unimodal_models = unimodal_models  # modality → rank's trained model (engine: from its checkpoint)
        self.optimizer = optimizer  # built by the engine after setup (setup may add trainable modules)
        self.scaler = scaler  # torch.amp.GradScaler under fp16 autocast, else None
        self.world_size, self.rank = distributed.world().size, distributed.world().rank
        # This process's share n_r / N of the global batch (set by the engine each step): each process
        # back-propagates share × its mean loss, so that the sum over processes is the global-batch mean.
        self.batch_share = 1.0
        # (global batch size, this process's rows of it or None for all) of the step in progress (set by the
        # engine each step, data.pipeline.global_rows); None outside the engine's loop (bench): the batch is all.
        self.global_rows: tuple[int, torch.Tensor | None] | None = None
        self._synced = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def grad_scale(self) -> float:
        """The factor every gradient carries between backward and sync_gradients (1 without fp16 scaling)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def _shared(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.batch_share if self.world_size > 1 else loss

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        loss = self._shared(loss)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=retain_graph)

    def grads(self, loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = True) -> list[torch.Tensor]:
        """Unscaled gradients of `loss` (of the global batch) w.r.t. `params` without touching .grad (zeros for
        unused params)."""
        loss = self._shared(loss)
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        grads = torch.autograd.grad(scaled, params, retain_graph=retain_graph, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        distributed.all_reduce_many(grads)
        return torch._foreach_div(grads, self.grad_scale) if self.scaler is not None else grads

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._synced = False

    def sync_gradients(self) -> None:
        """Make .grad the true gradient of the whole (global) batch: unscale, then average over processes."""
        if self._synced:
            return
        if self.world_size > 1:  # before unscaling, so that an inf anywhere makes every process skip the step
            self._reduce_all_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._synced = True

    def _reduce_all_gradients(self) -> None:
        """Sum every parameter's gradient over processes. A gradient missing here (a branch this share did
        not reach) may exist on another process, so every process reduces every parameter (zeros for a
        missing one): the buckets then hold the same tensors everywhere. A parameter no process has a
        gradient for gets None back, so the optimizer skips it as one process would."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        present = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_many([p.grad for p in params] + [present])
        for p, count in zip(params, present.tolist()):
            if count == 0:
                p.grad = None

    def optimizer_step(self) -> None:
        self.sync_gradients()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def rand(self, batch: "Batch", cols: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform [len(batch), cols] per-sample draws: drawn for the whole global batch and cut to this process's
        rows, so every process's generator advances alike and N processes draw what one does (one process:
        torch.rand((len(batch), cols)) as is)."""
        n, rows = self.global_rows if self.global_rows is not None else (len(batch.labels), None)
        u = torch.rand((n, cols), generator=generator, device=self.device)
        return u if rows is None else u[rows.to(self.device)]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over processes, in place (the identity in a single process)."""
        return distributed.all_reduce(tensor)

    @torch.no_grad()
    def forward_split(self, split: str, shard: bool = False) -> Iterator[tuple["Batch", Any]]:
        """(batch, model output) for every batch of a split, in eval mode and without gradients (PMR's class
        prototypes; statistics on the validation split); the model's train/eval mode is restored afterwards.
        Every process reads the whole split, or with `shard` only its contiguous part (N processes share the
        pass instead of each repeating it), and the caller then sums what it computed with `all_reduce`. Without
        data (the step benchmark) there are no batches."""
        from pdmp_cli.data.pipeline import batches  # the training reader; imported here: it imports this module

        if self.data is None:
            return
        data = self.data.splits[split]
        order = distributed.shard_range(len(data)) if shard and self.world_size > 1 else None
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches(data, self.model.modalities, self.config.eval_batch_size, self.device, order):
                with self.autocast():
                    yield batch, self.model(batch.inputs)
        finally:
            self.model.train(was_training)

    def split_mean(self, split: str, sums: Callable[[Any, "Batch"], dict[str, torch.Tensor]]) -> dict[str, float]:
        """Per-sample means over a whole split of named per-batch scalar sums, `sums(model output, batch)` (e.g.
        summed per-branch losses), read through forward_split (G-Blending's train and validation losses). The
        processes share the pass when each has a sample (one with none would not know the names to reduce)."""
        shard = self.data is not None and len(self.data.splits[split]) >= self.world_size
        totals: dict[str, torch.Tensor] = {}
        seen = 0
        for batch, out in self.forward_split(split, shard):
            seen += len(batch.labels)
            for name, value in sums(out, batch).items():
                totals[name] = totals.get(name, 0.0) + value.detach().double()
        if shard and self.world_size > 1:
            names = sorted(totals)  # the same on every process: each summed at least one batch
            counted = torch.tensor(float(seen), dtype=torch.float64, device=self.device)
            merged = self.all_reduce(torch.stack([*(totals[n] for n in names), counted]))
            totals, seen = dict(zip(names, merged[:-1])), float(merged[-1])
        return {name: float(total) / seen for name, total in totals.items()}

    def unimodal_model(self, modality: str) -> nn.Module:
        """The unimodal model `pdmp rank` trained for `modality` (methods with needs_unimodal_models), on the
        run's device, frozen, in eval mode. Building it draws no random numbers from the run's generators."""
        if self._unimodal_models is None:
            raise PdmpError(f"method {self.config.method.name!r} asked for unimodal models, but this run has none")
        return self._unimodal_models(modality)


@dataclasses.dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor  # positions in the split, for methods that keep per-sample state


class EpochMeans:
    """Per-epoch means of what a method logs each step: `add(executed=1.0, ratio={"audio": 1.2, …}, coef={…})`
    adds one step; a mapping is logged as prefix/key, grouped per key after the plain values ({"executed": …,
    "ratio/audio": …, "coef/audio": …, "ratio/visual": …}). `means()` divides each name's sum by the steps
    that logged it (a step may leave one out: MMPareto's skipped, non-finite ones). Values may be device
    tensors (no host sync per step); their sums are read once, as Python floats."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, **groups: Any) -> None:
        mappings = {prefix: value for prefix, value in groups.items() if isinstance(value, Mapping)}
        items = [(name, value) for name, value in groups.items() if name not in mappings]
        for key in dict.fromkeys(k for mapping in mappings.values() for k in mapping):
            items += [(f"{prefix}/{key}", mapping[key]) for prefix, mapping in mappings.items() if key in mapping]
        for name, value in items:
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: (v.item() if isinstance(v, torch.Tensor) else v) / self.counts[k] for k, v in self.sums.items()}


def run_modalities(config: Any) -> list[str]:
    """The modalities a run trains on: the configured ones, else all of its dataset's."""
    from pdmp_cli.data import get_dataset

    return list(config.modalities or get_dataset(config.data.dataset).modalities_of(config.data))


UNUSED_FUSION = "concat"  # the fusion recorded for (and built, unused, by) a method with uses_fusion False


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    needs_ranking: ClassVar[bool] = False  # the experiment layer fills params["ranking"] from rank.json
    # The experiment layer fills params["unimodal_sha256"] / ["unimodal_source"] with rank's checkpoints of the
    # run's seed; the method gets the models from trainer.unimodal_model(m) (UME, UMT).
    needs_unimodal_models: ClassVar[bool] = False
    trains: ClassVar[bool] = True  # False: nothing to train (UME); the engine evaluates once, as epoch 0
    unimodal: ClassVar[bool] = False  # trains a one-modality model (ranking)
    # False: the model's fusion is never used (MLA's shared head, UME's ensemble); its runs are built with
    # UNUSED_FUSION whatever --fusion says, so a grid over fusions trains them once instead of once per fusion.
    uses_fusion: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 1  # 2 for methods whose rule compares or balances modalities

    def __init__(self, params: dict[str, Any], config: Any) -> None:
        self.p = self.Params(**params)
        self.config = config
        self.epoch = 0
        self.stats = EpochMeans()  # what `log` reports; a new one every epoch
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
        resolved = dataclasses.asdict(cls.Params(**typed))
        modalities = run_modalities(config)
        if len(modalities) < cls.min_modalities:
            raise PdmpError(f"{cls.name} balances modalities, so it needs at least {cls.min_modalities} (this run has "
                            f"{len(modalities)}: {', '.join(modalities)}); train it on more modalities, or use joint")
        if cls.needs_unimodal_models:
            check_unimodal_models(cls.name, resolved, modalities)
        return resolved

    # ---- binding and the step ---------------------------------------------------------------------
    def bind(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.setup()
        self.modules.to(trainer.device)

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    def step(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        """One training step on `batch`; returns (logged loss, model output)."""
        trainer = self.trainer
        with trainer.autocast():
            out = self.model.head(self.transform_features(self.model.encode(batch.inputs), batch))
            losses = self.loss(out, batch)
        trainer.zero_grad()
        loss = self.backward(losses)
        trainer.sync_gradients()
        self.after_backward(out, batch)
        trainer.optimizer_step()
        return loss, out

    # ---- hooks -----------------------------------------------------------------------------------
    def setup(self) -> None:
        pass

    def param_groups(self) -> list[dict]:
        groups = self.model.param_groups()
        if len(self.modules):
            groups.append({"name": f"method:{self.name}", "params": list(self.modules.parameters())})
        return groups

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.stats = EpochMeans()

    def transform_features(self, features: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return features

    def loss(self, out: Any, batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
        """The training loss; methods with extra heads return named losses, e.g. {"fused": …, "audio": …}."""
        return F.cross_entropy(out.logits, batch.labels)

    def backward(self, losses: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Fill the gradients; returns the scalar loss that is logged. Default: backward of the sum."""
        total = sum(losses.values()) if isinstance(losses, dict) else losses
        self.trainer.backward(total)
        return total

    def after_backward(self, out: Any, batch: Batch) -> None:
        """Gradients here are unscaled and summed over processes; modulate them in place."""

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def predict(self, out: Any) -> torch.Tensor:
        """Logits used for evaluation (MLA/UME-style methods override the inference rule)."""
        return out.logits

    def modality_logits(self, out: Any) -> dict[str, torch.Tensor]:
        """Per-modality logits that evaluation reports (modality accuracy, score ratio): by default the
        fusion's split; a method whose own heads classify each modality (MLA's shared head) returns those."""
        return out.modality_logits

    def log(self) -> dict[str, float]:
        """What metrics.jsonl records for the epoch: the means of `self.stats`; methods add keys by overriding
        and calling super."""
        return self.stats.means()

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
        if base in (int, bool) and isinstance(value, int):  # bool: --set KEY=true/false (JSON)
            return value
        if base in (str, list, dict) and isinstance(value, base):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise PdmpError(f"{name} takes {wanted} (got {value!r})")


METHODS: Registry[type[Method]] = Registry("method")

# Parameters the experiment layer fills in (ranking, rank's checkpoints and where they came from): not
# hyperparameters, so they are left out of run names and of `pdmp list methods`. `*_source` fields are
# provenance (paths) and are left out of the config hash too.
PROVIDED_PARAMS = ("ranking", "ranking_source", "unimodal_sha256", "unimodal_source")


def register(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls.name)(cls)


def check_unimodal_models(name: str, params: dict, modalities: list[str]) -> None:
    """Methods built on rank's unimodal models need one per modality of the run (filled by the experiment layer)."""
    given = params.get("unimodal_sha256") or {}
    if sorted(given) != sorted(modalities):
        raise PdmpError(f"{name} needs the unimodal models of {', '.join(modalities)} trained by `pdmp rank` "
                        f"(got {', '.join(sorted(given)) or 'none'}); run `pdmp rank` with this run's seed first")


# ---- hyperparameter checks: one error format, naming the key and how to set it --------------------------

def invalid(method: str, key: str, value: Any, requirement: str) -> PdmpError:
    return PdmpError(f"{method}.{key} must be {requirement} (got {value!r}); set it with --set {method}.{key}=VALUE")


def check_range(method: str, key: str, value: float, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """A one-line error unless lo ≤ value ≤ hi (< with lo_open / hi_open); without hi a float must be finite."""
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (
        math.isfinite(value) if hi is None else (value < hi if hi_open else value <= hi))
    if not ok:  # NaN fails every comparison
        if lo is not None and hi is not None:
            requirement = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            requirement = f"{'>' if lo_open else '>='} {lo:g}" + ("" if isinstance(value, int) else " and finite")
        else:
            requirement = f"{'<' if hi_open else '<='} {hi:g}"
        raise invalid(method, key, value, requirement)


def positive(method: str, key: str, value: float) -> None:
    check_range(method, key, value, 0, lo_open=True)


def check_choice(method: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise invalid(method, key, value, "one of " + ", ".join(choices))


def check_window(method: str, params: dict[str, Any], inclusive_end: bool) -> None:
    """start_epoch >= 0 and an end (None: open) at or after it (inclusive_end) or after it (exclusive)."""
    start, end = params["start_epoch"], params["end_epoch"]
    check_range(method, "start_epoch", start, 0)
    if end is not None and (end < start if inclusive_end else end <= start):
        raise invalid(method, "end_epoch", end, f"{'>=' if inclusive_end else '>'} start_epoch ({start})")


def in_window(epoch: int, start: int, end: int | None, inclusive_end: bool) -> bool:
    """Whether `epoch` lies in [start, end] (inclusive_end) or [start, end); end None: no end."""
    return epoch >= start and (end is None or (epoch <= end if inclusive_end else epoch < end))
