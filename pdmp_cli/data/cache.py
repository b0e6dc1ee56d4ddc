"""Generic preparation: a CSV manifest (`id,label,split,<modality>_path...`) -> a feature cache.

Every dataset, built-in or brought by the user, goes through `prepare_cache`, so the built-in
av-digits exercises exactly the code path real datasets use. The cache folder is named by the
stable hash of the full recipe; it is built in a temporary sibling and renamed into place only
when complete, so an interrupted run never leaves a half cache that a later run would trust.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pdmp_cli.config import stable_hash
from pdmp_cli.data.base import FeatureCache, Split
from pdmp_cli import __version__
from pdmp_cli.errors import PdmpError
from pdmp_cli.ui import progress_bar

CACHE_SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
CHUNK = 256  # rows decoded in parallel at a time; bounds memory for large datasets


class Recipe(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def load(self, path: str | Path) -> np.ndarray: ...


def publish_dir(tmp: Path, final: Path, marker: str) -> None:
    """Rename a completed folder into place; a concurrent build that got there first (it has `marker`) wins."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / marker).is_file():
            raise


def open_cache(path: Path) -> FeatureCache:
    """Open a finished cache; arrays are read-only memory maps."""
    manifest = json.loads((path / "manifest.json").read_text())
    modalities = list(manifest["modalities"])
    splits = {}
    for split in SPLITS:
        folder = path / split
        splits[split] = Split(
            inputs={m: np.load(folder / f"{m}.npy", mmap_mode="r", allow_pickle=False) for m in modalities},
            labels=np.load(folder / "labels.npy", mmap_mode="r", allow_pickle=False),
            ids=json.loads((folder / "ids.json").read_text()),
        )
    return FeatureCache(path=path, manifest=manifest, recipe_hash=manifest["recipe_hash"], modalities=modalities,
                        classes=list(manifest["classes"]), splits=splits)


def read_manifest_csv(csv_path: Path, modalities: list[str]) -> list[dict[str, str]]:
    """Rows with `<modality>_path` made absolute; refuses missing columns, bad splits and missing files."""
    if not csv_path.is_file():
        raise PdmpError(f"manifest {csv_path} does not exist; check the dataset root or re-run generation")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            needed = ["id", "label", "split"] + [f"{m}_path" for m in modalities]
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise PdmpError(f"{csv_path} lacks column(s) {', '.join(missing)}; expected {','.join(needed)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PdmpError(f"{csv_path} is not a readable UTF-8 CSV file ({exc}); fix or re-create it") from None
    absent = []
    for n, row in enumerate(rows, 1):
        if any(row.get(c) is None for c in needed):
            raise PdmpError(f"{csv_path}: data row {n} has fewer cells than the header ({','.join(needed)}); fix that row")
        if row["split"] not in SPLITS:
            raise PdmpError(f"{csv_path}: row id={row['id']} has split {row['split']!r}; "
                            f"use one of {', '.join(SPLITS)}")
        for m in modalities:
            row[f"{m}_path"] = str(csv_path.parent / row[f"{m}_path"])  # an absolute path stays as it is
            if not os.path.exists(row[f"{m}_path"]):
                absent.append(row[f"{m}_path"])
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise PdmpError(f"{csv_path} lists a missing file: {absent[0]}{more}; restore it or remove its row")
    return rows


def _natural(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _mean_std(array: np.ndarray) -> dict[str, float]:
    total = total_sq = 0.0
    for start in range(0, len(array), 1024):
        chunk = np.asarray(array[start:start + 1024], dtype=np.float64)
        total += chunk.sum()
        total_sq += np.square(chunk).sum()
    count = max(array.size, 1)
    mean = total / count
    return {"mean": float(mean), "std": float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))}


def _truncate(path: Path, n: int) -> None:
    """Rewrite an .npy keeping its first n rows (only after skipped files)."""
    old = np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".tmp.npy")
    new = np.lib.format.open_memmap(tmp, mode="w+", dtype=old.dtype, shape=(n, *old.shape[1:]))
    new[:] = old[:n]
    new.flush()
    del old, new
    os.replace(tmp, path)


def prepare_cache(parent: Path, csv_path: Path, recipes: dict[str, Recipe], recipe: dict[str, Any], *,
                  dataset: str, preset: str | None = None, classes: list[str] | None = None,
                  quiet: bool = False, workers: int = 2) -> FeatureCache:
    """The cache `<parent>/<stable_hash(recipe)>`, prepared from `csv_path` unless it already exists.

    `recipe` must hold everything that determines the features (it is hashed and stored);
    `recipes` maps each modality to the object that turns one `<modality>_path` into an array.
    """
    recipe_hash = stable_hash(recipe)
    final = parent / recipe_hash
    if (final / "manifest.json").is_file():
        return open_cache(final)

    modalities = list(recipes)
    rows = read_manifest_csv(csv_path, modalities)
    if classes is None:
        classes = sorted({row["label"] for row in rows}, key=_natural)
    class_index = {c: i for i, c in enumerate(classes)}
    for row in rows:
        if row["label"] not in class_index:
            raise PdmpError(f"{csv_path}: row id={row['id']} has label {row['label']!r}, not in the class list "
                            f"({', '.join(classes)})")

    def load_row(row: dict[str, str]) -> tuple[dict[str, np.ndarray] | None, str | None, str | None]:
        arrays = {}
        for m in modalities:
            try:
                arrays[m] = recipes[m].load(row[f"{m}_path"])
            except Exception as exc:  # a corrupt file is recorded and skipped, never a crash
                return None, row[f"{m}_path"], f"{type(exc).__name__}: {exc}".strip()
            if arrays[m].shape != tuple(recipes[m].shape):
                return None, row[f"{m}_path"], f"shape {arrays[m].shape}, expected {tuple(recipes[m].shape)}"
        return arrays, None, None

    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{recipe_hash}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    skipped, counts = [], {}
    try:
        with progress_bar(quiet) as bar, ThreadPoolExecutor(workers) as pool:
            task = bar.add_task(f"preparing {dataset}", total=len(rows))
            for split in SPLITS:
                split_rows = [row for row in rows if row["split"] == split]
                folder = tmp / split
                folder.mkdir(parents=True)
                n = len(split_rows)
                outputs = {m: np.lib.format.open_memmap(folder / f"{m}.npy", mode="w+", dtype=recipes[m].dtype,
                                                        shape=(n, *recipes[m].shape)) for m in modalities}
                labels, ids = [], []
                for start in range(0, n, CHUNK):
                    chunk = split_rows[start:start + CHUNK]
                    for row, (arrays, bad_path, reason) in zip(chunk, pool.map(load_row, chunk)):
                        bar.advance(task)
                        if arrays is None:
                            skipped.append({"id": row["id"], "split": split, "path": bad_path, "reason": reason})
                            continue
                        for m in modalities:
                            outputs[m][len(ids)] = arrays[m]
                        labels.append(class_index[row["label"]])
                        ids.append(row["id"])
                for array in outputs.values():
                    array.flush()
                del outputs
                if len(ids) < n:
                    for m in modalities:
                        _truncate(folder / f"{m}.npy", len(ids))
                np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
                (folder / "ids.json").write_text(json.dumps(ids))
                counts[split] = len(ids)
        if counts["train"] == 0:
            raise PdmpError(f"no usable training samples in {csv_path} (skipped: {len(skipped)}); check the files")
        norm_stats = {m: _mean_std(np.load(tmp / "train" / f"{m}.npy", mmap_mode="r")) for m in modalities}
        manifest = {
            "schema_version": CACHE_SCHEMA_VERSION,
            "dataset": dataset,
            "preset": preset,
            "recipe": recipe,
            "recipe_hash": recipe_hash,
            "source": str(csv_path),
            "modalities": {m: {"shape": list(recipes[m].shape), "dtype": np.dtype(recipes[m].dtype).name}
                           for m in modalities},
            "classes": classes,
            "counts": counts,
            "norm_stats": norm_stats,
            "skipped": skipped,
            "pdmp_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        publish_dir(tmp, final, "manifest.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)
