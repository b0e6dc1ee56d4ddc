"""Bad input and bad files: one clear line, exit code 2, nothing lost; readers fuzzed with hypothesis.

Bad option values (lr, γ, epochs, seeds, names) are in the table of tests/test_cli.py; this file
holds the cases that need files: rank.json for another dataset / recipe / modality set, damaged
run files, a data or runs directory that is a file, a full or read-only disk, pickled checkpoints.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from pdmp_cli.cli import app
from pdmp_cli.config import SCHEMA_VERSION
from pdmp_cli.data.cache import read_manifest_csv
from pdmp_cli.engine import load_checkpoint
from pdmp_cli.errors import PdmpError
from pdmp_cli.experiments import Session, train_run
from pdmp_cli.layout import SCHEMAS, Layout, RunLock, lock_path, read_json, read_jsonl, write_json
from tests.conftest import TINY_SAMPLES

KEY = f"av-digits@n{TINY_SAMPLES}"
JOINT = "joint-concat+epochs=1+width=4-s0"


def invoke(runs: Path, data_root: Path, *args: str):
    return CliRunner().invoke(app, [*args, "--samples", str(TINY_SAMPLES), "--epochs", "1", "--width", "4", "--quiet",
                                    "--runs-dir", str(runs), "--data-dir", str(data_root)])


def one_line_error(out, message: str) -> None:
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert text.startswith("error: ") and message in text, out.output


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root, tiny):
    """A runs directory with a rank.json and one finished joint run; tests copy it."""
    runs = tmp_path_factory.mktemp("runs")
    out = invoke(runs, data_root, "train", "--method", "joint")
    assert out.exit_code == 0, out.output
    rank = {"dataset": "av-digits", "dataset_key": KEY, "preset": "audio-dominant", "samples": TINY_SAMPLES,
            "recipe_hash": tiny.recipe_hash, "metric": "accuracy", "split": "val", "select_split": "val",
            "modalities": {"audio": {"score": 0.8}, "visual": {"score": 0.5}}, "ranking": ["audio", "visual"],
            "dominant": "audio", "created": "2026-01-01T00:00:00+00:00"}
    write_json(runs / KEY / "rank.json", rank)
    return runs


def copy_of(finished: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(finished, tmp_path / "runs")
    return tmp_path / "runs"


def edit_rank(runs: Path, **changes) -> None:
    path = runs / KEY / "rank.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"dataset": "cremad", "dataset_key": "cremad"}, "was made for cremad"),
    ({"recipe_hash": "0123456789ab"}, "(recipe 0123456789ab), not"),
    ({"ranking": ["audio", "depth"]}, "ranks the modalities audio,depth, but the run uses audio,visual"),
    ({"ranking": None}, "rank.json: field 'ranking' is missing"),
    ({"ranking": "audio"}, "rank.json: field 'ranking' should be a list"),
    ({"schema_version": 99}, "rank.json: field 'schema_version' is 99, not 1"),
])
def test_a_rank_json_that_does_not_fit_is_refused(finished, tmp_path, data_root, changes, message):
    runs = copy_of(finished, tmp_path)
    edit_rank(runs, **changes)
    before = snapshot(runs)
    one_line_error(invoke(runs, data_root, "train", "--method", "pdmp"), message)
    assert snapshot(runs) == before


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text(p.read_text()[:40]), "result.json is not valid JSON"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "test": {"accuracy": "high"}})),
     "result.json: field 'test.accuracy' should be a number"),
    (lambda p: p.write_text("[1, 2]"), "result.json is not a JSON object"),
])
def test_a_damaged_result_is_reported_and_kept(finished, tmp_path, data_root, damage, message):
    runs = copy_of(finished, tmp_path)
    damage(runs / KEY / "train" / JOINT / "result.json")
    before = snapshot(runs)
    one_line_error(invoke(runs, data_root, "train", "--method", "joint"), message)
    assert snapshot(runs) == before


def test_data_or_runs_directory_that_is_a_file(finished, tmp_path, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_line_error(invoke(tmp_path / "runs", blocker, "train", "--method", "joint"),
                   f"--data-dir {blocker} is a file, not a folder")
    one_line_error(invoke(blocker / "runs", data_root, "train", "--method", "joint"),
                   f"cannot write {blocker}/runs/{KEY}/train/.{JOINT}.lock: Not a directory")


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "No space left on device; free some space"),
    (errno.EROFS, "Read-only file system; choose a writable --runs-dir"),
])
def test_a_full_or_read_only_disk_loses_nothing(finished, tmp_path, data_root, monkeypatch, code, message):
    """--force over a finished run on a disk that fails: one line naming the file; the old run is intact."""
    runs = copy_of(finished, tmp_path)
    before = snapshot(runs)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:  # fails the writes into the new run's staging folder
        if ".partial" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    one_line_error(invoke(runs, data_root, "train", "--method", "joint", "--force"),
                   f"cannot write {runs}/{KEY}/train/.{JOINT}.partial/config.json: {message}")
    assert snapshot(runs) == before  # no staging folder, no temp file, no lock left; the old run untouched


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("PDMP_DEBUG", "")  # restored after the test (--debug sets it for the process)
    out = CliRunner().invoke(app, ["--debug", "train", "--method", "pdmpp"])
    assert isinstance(out.exception, PdmpError) and "Did you mean 'pdmp'" in str(out.exception)


# ---- checkpoints ---------------------------------------------------------------------------------

class Payload:
    """An object whose unpickling would run code: a checkpoint holding one must be refused."""

    ran = False

    def __reduce__(self):
        return (Payload._run, ())

    @staticmethod
    def _run():
        Payload.ran = True
        return "ran"


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path, finished):
    good = load_checkpoint(finished / KEY / "train" / JOINT / "best.pt")
    path = tmp_path / "best.pt"
    torch.save({**good, "extra": Payload()}, path)
    with pytest.raises(PdmpError, match="contains pickled Python objects, which pdmp refuses to load"):
        load_checkpoint(path)
    assert not Payload.ran
    assert set(good) >= {"config", "epoch", "model", "method", "selection"}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on random bytes
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_any_bytes_as_a_checkpoint_give_a_one_line_error(tmp_path, data):
    path = tmp_path / "state.pt"
    path.write_bytes(data)
    with pytest.raises(PdmpError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---- readers under malformed input (hypothesis) -------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
                           max_leaves=12)
FILE_NAMES = st.sampled_from(["config.json", "result.json", "rank.json", "last_dataset.json", "failed.json", "other.json"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=FILE_NAMES, content=st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_read_json_accepts_a_valid_file_or_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    try:
        data = read_json(path)
    except PdmpError as exc:
        assert str(exc).startswith(str(path)) or str(path) in str(exc)
        return
    assert isinstance(data, dict) and data["schema_version"] == SCHEMA_VERSION  # only a valid file gets here


def valid_example(kind: str) -> dict:
    """A minimal file of `kind` that passes validation, built from its schema."""
    samples = {str: "x", int: 1, list: [], dict: {}, (int, float): 0.5}
    data: dict = {"schema_version": SCHEMA_VERSION}
    for name, expected in SCHEMAS[kind].items():
        *parents, leaf = name.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, copy.deepcopy(samples[expected]))
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(SCHEMAS)), pick=st.integers(min_value=0), replacement=JSON_VALUES | st.just("<missing>"))
def test_a_missing_or_mistyped_field_is_named(tmp_path, kind, pick, replacement):
    data = valid_example(kind)
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(data))
    assert read_json(path, kind=kind) == data
    field = sorted(SCHEMAS[kind])[pick % len(SCHEMAS[kind])]
    *parents, leaf = field.split(".")
    node = data
    for part in parents:
        node = node[part]
    if replacement == "<missing>":
        del node[leaf]
    else:
        node[leaf] = replacement
    path.write_text(json.dumps(data))
    try:
        read_json(path, kind=kind)
    except PdmpError as exc:
        assert str(exc).startswith(f"{path}: field '") and ("missing" in str(exc) or "should be" in str(exc))
        named = str(exc).split("'")[1]
        assert named == field or field.startswith(named + ".") or named.startswith(field + ".")  # or inside it
        return
    expected = SCHEMAS[kind][field]  # accepted: the replacement has the right type
    assert isinstance(replacement, expected) and not isinstance(replacement, bool)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=40) | JSON_VALUES.map(lambda v: json.dumps(v).encode()), max_size=5))
def test_read_jsonl_returns_objects_or_names_the_line(tmp_path, lines):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        records = read_jsonl(path)
    except PdmpError as exc:
        assert str(exc).startswith(str(path))
        return
    assert all(isinstance(r, dict) for r in records)


CELLS = st.text(alphabet=string.ascii_letters + string.digits + ',"\n\r /.\x00é', max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["id", "label", "split", "audio_path", "visual_path", "extra"]), max_size=6),
       rows=st.lists(st.lists(CELLS, max_size=7), max_size=4), junk=st.binary(max_size=20))
def test_the_manifest_csv_reader_gives_rows_or_a_clear_error(tmp_path, header, rows, junk):
    (tmp_path / "a.wav").write_bytes(b"")
    path = tmp_path / "manifest.csv"
    text = "\n".join([",".join(header)] + [",".join(r) for r in rows]).encode()
    path.write_bytes(text + (junk if len(rows) % 2 else b""))
    try:
        out = read_manifest_csv(path, ["audio"])
    except PdmpError as exc:
        assert str(path) in str(exc)
        return
    assert all(r["split"] in ("train", "val", "test") and os.path.exists(r["audio_path"]) for r in out)


# ---- locks -----------------------------------------------------------------------------------------

def test_a_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "train" / "joint-concat-s0"
    with RunLock(run) as held:
        info = json.loads(lock_path(run).read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"] and held.stale is None
        with pytest.raises(PdmpError, match=rf"is being written by pid {os.getpid()} on "):
            RunLock(run).acquire()  # a second holder, even in the same process
    assert not lock_path(run).exists()
    dead = {"schema_version": 1, "pid": 2**22 + 17, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}
    lock_path(run).write_text(json.dumps(dead))  # left by a process killed while holding it
    with RunLock(run) as taken:
        assert taken.stale == dead
    assert not lock_path(run).exists()


def test_train_run_refuses_a_locked_run_and_a_force_killed_mid_swap_is_recovered(finished, tmp_path, tiny, monkeypatch):
    from pdmp_cli import experiments

    runs = copy_of(finished, tmp_path)
    session = Session(Layout(runs), quiet=True)
    run_dir = runs / KEY / "train" / JOINT
    cfg = experiments.RunConfig.from_dict(read_json(run_dir / "config.json")["config"])
    with RunLock(run_dir):
        with pytest.raises(PdmpError, match="is being written by pid"):
            train_run(session, cfg, run_dir, force=True)
    old_result = read_json(run_dir / "result.json")

    class Killed(BaseException):
        pass

    def kill_at_publish(name: str) -> None:
        if name == "publish":
            raise Killed  # as if the process died between its two renames
    monkeypatch.setattr(experiments, "kill_point", kill_at_publish)
    with pytest.raises(Killed):
        train_run(session, cfg, run_dir, force=True)
    assert not run_dir.exists() and (run_dir.parent / f".{JOINT}.old" / "result.json").exists()
    monkeypatch.undo()
    result = train_run(session, cfg, run_dir)  # the finished staging run is moved into place, not retrained
    assert result["test"] == old_result["test"] and result["finished"] >= old_result["finished"]
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [JOINT]
