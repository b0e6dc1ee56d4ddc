"""Crash recovery and run-directory safety: SIGKILL at named points then resume, Ctrl-C, locks, --force.

The subprocess tests run `python -m pdmp_cli train` with the test hooks of pdmp_cli/faults.py
(PDMP_TEST_KILL_AT makes the process SIGKILL itself at a named point; PDMP_TEST_WAIT_AT holds it
there) and compare the finished run with one that was never interrupted, number for number.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdmp_cli.engine import STATE_FIELDS, load_checkpoint
from pdmp_cli.layout import is_temp_file, lock_path, read_json, read_jsonl
from tests.conftest import TINY_SAMPLES

KEY = f"av-digits@n{TINY_SAMPLES}"
# OGM-GE draws gradient noise from torch's RNG every step: a resume that restored any RNG wrongly shows.
RUN = "ogm-ge-concat+epochs=3+width=4-s0"
TRAIN = ["train", "--method", "ogm-ge", "--samples", str(TINY_SAMPLES), "--epochs", "3", "--width", "4"]
COMPARE = ["compare", "--methods", "ogm-ge", "--seeds", "0", *TRAIN[3:]]  # the same run, as a grid of one


def pdmp(runs: Path, data_root: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "pdmp_cli", *args, "--runs-dir", str(runs), "--data-dir", str(data_root)]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def check_every_file_parses(train_dir: Path) -> list[str]:
    """Every file a run directory holds parses as its kind; returns the names seen (temp files excepted)."""
    seen = []
    for path in sorted(p for p in train_dir.rglob("*") if p.is_file()):
        if is_temp_file(path) or path.suffix == ".lock":
            continue
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".jsonl":
            assert read_jsonl(path)
        elif path.name == "state.pt":
            load_checkpoint(path, STATE_FIELDS)
        elif path.suffix == ".pt":
            load_checkpoint(path)
        else:
            raise AssertionError(f"unexpected file {path}")
        seen.append(f"{path.parent.name}/{path.name}")
    return seen


def same_run(a: Path, b: Path) -> None:
    """Two finished runs have the same per-epoch metrics, result numbers and selected weights."""
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    ra, rb = read_json(a / "result.json"), read_json(b / "result.json")
    for key in ("best_epoch", "selection", "val", "test", "config_hash", "recipe_hash"):
        assert ra[key] == rb[key], key
    wa, wb = load_checkpoint(a / "best.pt")["model"], load_checkpoint(b / "best.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root, tiny):
    """The run trained once, never interrupted."""
    runs = tmp_path_factory.mktemp("reference")
    out = pdmp(runs, data_root, *TRAIN, "--quiet")
    assert out.returncode == 0, out.stderr
    return runs / KEY / "train" / RUN


def interrupt_at(point: str, runs: Path, data_root: Path, workdir: Path, signum: int = signal.SIGINT):
    """Run TRAIN until it reaches `point`, send `signum` (Ctrl-C), let it go on; returns (exit code, stderr)."""
    release = workdir / f"release-{point.replace(':', '-')}"
    proc = pdmp(runs, data_root, *TRAIN, env={"PDMP_TEST_WAIT_AT": point, "PDMP_TEST_WAIT_FOR": str(release)}, wait=False)
    deadline = time.time() + 120
    while not Path(f"{release}.waiting").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signum)
    time.sleep(0.5)
    release.touch()  # only a process that deferred the interrupt (saving an epoch) gets here
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, " ".join(stderr.split())


def test_killed_or_interrupted_at_any_moment_the_rerun_ends_as_if_never_interrupted(tmp_path, data_root, reference):
    """One run stopped eight times in a row at a different point each time, each rerun resuming the last."""
    train = tmp_path / KEY / "train"
    partial, final = train / f".{RUN}.partial", train / RUN
    stops = [  # (how, point): what the run directory holds once the process has stopped
        # Counts are per process: a resumed process counts its steps from its own start.
        ("kill", "batch:1"),  # in epoch 0: no epoch saved yet
        ("ctrl-c", "batch:3"),  # fresh start; in epoch 1 (2 steps per epoch): epoch 0 saved
        ("ctrl-c", "write:state.pt"),  # resumed; while saving epoch 1: the save completes first
        ("sigterm", "batch:1"),  # resumed; in epoch 2: a pre-empted job stops like Ctrl-C
        ("kill", "batch:1"),  # resumed; in epoch 2
        ("kill", "write:state.pt"),  # resumed; writing epoch 2's state: temp file complete, not yet renamed
        ("kill", "epoch"),  # resumed; epoch 2's state saved, best.pt and metrics.jsonl not yet rewritten
        ("kill", "write:result.json"),  # by `compare`: resumed; all saved, test evaluated, result.json being written
    ]
    saved_epochs = []
    for how, point in stops:
        if how == "kill":
            command = COMPARE if point == "write:result.json" else TRAIN  # a grid resumes its runs the same way
            out = pdmp(tmp_path, data_root, *command, env={"PDMP_TEST_KILL_AT": point})
            assert out.returncode == -signal.SIGKILL, (point, out.stdout, out.stderr)
            assert lock_path(final).exists()  # a dead holder's lock stays behind
        else:
            signum = signal.SIGTERM if how == "sigterm" else signal.SIGINT
            code, message = interrupt_at(point, tmp_path, data_root, tmp_path, signum)
            assert code == 130, message
            saved = 1 if point == "batch:3" else 2
            assert f"interrupted: {saved} of 3 epochs of {RUN} are saved in" in message and "re-run the same command" in message
            assert not lock_path(final).exists()  # released on the way out
        assert not final.exists()
        check_every_file_parses(train)
        state = partial / "state.pt"
        saved_epochs.append(load_checkpoint(state, STATE_FIELDS)["epoch"] if state.exists() else None)
        if point == "epoch":  # derived files lag one epoch behind the state: the rerun rewrites them
            assert len(read_jsonl(partial / "metrics.jsonl")) == 2
    assert saved_epochs == [None, 0, 1, 1, 1, 1, 2, 2]
    assert any(is_temp_file(p) for p in partial.iterdir())  # the killed writes left temp files, never targets

    out = pdmp(tmp_path, data_root, *TRAIN)  # not --quiet: it says what it did
    assert out.returncode == 0, out.stderr
    assert "took over the lock" in out.stdout and "resuming" in out.stdout
    assert not partial.exists() and not lock_path(final).exists()
    assert sorted(check_every_file_parses(train)) == [f"{RUN}/{f}" for f in ("best.pt", "config.json", "metrics.jsonl", "result.json")]
    same_run(final, reference)
    result = read_json(final / "result.json")
    assert result["resumed_after_epoch"] == 2 and len(result["resumed"]) == len(stops)  # every rerun recorded
    assert read_json(final / "config.json")["command"][1:] == [*TRAIN, "--runs-dir", str(tmp_path), "--data-dir", str(data_root)]


def test_two_trainings_into_one_run_directory_one_wins(tmp_path, data_root, tiny):
    args = ["train", "--method", "joint", "--samples", str(TINY_SAMPLES), "--epochs", "1", "--width", "4", "--quiet"]
    release = tmp_path / "release"
    first = pdmp(tmp_path, data_root, *args, env={"PDMP_TEST_WAIT_AT": "batch", "PDMP_TEST_WAIT_FOR": str(release)},
                 wait=False)
    deadline = time.time() + 120
    while not Path(f"{release}.waiting").exists():  # the first holds the lock, mid-epoch
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.1)
    second = pdmp(tmp_path, data_root, *args)
    release.touch()
    assert first.wait(timeout=120) == 0, first.communicate()
    assert second.returncode == 2
    line = " ".join(second.stderr.split())
    assert f"is being written by pid {first.pid} on " in line and "wait for it to finish" in line
    assert len(second.stderr.strip().splitlines()) == 1 or "error:" in second.stderr.splitlines()[0]
    run = tmp_path / KEY / "train" / "joint-concat+epochs=1+width=4-s0"
    assert read_json(run / "result.json")["seed"] == 0 and check_every_file_parses(run.parent)


def test_every_run_records_how_to_reproduce_it_and_deterministic_mode_repeats_it(tmp_path, data_root, tiny):
    from typer.testing import CliRunner

    from pdmp_cli.cli import app

    args = ["train", "--method", "joint", "--samples", str(TINY_SAMPLES), "--epochs", "2", "--width", "4", "--quiet",
            "--runs-dir", str(tmp_path), "--data-dir", str(data_root)]
    run = tmp_path / KEY / "train" / "joint-concat+epochs=2+width=4-s0"
    assert CliRunner().invoke(app, args).exit_code == 0
    first = read_json(run / "result.json")
    assert CliRunner().invoke(app, [*args, "--deterministic", "--force"]).exit_code == 0
    assert not torch.are_deterministic_algorithms_enabled()  # switched on for the run only
    again = read_json(run / "result.json")
    assert again["test"] == first["test"] and again["val"] == first["val"]  # same command, same seed: same numbers

    config = read_json(run / "config.json")
    assert config["deterministic"] is True and config["config"]["deterministic"] is True
    assert config["seed"] == 0  # (the command line is checked on a real process in the kill test)
    assert config["recipe_hash"] == tiny.recipe_hash and config["device"] == "cpu"
    env = config["environment"]
    assert env["torch"] == torch.__version__ and env["packages"]["numpy"] and env["python"]
    assert "git_commit" in env and (env["git_commit"] is None or len(env["git_commit"]) == 40)
    assert config["started"] <= again["finished"] and again["started"] == config["started"]
