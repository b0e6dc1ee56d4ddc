"""Typed configuration: defaults, dataset presets, overrides, JSON round trip, hash.

Resolution order (later wins): dataclass defaults → the dataset's training preset → the method's
dataset preset → what the user said. `resolve_config` is called once per run; the result is saved
into the run directory and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pdmp_cli.errors import PdmpError

SCHEMA_VERSION = 1


@dataclass
class DataConfig:
    dataset: str = "av-digits"
    preset: str | None = None  # the dataset's data preset; None = its default
    samples: int | None = None  # generated datasets only: number of clips (None = preset default)
    root: str = "datasets"  # feature caches (and generated raw data) live under <root>/<dataset>/
    raw_root: str | None = None  # real datasets: the downloaded files (None = <root>/<dataset>/raw)
    # recipe options as given (`--recipe NAME`, `--recipe key=value`); the dataset resolves and hashes them
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    encoder: str = "auto"  # auto: resnet18 when training on CUDA, small on CPU (resolved and recorded)
    fusion: str = "concat"
    width: int = 16  # `small` encoder: channels of the first conv (doubled per layer); resnet18 ignores it


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    scheduler: str = "step"  # step | cosine | none
    step_epoch: int = 70  # StepLR: multiply the lr by step_gamma every step_epoch epochs
    step_gamma: float = 0.1
    epochs: int = 100
    batch_size: int = 64


@dataclass
class MethodConfig:
    name: str = "joint"
    # The method's own hyperparameters, validated and completed by the method's `Params` dataclass.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """Training-time augmentation of frame modalities, on batched tensors where training runs (spectrograms,
    flow and evaluation are never augmented). Part of the config hash when on."""
    crop: bool = False  # random resized crop per sample, resized back to the cached size
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # crop area / image area (torchvision's default)
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect ratio w/h
    flip: bool = False  # horizontal flip with probability 1/2

    @property
    def active(self) -> bool:
        return self.crop or self.flip


@dataclass
class SpeedConfig:
    """How fast a run goes (like `device`, not part of the config hash; the resolved precision is in result.json)."""
    precision: str = "auto"  # auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 on CPU | fp32 | bf16 | fp16
    channels_last: bool | None = None  # None: on CUDA
    cudnn_benchmark: bool | None = None  # None: on CUDA, off under --deterministic
    compile: bool = False  # torch.compile the encoders
    prefetch: int = 2  # batches a background thread reads ahead (0: read inside the loop)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    seed: int = 0
    modalities: list[str] | None = None  # None = all of the dataset's modalities
    select_split: str = "val"  # split that selects the checkpoint; "test" is the lineage protocol
    select_metric: str = "accuracy"  # accuracy | macro_f1
    device: str = "auto"  # auto = cuda when available, else cpu
    eval_batch_size: int = 256
    deterministic: bool = False  # torch.use_deterministic_algorithms (identical numbers on CUDA too, slower)
    # Several processes (torchrun, --nproc): BatchNorm statistics of the global batch, as one process has them
    sync_bn: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        try:
            return cls(
                data=DataConfig(**d["data"]),
                model=ModelConfig(**d["model"]),
                optim=OptimConfig(**d["optim"]),
                method=MethodConfig(**d["method"]),
                augment=AugmentConfig(**d.get("augment", {})),  # configs written before these groups existed
                speed=SpeedConfig(**d.get("speed", {})),
                **{k: v for k, v in d.items() if k not in ("data", "model", "optim", "method", "augment", "speed")},
            )
        except (KeyError, TypeError) as exc:
            raise PdmpError(f"invalid run config ({exc}); was it written by another pdmp version?") from None

    def hash(self) -> str:
        """Identity of what is trained: everything except where and how it runs and where files live."""
        d = self.to_dict()
        d.pop("device")
        d.pop("deterministic")
        if d["sync_bn"]:  # the default trains what one process trains; only the per-process variant is another setting
            d.pop("sync_bn")
        d.pop("speed")
        if not self.augment.active:
            d.pop("augment")  # runs without augmentation keep the hashes they had before it existed
        d["data"].pop("root")
        d["data"].pop("raw_root")  # where the files are, not what they are
        if not d["data"]["recipe"]:
            d["data"].pop("recipe")  # hashes of runs on default recipes stay as before recipe options existed
        for key in [k for k in d["method"]["params"] if k.endswith("_source")]:  # provenance (paths, dates);
            d["method"]["params"].pop(key)  # what they point to counts (the ranking, checkpoint hashes)
        return stable_hash(d)

    def setting_hash(self) -> str:
        """Identity of the experimental setting: the config hash without the seed and what comes with each
        seed (rank's unimodal models of that seed, which UME and UMT use), so that seeds are averaged."""
        params = {k: v for k, v in self.method.params.items() if k not in PER_SEED_PARAMS}
        return dataclasses.replace(self, seed=0, method=dataclasses.replace(self.method, params=params)).hash()


def stable_hash(obj: Any, length: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# Method parameters the experiment layer fills per seed (rank's unimodal checkpoints of the run's seed):
# part of a run's identity, not of its setting.
PER_SEED_PARAMS = ("unimodal_sha256", "unimodal_source")

SELECT_METRICS = ("accuracy", "macro_f1")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("step", "cosine", "none")


def apply_overrides(obj: Any, overrides: dict[str, Any], where: str) -> None:
    """Set dataclass fields from a flat dict, refusing unknown names."""
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        if key not in names:
            raise PdmpError(f"unknown {where} option {key!r}; known: {', '.join(sorted(names))}")
        setattr(obj, key, value)


def resolve_config(
    *,
    dataset: str,
    method: str,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    method_params: dict[str, Any] | None = None,
    augment: dict[str, Any] | None = None,
    speed: dict[str, Any] | None = None,
    **run: Any,
) -> RunConfig:
    """Build a validated RunConfig. Only options the user actually gave should be passed."""
    from pdmp_cli.data import get_dataset  # dataset specs are plain metadata, no torch
    from pdmp_cli.methods import get_method

    spec = get_dataset(dataset)
    method_cls = get_method(method)
    cfg = RunConfig(method=MethodConfig(name=method))
    cfg.data.dataset = dataset
    apply_overrides(cfg.data, data or {}, "data")
    if cfg.data.preset is None:
        cfg.data.preset = spec.default_preset
    apply_overrides(cfg.optim, spec.train_defaults, "optim")
    apply_overrides(cfg.model, spec.model_defaults, "model")
    apply_overrides(cfg.model, model or {}, "model")
    apply_overrides(cfg.optim, optim or {}, "optim")
    apply_overrides(cfg.augment, spec.augment_defaults, "augment")
    apply_overrides(cfg.augment, augment or {}, "augment")
    apply_overrides(cfg.speed, speed or {}, "speed")
    apply_overrides(cfg, run, "run")
    if cfg.model.encoder == "auto":
        cfg.model.encoder = "resnet18" if on_cuda(cfg.device) else "small"
    params = {**spec.method_defaults.get(method, {}), **(method_params or {})}
    cfg.method.params = method_cls.resolve_params(params, cfg)
    validate(cfg, spec)
    return cfg


def on_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def validate(cfg: RunConfig, spec: Any) -> None:
    o = cfg.optim
    seed_ok = isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed < 2**32
    checks = [
        (seed_ok, f"--seed must be an integer in [0, 2^32) (got {cfg.seed!r})"),
        (o.lr > 0 and math.isfinite(o.lr), f"--lr must be > 0 and finite (got {o.lr})"),
        (o.epochs >= 1, f"--epochs must be >= 1 (got {o.epochs})"),
        (o.batch_size >= 2, f"--batch-size must be >= 2: BatchNorm cannot train on one sample (got {o.batch_size})"),
        (o.weight_decay >= 0 and math.isfinite(o.weight_decay), f"--weight-decay must be >= 0 and finite (got {o.weight_decay})"),
        (o.step_epoch >= 1, f"--step-epoch must be >= 1 (got {o.step_epoch})"),
        (o.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {o.optimizer!r})"),
        (o.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)} (got {o.scheduler!r})"),
        (cfg.select_split in ("val", "test"), f"--select-split must be val or test (got {cfg.select_split!r})"),
        (cfg.select_metric in SELECT_METRICS, f"--select-metric must be accuracy or macro_f1 (got {cfg.select_metric!r})"),
        (cfg.model.width >= 1, f"--width must be >= 1 (got {cfg.model.width})"),
        (cfg.speed.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)} (got {cfg.speed.precision!r})"),
        (cfg.speed.prefetch >= 0, f"--prefetch must be >= 0 (got {cfg.speed.prefetch})"),
        (range_ok(cfg.augment.crop_scale, 1.0), f"augment crop_scale must be [min, max] with 0 < min <= max <= 1 (got {cfg.augment.crop_scale})"),
        (range_ok(cfg.augment.crop_ratio, math.inf), f"augment crop_ratio must be [min, max] with 0 < min <= max (got {cfg.augment.crop_ratio})"),
        (cfg.data.samples is None or cfg.data.samples >= 30, f"--samples must be >= 30 (got {cfg.data.samples})"),
    ]
    for ok, message in checks:
        if not ok:
            raise PdmpError(message)
    if os.path.exists(cfg.data.root) and not os.path.isdir(cfg.data.root):
        raise PdmpError(f"--data-dir {cfg.data.root} is a file, not a folder; give the folder that holds the datasets")
    from pdmp_cli.data.base import check_preset

    check_preset(spec, cfg.data.preset)
    available = spec.modalities_of(cfg.data)
    if cfg.modalities is not None:
        unknown = [m for m in cfg.modalities if m not in available]
        if unknown:
            raise PdmpError(
                f"{spec.name} has no modality {unknown[0]!r}; its modalities are {', '.join(available)}"
            )
    from pdmp_cli.models import ENCODERS, FUSIONS  # names fail here, before any data is built

    ENCODERS.get(cfg.model.encoder)
    FUSIONS.get(cfg.model.fusion).check_modalities(len(cfg.modalities or available))


def range_ok(bounds: Any, top: float) -> bool:
    return (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
            and 0 < bounds[0] <= bounds[1] <= top)


def dataset_key(data: DataConfig, default_preset: str | None) -> str:
    """Folder name of a dataset variant under the runs directory: `av-digits`, `av-digits@balanced`."""
    key = data.dataset
    if data.preset and data.preset != default_preset:
        key += f"@{data.preset}"
    if data.samples is not None:
        key += f"@n{data.samples}"
    if data.recipe:  # another recipe is another dataset variant: its runs never mix with the default's
        key += f"@r{stable_hash(data.recipe, 8)}"
    return key
