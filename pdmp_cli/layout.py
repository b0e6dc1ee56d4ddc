"""The run-directory contract: every path and file name pdmp writes, and how it is written/read.

    <runs>/                                   (--runs-dir, $PDMP_RUNS, default ./runs)
      last_dataset.json                       the dataset `rank` ran on last (default of other commands)
      <dataset>/                              dataset key: `av-digits`, `av-digits@visual-dominant`, …
        rank.json                             scores, ranking and dominant modality
        rank/<modality>/s<seed>/              one unimodal run (files as a train run)
        train/<method>[+k=v…]-<fusion>-s<seed>/
          config.json                         the resolved RunConfig (+ command line, versions)
          metrics.jsonl                       one line per epoch
          best.pt                             checkpoint selected on --select-split (config inside)
          result.json                         test metrics of the selected checkpoint
        compare/results.csv                   one row per run of the last `pdmp compare` grid
        report/report.md, report/results.csv  `pdmp report` tables

Every JSON file carries `schema_version`; every write goes to a temporary file in the same folder
that is then renamed over the target, so a reader never sees a half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from pdmp_cli.config import SCHEMA_VERSION
from pdmp_cli.errors import PdmpError

CONFIG, METRICS, CHECKPOINT, RESULT = "config.json", "metrics.jsonl", "best.pt", "result.json"


class Layout:
    def __init__(self, runs_root: str | Path) -> None:
        self.root = Path(runs_root)

    @property
    def last_dataset_file(self) -> Path:
        return self.root / "last_dataset.json"

    def dataset_dir(self, key: str) -> Path:
        return self.root / key

    def rank_json(self, key: str) -> Path:
        return self.dataset_dir(key) / "rank.json"

    def rank_run(self, key: str, modality: str, seed: int) -> Path:
        return self.dataset_dir(key) / "rank" / modality / f"s{seed}"

    def train_dir(self, key: str) -> Path:
        return self.dataset_dir(key) / "train"

    def train_run(self, key: str, name: str) -> Path:
        return self.train_dir(key) / name

    def compare_csv(self, key: str) -> Path:
        return self.dataset_dir(key) / "compare" / "results.csv"

    def report_dir(self, key: str) -> Path:
        return self.dataset_dir(key) / "report"


def run_name(variant: str, fusion: str, seed: int) -> str:
    return f"{variant}-{fusion}-s{seed}"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    payload = {"schema_version": SCHEMA_VERSION, **data}
    atomic_write(path, lambda f: json.dump(payload, f, indent=2, sort_keys=False, default=str))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line by rewriting the file atomically (files are small: one line per epoch)."""
    old = path.read_text() if path.exists() else ""
    write_text(path, old + json.dumps(record, default=str) + "\n")


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PdmpError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PdmpError(f"{path} is not valid JSON ({exc}); delete it and re-run the command that wrote it") from None
    if not isinstance(data, dict):
        raise PdmpError(f"{path} is not a JSON object; delete it and re-run the command that wrote it")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PdmpError(f"{path}: schema_version {version!r} is not {SCHEMA_VERSION}; re-create it with this pdmp")
    for field in required:
        if field not in data:
            raise PdmpError(f"{path}: missing field {field!r}; re-create it with this pdmp")
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
