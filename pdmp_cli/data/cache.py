"""Generic preparation: a list of clips (`id,label,split,<modality>_path...`) -> a feature cache.

Every dataset, built-in or brought by the user, goes through `prepare_cache`, so the built-in
av-digits exercises exactly the code path real datasets use. The cache folder is named by the
stable hash of the full recipe and is published (renamed into place) only when complete.

Preparation decodes clips in worker processes (`workers`) and writes each result straight into
its slot of a memory-mapped array, so memory stays flat whatever the dataset size. The work in
progress lives in `<parent>/.partial-<hash>/` with a per-clip status array flushed after the
features: an interrupted run resumes there and never decodes a finished clip again.
"""
from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np

from pdmp_cli.config import stable_hash
from pdmp_cli.data.base import FeatureCache, Split
from pdmp_cli import __version__
from pdmp_cli.errors import PdmpError
from pdmp_cli.ui import progress_bar

CACHE_SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
TODO, DONE, SKIPPED = 0, 1, 2  # per-clip status in the partial folder
FLUSH_SECONDS = 2.0  # how often finished clips are made durable (features first, then their status)


class Recipe(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def load(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray: ...


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
    """Rows with `<modality>_path` made absolute; refuses missing columns, bad splits and missing files.

    Optional columns `start` and `end` (seconds) restrict a clip to a segment of its files.
    """
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


def natural(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _mean_std(array: np.ndarray) -> dict[str, float]:
    total = total_sq = 0.0
    rows = max(1, (1 << 21) // max(1, int(np.prod(array.shape[1:]))))  # ~16 MB of float64 at a time, whatever the shape
    for start in range(0, len(array), rows):
        chunk = np.asarray(array[start:start + rows], dtype=np.float64)
        total += chunk.sum()
        total_sq += np.square(chunk).sum()
    count = max(array.size, 1)
    mean = total / count
    return {"mean": float(mean), "std": float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))}


# ---- decoding one clip (runs in the worker processes) -----------------------------------------------

def _seconds(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def load_clip(recipes: dict[str, Recipe], row: dict[str, Any]) -> tuple[dict[str, np.ndarray] | None, str | None, str | None]:
    """(arrays, None, None) or (None, file, reason): a bad file is reported, never raised."""
    arrays = {}
    for m, recipe in recipes.items():
        path = row[f"{m}_path"]
        if not os.path.exists(path):
            return None, path, "missing file"
        try:
            arrays[m] = recipe.load(path, _seconds(row.get("start")), _seconds(row.get("end")))
        except Exception as exc:  # corrupt / truncated / silent / too short: recorded and skipped
            return None, path, f"{type(exc).__name__}: {exc}" if str(exc).strip() else f"cannot decode ({type(exc).__name__})"
        if arrays[m].shape != tuple(recipe.shape):
            return None, path, f"shape {arrays[m].shape}, expected {tuple(recipe.shape)}"
    return arrays, None, None


_WORKER_RECIPES: dict[str, Recipe] = {}


def _init_worker(recipes: dict[str, Recipe]) -> None:
    import cv2

    cv2.setNumThreads(1)  # the parallelism is the processes; threads inside each would oversubscribe
    _WORKER_RECIPES.update(recipes)


def _work(task: tuple[int, dict[str, Any]]):
    index, row = task
    return index, load_clip(_WORKER_RECIPES, row)


def decode_all(recipes: dict[str, Recipe], tasks: list[tuple[int, dict[str, Any]]], workers: int) -> Iterator:
    """(index, load_clip result) for every task, in any order; `workers` processes (1: this process)."""
    if workers <= 1 or len(tasks) <= 1:
        for index, row in tasks:
            yield index, load_clip(recipes, row)
        return
    # spawn, not fork: a child forked after OpenCV or torch started their thread pools can hang forever
    # (seen here in the test suite); workers import only the decoders, once each, so spawning costs ~1 s.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(16, len(tasks) // (8 * workers)))
    with context.Pool(workers, initializer=_init_worker, initargs=(recipes,)) as pool:
        yield from pool.imap_unordered(_work, tasks, chunksize=chunksize)


# ---- the partial folder: resumable work in progress ---------------------------------------------------

class Partial:
    """Memory-mapped outputs of one split plan, written slot by slot, with a status per clip."""

    def __init__(self, folder: Path, plan: dict[str, list[dict[str, Any]]], recipes: dict[str, Recipe]) -> None:
        self.folder, self.plan, self.recipes = folder, plan, recipes
        signature = stable_hash({"plan": plan, "shapes": {m: [list(r.shape), str(np.dtype(r.dtype))]
                                                           for m, r in recipes.items()}})
        stamp = folder / "plan.json"
        fresh = not (stamp.is_file() and json.loads(stamp.read_text()).get("signature") == signature)
        if fresh:  # another clip list or recipe: what is there cannot be reused
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        mode = "w+" if fresh else "r+"
        self.arrays = {split: {m: np.lib.format.open_memmap(folder / f"{split}.{m}.npy", mode=mode, dtype=r.dtype,
                                                             shape=(len(rows), *r.shape)) for m, r in recipes.items()}
                       for split, rows in plan.items()}
        total = sum(len(rows) for rows in plan.values())
        self.status = np.lib.format.open_memmap(folder / "status.npy", mode=mode, dtype=np.uint8, shape=(total,))
        self.offsets, offset = {}, 0
        for split, rows in plan.items():
            self.offsets[split] = offset
            offset += len(rows)
        self.skipped_file = folder / "skipped.jsonl"
        if fresh:
            self.status[:] = TODO
            self.status.flush()
            self.skipped_file.write_text("")
            stamp.write_text(json.dumps({"signature": signature}))
        self.pending: list[str] = []

    def slots(self) -> Iterator[tuple[int, str, int, dict[str, Any]]]:
        for split, rows in self.plan.items():
            for i, row in enumerate(rows):
                yield self.offsets[split] + i, split, i, row

    def write(self, index: int, split: str, slot: int, arrays: dict[str, np.ndarray] | None, skip: dict | None) -> None:
        if arrays is not None:
            for m, array in arrays.items():
                self.arrays[split][m][slot] = array
        else:
            self.pending.append(json.dumps(skip))
        self.status[index] = DONE if arrays is not None else SKIPPED

    def flush(self) -> None:
        """Features and skip records reach the disk before the statuses that vouch for them."""
        for per_modality in self.arrays.values():
            for array in per_modality.values():
                array.flush()
        if self.pending:
            with open(self.skipped_file, "a") as f:
                f.write("".join(line + "\n" for line in self.pending))
            self.pending = []
        self.status.flush()

    def skipped(self, status: np.ndarray) -> list[dict[str, Any]]:
        records = {}
        for line in self.skipped_file.read_text().splitlines():
            record = json.loads(line)
            records[(record["split"], record["id"])] = record  # a clip retried after an interruption: last wins
        done = {(split, row["id"]) for index, split, _, row in self.slots() if status[index] == SKIPPED}
        return [r for key, r in records.items() if key in done]

    def close(self) -> None:
        self.flush()
        self.arrays.clear()
        del self.status


def _compact(source: np.ndarray, keep: np.ndarray, target: Path) -> None:
    """Copy the kept rows of `source` into a new .npy, chunk by chunk (flat memory)."""
    out = np.lib.format.open_memmap(target, mode="w+", dtype=source.dtype, shape=(len(keep), *source.shape[1:]))
    for start in range(0, len(keep), 256):
        out[start:start + 256] = source[keep[start:start + 256]]
    out.flush()
    del out


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no copy; the partial folder stays intact until the cache is published
    except OSError:
        shutil.copyfile(source, target)


# ---- prepare ---------------------------------------------------------------------------------------

def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def prepare_cache(parent: Path, source: Path | list[dict[str, Any]], recipes: dict[str, Recipe], recipe: dict[str, Any], *,
                  dataset: str, preset: str | None = None, classes: list[str] | None = None,
                  quiet: bool = False, workers: int | None = None, strict: bool = False,
                  extra: dict[str, Any] | None = None) -> FeatureCache:
    """The cache `<parent>/<stable_hash(recipe)>`, prepared from `source` unless it already exists.

    `source` is a manifest CSV or the clip rows themselves (`id`, `label`, `split`, `<modality>_path`,
    optional `start`/`end` seconds). `recipe` must hold everything that
    determines the features (it is hashed and stored); `recipes` maps each modality to the object
    that turns one file into an array. Bad files are recorded in the manifest's `skipped` list
    (`strict` makes them an error; the finished clips are kept for the next try).
    """
    recipe_hash = stable_hash(recipe)
    final = parent / recipe_hash
    if (final / "manifest.json").is_file():
        return open_cache(final)
    parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(parent / f".{recipe_hash}.lock"):  # one preparer per cache; the others wait and reuse it
        if (final / "manifest.json").is_file():
            return open_cache(final)
        return _prepare(parent, final, recipe_hash, source, recipes, recipe, dataset=dataset, preset=preset,
                        classes=classes, quiet=quiet, workers=workers, strict=strict, extra=extra)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An advisory lock file (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the rename in publish_dir still keeps caches whole
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(parent: Path, final: Path, recipe_hash: str, source: Path | list[dict[str, Any]],
             recipes: dict[str, Recipe], recipe: dict[str, Any], *, dataset: str, preset: str | None,
             classes: list[str] | None, quiet: bool, workers: int | None, strict: bool,
             extra: dict[str, Any] | None) -> FeatureCache:
    modalities = list(recipes)
    rows = read_manifest_csv(source, modalities) if isinstance(source, Path) else list(source)
    if classes is None:
        classes = sorted({row["label"] for row in rows}, key=natural)
    class_index = {c: i for i, c in enumerate(classes)}
    for row in rows:
        if row["label"] not in class_index:
            raise PdmpError(f"{source if isinstance(source, Path) else dataset}: clip id={row['id']} has label "
                            f"{row['label']!r}, not in the class list ({', '.join(classes)})")
    keys = ("id", "label", "split", "start", "end", *(f"{m}_path" for m in modalities))
    plan = {split: [{k: row[k] for k in keys if row.get(k) not in (None, "")} for row in rows if row["split"] == split]
            for split in SPLITS}

    partial = Partial(parent / f".partial-{recipe_hash}", plan, recipes)
    workers = default_workers() if workers is None else max(1, workers)
    todo = [(index, split, slot, row) for index, split, slot, row in partial.slots() if partial.status[index] == TODO]
    started, decoded = time.time(), 0
    try:
        with progress_bar(quiet) as bar:
            task = bar.add_task(f"preparing {dataset} ({workers} worker{'s' if workers > 1 else ''})",
                                total=len(partial.status), completed=len(partial.status) - len(todo))
            where = {index: (split, slot, row) for index, split, slot, row in todo}
            last_flush = time.time()
            for index, (arrays, bad_path, reason) in decode_all(recipes, [(i, w[2]) for i, w in where.items()], workers):
                split, slot, row = where[index]
                skip = None if arrays is not None else {"id": row["id"], "split": split, "path": bad_path, "reason": reason}
                partial.write(index, split, slot, arrays, skip)
                decoded += 1
                bar.advance(task)
                if time.time() - last_flush > FLUSH_SECONDS:
                    partial.flush()
                    last_flush = time.time()
    finally:
        partial.close()
    elapsed = time.time() - started

    status = np.load(partial.folder / "status.npy")
    skipped = partial.skipped(status)
    if strict and skipped:
        first = skipped[0]
        raise PdmpError(f"--strict: {len(skipped)} clip(s) could not be used, first {first['path']} ({first['reason']}); "
                        f"fix or remove them, or prepare without --strict to skip them (finished clips are kept)")
    tmp = parent / f".tmp-{recipe_hash}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    try:
        for split, split_rows in plan.items():
            folder = tmp / split
            folder.mkdir(parents=True)
            offset = partial.offsets[split]
            keep = np.flatnonzero(status[offset:offset + len(split_rows)] == DONE)
            for m in modalities:
                source_file = partial.folder / f"{split}.{m}.npy"
                if len(keep) == len(split_rows):
                    _link_or_copy(source_file, folder / f"{m}.npy")
                else:
                    _compact(np.load(source_file, mmap_mode="r"), keep, folder / f"{m}.npy")
            np.save(folder / "labels.npy", np.asarray([class_index[split_rows[i]["label"]] for i in keep], dtype=np.int64))
            (folder / "ids.json").write_text(json.dumps([split_rows[i]["id"] for i in keep]))
            counts[split] = int(len(keep))
        if counts["train"] == 0:
            raise PdmpError(f"no usable training clips for {dataset} (skipped: {len(skipped)}"
                            + (f", first {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else "")
                            + "); check the raw files")
        class_counts = {split: {c: 0 for c in classes} for split in SPLITS}
        for split in SPLITS:
            for label in np.load(tmp / split / "labels.npy"):
                class_counts[split][classes[label]] += 1
        listed = {row["label"] for row in plan["train"]}
        emptied = [c for c, n in class_counts["train"].items() if n == 0 and c in listed]
        warnings = [f"class {c!r} has no usable training clip left after skipping bad or missing files; restore "
                    f"them (`pdmp prepare --check` lists missing ones) or leave the class out" for c in emptied]
        norm_stats = {m: _mean_std(np.load(tmp / "train" / f"{m}.npy", mmap_mode="r")) for m in modalities}
        manifest = {
            "schema_version": CACHE_SCHEMA_VERSION,
            "dataset": dataset,
            "preset": preset,
            "recipe": recipe,
            "recipe_hash": recipe_hash,
            "source": str(source) if isinstance(source, Path) else None,
            "modalities": {m: {"shape": list(recipes[m].shape), "dtype": np.dtype(recipes[m].dtype).name}
                           for m in modalities},
            "classes": classes,
            "counts": counts,
            "class_counts": class_counts,
            "norm_stats": norm_stats,
            "skipped": skipped,
            "warnings": warnings,
            "preparation": {"workers": workers, "decoded_now": decoded, "seconds": round(elapsed, 3),
                            "clips_per_second": round(decoded / elapsed, 3) if elapsed > 0 and decoded else None},
            **(extra or {}),
            "pdmp_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        publish_dir(tmp, final, "manifest.json")
        shutil.rmtree(partial.folder, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)


def iter_caches(root: Path) -> Iterable[Path]:
    """Finished caches under a data directory: <root>/<dataset>/cache/<hash>/manifest.json."""
    yield from sorted(p.parent for p in Path(root).glob("*/cache/*/manifest.json"))
