"""Shared data types, the dataset registry and `load_dataset`.

Every modality's arrays are [N, T, C, H, W] (audio: T=1, C=1, H=mel bins, W=frames), so encoders
and augmentations treat all modalities alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pdmp_cli.config import DataConfig, stable_hash
from pdmp_cli.errors import PdmpError
from pdmp_cli.registry import Registry


@dataclass
class Split:
    inputs: dict[str, np.ndarray]  # modality -> read-only memmap [N, T, C, H, W]
    labels: np.ndarray  # int64 [N]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FeatureCache:
    path: Path
    manifest: dict
    recipe_hash: str
    modalities: list[str]
    classes: list[str]
    splits: dict[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def norm_stats(self, modality: str) -> tuple[float, float]:
        stats = self.manifest["norm_stats"][modality]
        return float(stats["mean"]), float(stats["std"])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    modalities: tuple[str, ...]
    presets: dict[str, dict]  # data presets (generation parameters); {} if none
    default_preset: str | None
    train_defaults: dict  # OptimConfig overrides
    model_defaults: dict  # ModelConfig overrides
    method_defaults: dict  # method name -> hyperparameter overrides
    build: Callable[..., FeatureCache]  # (cfg, quiet, workers=None, strict=False) -> ready cache
    # cfg -> everything that determines the features; its stable hash names the cache. Cheap: no I/O.
    recipe: Callable[[DataConfig], dict] | None = None
    # datasets whose modalities come from the data (custom manifests): cfg -> modality names
    modalities_for: Callable[[DataConfig], tuple[str, ...]] | None = None
    # raw layout checks without decoding (`pdmp prepare --check`): cfg -> per-split, per-class counts
    check: Callable[[DataConfig], dict] | None = None
    augment_defaults: dict = dataclasses.field(default_factory=dict)  # AugmentConfig overrides (training-time)

    def modalities_of(self, cfg: DataConfig) -> tuple[str, ...]:
        return self.modalities_for(cfg) if self.modalities_for else self.modalities


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS.get(name)


def check_preset(spec: DatasetSpec, preset: str | None) -> None:
    """A preset the dataset has (None where it has none: real datasets vary by recipe, not preset)."""
    if preset is None and not spec.presets or preset in spec.presets:
        return
    fix = (f"choose one of {', '.join(spec.presets)}" if spec.presets else
           f"{spec.name} has no presets: leave out --preset (its variants are recipes: --recipe)")
    raise PdmpError(f"unknown preset {preset!r} for {spec.name}; {fix}")


def _with_default_preset(cfg: DataConfig, spec: DatasetSpec) -> DataConfig:
    if cfg.preset is None:
        cfg = dataclasses.replace(cfg, preset=spec.default_preset)
    check_preset(spec, cfg.preset)
    return cfg


def load_dataset(cfg: DataConfig, quiet: bool = False, workers: int | None = None, strict: bool = False) -> FeatureCache:
    """The ready feature cache for `cfg`, generating and preparing it first when missing.

    `workers` processes decode clips (None: one per core, at most 8); `strict` refuses bad files.
    """
    spec = get_dataset(cfg.dataset)
    cache = spec.build(_with_default_preset(cfg, spec), quiet, workers=workers, strict=strict)
    skipped = cache.manifest.get("skipped") or []
    if strict and skipped:  # a cache prepared earlier without --strict
        raise PdmpError(f"--strict: the existing cache {cache.path} left out {len(skipped)} clip(s), first "
                        f"{skipped[0]['path']} ({skipped[0]['reason']}); fix them and delete that folder to prepare again")
    return cache


def recipe_hash_for(cfg: DataConfig) -> str:
    """The recipe hash `load_dataset(cfg)` would produce, without generating or reading anything."""
    spec = get_dataset(cfg.dataset)
    cfg = _with_default_preset(cfg, spec)
    if spec.recipe is None:  # a spec without a cheap recipe: the hash of its (possibly new) cache
        return spec.build(cfg, True).recipe_hash
    return stable_hash(spec.recipe(cfg))
