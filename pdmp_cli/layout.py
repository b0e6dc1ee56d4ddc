"""The run-directory contract: every path and file name pdmp writes, and how it is written/read.

    <runs>/                                   (--runs-dir, $PDMP_RUNS, default ./runs)
      last_dataset.json                       the dataset `rank` ran on last (default of other commands)
      <dataset>/                              dataset key: `av-digits`, `av-digits@visual-dominant`,
                                              `cremad@r<recipe hash>` (non-default --recipe options), …
        rank.json                             scores, ranking and dominant modality
        rank/<modality>/s<seed>/              one unimodal run (files as a train run)
        train/<method>[+k=v…]-<fusion>[+k=v…]-s<seed>/   (method options, then training options)
          config.json                         the resolved RunConfig (+ command line, versions)
          metrics.jsonl                       one line per epoch
          best.pt                             checkpoint selected on --select-split (config inside)
          result.json                         test metrics of the selected checkpoint
        train/.<run>.partial/                 a run being trained, renamed to <run>/ when finished:
          state.pt                            the full training state after the last epoch (resume)
          failed.json                         when the loss diverged: the epoch and the error
        train/.<run>.lock                     held by the process writing <run> (pid, host, start)
        train/.<run>.old/                     the run a --force replacement moves aside until it has finished
        compare/results.csv                   one row per run of the last `pdmp compare` grid
        compare/failures.json                 full tracebacks of that grid's failed runs
        report/                               `pdmp report`: report.md/.html, results.csv, paired.csv,
                                              diagnostics.csv, results.tex, figures/*.png
      report/                                 `pdmp report --all`: one table across datasets

README.md ("The run directory") shows the same layout to users; keep the two in step.

Every JSON file carries `schema_version` and is validated on read against its kind's schema (the
error names the file and the field). Every write goes to a temporary file in the same folder that
is flushed, fsynced and renamed over the target (then the folder is fsynced), so a reader never
sees a half-written file whatever moment the process dies at. A failed write (read-only or full
disk) is a PdmpError naming the path.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pdmp_cli.config import SCHEMA_VERSION
from pdmp_cli.errors import PdmpError
from pdmp_cli.faults import kill_point

CONFIG, METRICS, CHECKPOINT, RESULT = "config.json", "metrics.jsonl", "best.pt", "result.json"
STATE, FAILED = "state.pt", "failed.json"  # resume point while training; the record of a diverged run


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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the identity of a checkpoint another run is built on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


# ---- writing: temp file beside the target, flush, fsync, rename, fsync the folder ------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def fs_error(path: Path, exc: OSError) -> PdmpError:
    """A one-line error for a failed file operation (read-only or full disk, permissions, a file in the way)."""
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EROFS: "choose a writable --runs-dir", errno.EACCES: "check its permissions or choose another --runs-dir",
            errno.EPERM: "check its permissions or choose another --runs-dir",
            errno.ENOTDIR: "a file is in the way of a folder of that path; move it or choose another --runs-dir"}
    return PdmpError(f"cannot write {path}: {reason}; {hint.get(exc.errno, 'check the disk and its permissions')} "
                     f"and re-run (files already written are intact)")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a crash right after it may otherwise undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, rename over it, fsync the folder.

    Readers see the old file or the new one, never a mixture; OSError becomes a PdmpError naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; the target gets the usual mode
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            kill_point(f"write:{path.name}")  # test hook: die with the new content written but not renamed
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise fs_error(path, exc) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def is_temp_file(path: Path) -> bool:
    """A temp file of atomic_write left by a process that died before its rename."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), mode="wb")


def write_json(path: Path, data: dict[str, Any]) -> None:
    payload = {"schema_version": SCHEMA_VERSION, **data}
    atomic_write(path, lambda f: json.dump(payload, f, indent=2, sort_keys=False, default=str))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


# ---- reading: every JSON file is validated against the schema of its kind ------------------------

NUMBER = (int, float)
# Required fields and their types per file kind; a dotted name is a field inside a field.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "config": {"config": dict, "config_hash": str, "recipe_hash": str, "command": list, "environment": dict,
               "started": str},
    "result": {"run": str, "dataset": str, "dataset_key": str, "recipe_hash": str, "config_hash": str,
               "setting_hash": str, "method": str, "variant": str, "setting_tag": str, "fusion": str, "seed": int,
               "best_epoch": int, "selection": dict, "selection.split": str, "selection.metric": str,
               "val": dict, "test": dict, "test.accuracy": NUMBER, "test.macro_f1": NUMBER,
               "test.modality_accuracy": dict, "started": str, "finished": str},
    "rank": {"dataset": str, "dataset_key": str, "recipe_hash": str, "metric": str, "split": str,
             "select_split": str, "modalities": dict, "ranking": list, "dominant": str, "created": str},
    "last_dataset": {"dataset": str, "dataset_key": str},
    "failed": {"error": str, "epoch": int, "failed": str},
    "lock": {"pid": int, "host": str, "started": str},
}
KIND_OF_FILE = {CONFIG: "config", RESULT: "result", "rank.json": "rank", "last_dataset.json": "last_dataset",
                FAILED: "failed"}


def _type_name(t: type | tuple[type, ...]) -> str:
    return "a number" if t == NUMBER else {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(t, str(t))


def check_fields(data: dict[str, Any], fields: dict[str, Any], where: str) -> None:
    for name, expected in fields.items():
        value: Any = data
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise PdmpError(f"{where}: field {name!r} is missing; delete the file and re-run the command "
                                f"that wrote it")
            value = value[part]
        wrong_bool = isinstance(value, bool) and expected is not bool
        bad_number = expected == NUMBER and isinstance(value, float) and not math.isfinite(value)
        if wrong_bool or bad_number or not isinstance(value, expected):
            raise PdmpError(f"{where}: field {name!r} should be {_type_name(expected)}, not {json.dumps(value)[:40]}; "
                            f"delete the file and re-run the command that wrote it")


def read_json(path: Path, required: tuple[str, ...] = (), *, kind: str | None = None) -> dict[str, Any]:
    """A JSON object written by write_json, validated: schema_version, the fields of its kind, `required`.

    The kind defaults to the one of its file name (config.json, result.json, rank.json, …).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode())
    except FileNotFoundError:
        raise PdmpError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PdmpError(f"{path} is not valid JSON ({str(exc)[:80]}); delete it and re-run the command that wrote it") from None
    except OSError as exc:
        raise PdmpError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise PdmpError(f"{path} is not a JSON object; delete it and re-run the command that wrote it")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise PdmpError(f"{path}: field 'schema_version' is {json.dumps(version)[:40]}, not {SCHEMA_VERSION}; "
                        f"re-create it with this pdmp")
    kind = kind or KIND_OF_FILE.get(path.name)
    check_fields(data, {**(SCHEMAS[kind] if kind else {}), **{f: object for f in required}}, str(path))
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when it does not exist); a bad line names the file and line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise PdmpError(f"{path} is not UTF-8 text; delete it and re-run the command that wrote it") from None
    except OSError as exc:
        raise PdmpError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PdmpError(f"{path}, line {n}: not valid JSON ({str(exc)[:80]}); delete the file and re-run") from None
        if not isinstance(record, dict):
            raise PdmpError(f"{path}, line {n}: not a JSON object; delete the file and re-run")
        records.append(record)
    return records


# ---- one writer per run directory --------------------------------------------------------------------

def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


class RunLock:
    """Exclusive right to write `run_dir`, held by one process (flock on `.<run>.lock` beside it).

    The kernel drops the lock when its process dies however it dies, so the lock of a dead process
    (its file still naming it) is taken over: `stale` then holds what that file said. The file
    records pid, host, start time and command, which a refused process names in its error.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise fs_error(self.path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _lock_info(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise fs_error(self.path, exc) from exc
                raise PdmpError(f"{self.run_dir} is being written by {describe_holder(holder)}; wait for it to "
                                f"finish or stop it (a lock whose process died is taken over automatically)") from None
            try:  # the file may have been released and removed between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _lock_info(fd)
            self.stale = previous if previous and previous.get("pid") != os.getpid() else None
            info = json.dumps({"schema_version": SCHEMA_VERSION, "pid": os.getpid(), "host": socket.gethostname(),
                               "started": timestamp(), "command": sys.argv}).encode()
            try:  # written in place: the lock lives on this inode, so no rename here
                os.ftruncate(fd, 0)
                os.pwrite(fd, info, 0)
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                raise fs_error(self.path, exc) from exc
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting process retries on a new file
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lock_info(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode())
    except (OSError, ValueError):
        return None  # empty (its holder has just created it) or unreadable
    return data if isinstance(data, dict) else None


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it has just started)"
    command = " ".join(str(a) for a in info.get("command") or [])
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"
            + (f" ({command[:120]})" if command else ""))
