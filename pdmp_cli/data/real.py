"""Real datasets: an adapter turns a raw layout into a clip list; the shared code here resolves the
recipe, validates the clip list and prepares the cache with `prepare_cache`.

A recipe (what is hashed into the cache name and stored in its manifest and in every run):

    {"dataset": "cremad", "recipe": "ogmge-cremad", "recipe_version": 1,
     "options": {"num_classes": 6, "val_fraction": 0.1111, "split_seed": 0, ...},
     "modalities": {"audio": {"kind": "stft", "version": 1, "sample_rate": 22050, ...},
                    "visual": {"kind": "frames", "version": 1, "num_frames": 1, "size": 224, ...}}}

`--recipe NAME` picks a named recipe of the dataset; `--recipe key=value` overrides a dataset
option (`num_classes=31`) or a feature parameter (`audio.n_fft=1024`, `visual.size=64`,
`audio.kind=logmel`).
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pdmp_cli.config import DataConfig, stable_hash
from pdmp_cli.data.base import DATASETS, DatasetSpec, FeatureCache
from pdmp_cli.data.cache import SPLITS, natural, open_cache, prepare_cache
from pdmp_cli.data.recipes import feature_class, feature_fields, make_feature
from pdmp_cli.errors import PdmpError

# The lineage's training protocol (OGM-GE, PMR, AGM, PDMP): ResNet-18 from scratch (`auto` picks it on
# CUDA; on a CPU the small encoder), SGD lr 1e-3, momentum 0.9, weight decay 1e-4, batch 64, 100
# epochs, learning rate ×0.1 at epoch 70.
LINEAGE_PROTOCOL = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
                    "epochs": 100, "scheduler": "step", "step_epoch": 70, "step_gamma": 0.1}
COMMON_OPTIONS = {
    "num_classes": 0,  # the declared class count, checked against the data (0: take what the data has)
    "val_fraction": 0.1,  # carved from train, stratified, when the dataset has no validation split
    "split_seed": 0,  # seed of carved splits
}


@dataclass(frozen=True)
class NamedRecipe:
    name: str
    version: int
    description: str
    modalities: dict[str, dict[str, Any]]  # modality -> {"kind": ..., parameters that differ from the kind's}


@dataclass
class Listing:
    """What an adapter found: clip rows (`id,label,split,<modality>_path`, optional start/end) and classes."""

    rows: list[dict[str, Any]]
    classes: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Adapter:
    name: str
    description: str
    modalities: tuple[str, ...]
    layout: str  # the raw layout in one line, for error messages
    recipes: dict[str, NamedRecipe]
    default_recipe: str
    options: dict[str, Any]  # dataset options and their defaults (COMMON_OPTIONS included)
    list_clips: Callable[[Path, dict[str, Any]], Listing]
    # custom manifests: modalities from the data, and a fingerprint of the clip list hashed into the recipe
    modalities_for: Callable[[Path], tuple[str, ...]] | None = None
    fingerprint: Callable[[Path], str] | None = None
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # the lineage's per-dataset values


# ---- recipe resolution -------------------------------------------------------------------------------

def coerce(value: Any, default: Any, key: str) -> Any:
    """A `--recipe key=value` string as the type of the option's default."""
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise PdmpError(f"--recipe {key}={value}: expected a {type(default).__name__} like {default!r}") from None
    return value


def raw_root(cfg: DataConfig) -> Path:
    return Path(cfg.raw_root) if cfg.raw_root else Path(cfg.root) / cfg.dataset / "raw"


def adapter_modalities(adapter: Adapter, cfg: DataConfig) -> tuple[str, ...]:
    return adapter.modalities_for(raw_root(cfg)) if adapter.modalities_for else adapter.modalities


def default_kind(modality: str) -> str:
    return {"audio": "logmel", "flow": "flow"}.get(modality, "frames")


def resolve_recipe(adapter: Adapter, cfg: DataConfig) -> dict[str, Any]:
    """The full recipe for `cfg.recipe` (the options as given), validated; cheap (no decoding)."""
    given = dict(cfg.recipe)
    name = given.pop("name", adapter.default_recipe)
    if name not in adapter.recipes:
        raise PdmpError(f"{adapter.name} has no recipe {name!r}; choose one of {', '.join(adapter.recipes)} "
                        f"(see datasets/{adapter.name}/README.md)")
    named = adapter.recipes[name]
    modalities = adapter_modalities(adapter, cfg)
    specs = {m: dict(named.modalities.get(m, {"kind": default_kind(m)})) for m in modalities}
    for key, value in sorted(given.items(), key=lambda kv: not kv[0].endswith(".kind")):  # kinds first
        modality, dot, param = key.partition(".")
        if dot and modality not in specs:
            raise PdmpError(f"--recipe {key}: {adapter.name} has no modality {modality!r} "
                            f"(its modalities: {', '.join(modalities)})")
        if dot and param == "kind":
            feature_class(str(value))
            specs[modality] = {"kind": str(value)}
        elif dot:
            specs[modality].setdefault("_given", {})[param] = value
        elif key not in adapter.options:
            raise PdmpError(f"--recipe {key}: unknown option for {adapter.name}; options: "
                            f"{', '.join(sorted(adapter.options))}, or MODALITY.PARAMETER (e.g. {modalities[0]}.size)")
    options = {k: coerce(given.get(k, v), v, k) for k, v in adapter.options.items()}
    resolved = {}
    for m, spec in specs.items():
        kind, extra = spec.pop("kind"), spec.pop("_given", {})
        defaults = feature_fields(kind)
        params = {**defaults, **{k: v for k, v in spec.items()}}
        for param, value in extra.items():
            if param not in defaults:
                raise PdmpError(f"--recipe {m}.{param}: a {kind} feature has no parameter {param!r}; "
                                f"it has {', '.join(defaults)}")
            params[param] = coerce(value, defaults[param], f"{m}.{param}")
        resolved[m] = {"kind": kind, "version": feature_class(kind).version, **params}
        shape = make_feature(resolved[m]).shape
        if any(s < 1 for s in shape):
            raise PdmpError(f"--recipe for {m} gives an empty feature shape {shape}; check its parameters")
    recipe = {"dataset": adapter.name, "recipe": name, "recipe_version": named.version, "options": options,
              "modalities": resolved}
    if adapter.fingerprint:
        recipe["clip_list"] = adapter.fingerprint(raw_root(cfg))
    return recipe


# ---- validation of a clip list ---------------------------------------------------------------------

def check_listing(adapter: Adapter, listing: Listing, options: dict[str, Any]) -> None:
    """Duplicate ids, split overlap, unknown labels, empty classes, a class count other than declared."""
    name = adapter.name
    declared = options.get("num_classes", 0)
    if declared and declared != len(listing.classes):
        raise PdmpError(f"{name}: the data has {len(listing.classes)} classes but {declared} are declared; "
                        f"pass --recipe num_classes={len(listing.classes)} if that is intended, or restore the missing "
                        f"classes (see datasets/{name}/README.md on class-count variants)")
    known = set(listing.classes)
    seen: dict[str, str] = {}
    for row in listing.rows:
        if row["split"] not in SPLITS:
            raise PdmpError(f"{name}: clip {row['id']} has split {row['split']!r}; use one of {', '.join(SPLITS)}")
        if row["label"] not in known:
            raise PdmpError(f"{name}: clip {row['id']} has label {row['label']!r}, not one of the "
                            f"{len(known)} classes; fix the label or the class list")
        previous = seen.get(row["id"])
        if previous == row["split"]:
            raise PdmpError(f"{name}: clip id {row['id']} appears twice in the {previous} split; remove the duplicate")
        if previous is not None:
            raise PdmpError(f"{name}: clip {row['id']} is in both the {previous} and the {row['split']} split; "
                            f"the split files overlap, fix them")
        seen[row["id"]] = row["split"]
    for split in SPLITS:
        if not any(row["split"] == split for row in listing.rows):
            raise PdmpError(f"{name}: the {split} split is empty; expected layout: {adapter.layout}")
    per_class = Counter(row["label"] for row in listing.rows if row["split"] == "train")
    empty = [c for c in listing.classes if per_class[c] == 0]
    if empty:
        raise PdmpError(f"{name}: class {empty[0]!r} has no training clips" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                        + "; restore its files or leave it out of the class list")


def carve_val(rows: list[dict[str, Any]], fraction: float, seed: int, group: Callable[[dict], str] | None = None) -> str:
    """Move a stratified `fraction` of the train rows to val (whole groups when `group` is given); returns a note."""
    train = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["id"])
    rng = np.random.default_rng(seed)
    if group is not None:  # UCF-101: clips of one group share a source video; they must stay together
        groups = sorted({group(r) for r in train}, key=natural)
        n = max(1, int(round(fraction * len(groups)))) if len(groups) > 1 else 0
        chosen = set(rng.permutation(groups)[:n].tolist())
        for r in train:
            if group(r) in chosen:
                r["split"] = "val"
        return f"val carved from train: groups {', '.join(sorted(chosen, key=natural))} (seed {seed})"
    by_class = defaultdict(list)
    for r in train:
        by_class[r["label"]].append(r)
    moved = 0
    for label in sorted(by_class):
        members = by_class[label]
        n = int(round(fraction * len(members)))
        n = min(max(n, 1 if len(members) > 1 else 0), len(members) - 1)
        for i in rng.permutation(len(members))[:n]:
            members[i]["split"] = "val"
            moved += 1
    return f"val carved from train: {moved} clips, {fraction:.4g} per class, stratified (seed {seed})"


def class_counts(listing: Listing) -> dict[str, dict[str, int]]:
    counts = {split: {c: 0 for c in listing.classes} for split in SPLITS}
    for row in listing.rows:
        counts[row["split"]][row["label"]] += 1
    return counts


def missing_files(rows: list[dict[str, Any]], modalities: tuple[str, ...]) -> list[dict[str, str]]:
    """One record per absent file (audio and frames often come from the same video: listed once)."""
    out, seen = [], set()
    for r in rows:
        for m in modalities:
            path = str(r[f"{m}_path"])
            if (r["id"], path) not in seen and not os.path.exists(path):
                seen.add((r["id"], path))
                out.append({"id": r["id"], "split": r["split"], "path": path, "reason": "missing file"})
    return out


# ---- building ----------------------------------------------------------------------------------------

def list_checked(adapter: Adapter, cfg: DataConfig, recipe: dict[str, Any]) -> tuple[Path, Listing]:
    raw = raw_root(cfg)
    if not raw.exists():
        raise PdmpError(f"no raw data for {adapter.name} at {raw}; pass --root PATH (expected layout: {adapter.layout}) "
                        f"or put the files there")
    listing = adapter.list_clips(raw, recipe["options"])
    check_listing(adapter, listing, recipe["options"])
    return raw, listing


def build(adapter: Adapter, cfg: DataConfig, quiet: bool = False, workers: int | None = None,
          strict: bool = False) -> FeatureCache:
    recipe = resolve_recipe(adapter, cfg)
    parent = Path(cfg.root) / adapter.name / "cache"
    existing = parent / stable_hash(recipe)
    if (existing / "manifest.json").is_file():  # ready: needs no raw file
        cache = open_cache(existing)
        prepared_from = cache.manifest.get("raw_root")
        if cfg.raw_root and prepared_from and Path(cfg.raw_root).resolve() != Path(prepared_from).resolve():
            raise PdmpError(f"the {adapter.name} cache {existing} was prepared from {prepared_from}, not --root "
                            f"{cfg.raw_root}; give another --data-dir and --runs-dir to keep both, or delete the cache")
        return cache
    raw, listing = list_checked(adapter, cfg, recipe)
    features = {m: make_feature(spec) for m, spec in recipe["modalities"].items()}
    return prepare_cache(parent, listing.rows, features, recipe, dataset=adapter.name, classes=listing.classes,
                         quiet=quiet, workers=workers, strict=strict,
                         extra={"raw_root": str(raw), "notes": listing.notes})


def check(adapter: Adapter, cfg: DataConfig) -> dict[str, Any]:
    """`pdmp prepare --check`: the clip list validated and counted, missing files listed; nothing decoded."""
    recipe = resolve_recipe(adapter, cfg)
    raw, listing = list_checked(adapter, cfg, recipe)
    cache = Path(cfg.root) / adapter.name / "cache" / stable_hash(recipe)
    return {"dataset": adapter.name, "raw_root": str(raw), "recipe": recipe, "recipe_hash": stable_hash(recipe),
            "classes": listing.classes, "class_counts": class_counts(listing), "notes": listing.notes,
            "missing": missing_files(listing.rows, tuple(recipe["modalities"])),
            "cache": str(cache) if (cache / "manifest.json").is_file() else None}


CPU_FRAME_SIZE = 64


def with_cpu_recipe(adapter: Adapter) -> Adapter:
    """Adds `cpu`: the default recipe with every frame and flow image at 64×64 instead of the papers' size."""
    default = adapter.recipes[adapter.default_recipe]
    small = {m: {**spec, "size": CPU_FRAME_SIZE} if spec.get("kind") in ("frames", "flow") else dict(spec)
             for m, spec in default.modalities.items()}
    cpu = NamedRecipe("cpu", default.version, f"{default.name} with frames at {CPU_FRAME_SIZE}x{CPU_FRAME_SIZE} (for CPUs)",
                      small)
    return dataclasses.replace(adapter, recipes={**adapter.recipes, "cpu": cpu})


def register(adapter: Adapter) -> Adapter:
    if adapter.modalities:  # custom manifests have no fixed modalities: --recipe MODALITY.size=N instead
        adapter = with_cpu_recipe(adapter)
    DATASETS.register(adapter.name)(DatasetSpec(
        name=adapter.name,
        description=adapter.description,
        modalities=adapter.modalities,
        presets={},
        default_preset=None,
        train_defaults=dict(LINEAGE_PROTOCOL),
        model_defaults={},
        method_defaults=adapter.method_defaults,
        build=lambda cfg, quiet=False, workers=None, strict=False: build(adapter, cfg, quiet, workers, strict),
        recipe=lambda cfg: resolve_recipe(adapter, cfg),
        modalities_for=(lambda cfg: adapter_modalities(adapter, cfg)) if adapter.modalities_for else None,
        check=lambda cfg: check(adapter, cfg),
        augment_defaults={"crop": True, "flip": True},  # the lineage's RandomResizedCrop + flip of training frames
    ))
    ADAPTERS[adapter.name] = adapter
    return adapter


ADAPTERS: dict[str, Adapter] = {}
