"""Test hooks that stop the process at a named point, to test recovery from crashes and interruptions.

PDMP_TEST_KILL_AT=POINT[:N] makes the process SIGKILL itself the N-th time (default 1) it passes
POINT. PDMP_TEST_WAIT_AT=POINT[:N] with PDMP_TEST_WAIT_FOR=PATH makes it wait there until PATH
exists (creating PATH.waiting meanwhile), so that a test can hold a run's lock or send Ctrl-C at a
known moment. Points: `batch` (after a training step), `epoch` (after an epoch's state.pt is
saved, before best.pt and metrics.jsonl are rewritten), `write:<file name>` (inside an atomic
write: the new content is in the temp file, not yet renamed over the target), `publish` (under
--force, between moving the old run aside and the new one into place). With PDMP_TEST_KILL_ONCE=PATH
only the first process to get there dies (it creates PATH first): a worker pool loses one worker.
Unset, as always outside tests, they cost two dict lookups.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_passed: dict[str, int] = {}


def _matches(spec: str | None, name: str) -> bool:
    if not spec:
        return False
    point, _, count = spec.rpartition(":")
    if not count.isdigit():
        point, count = spec, "1"
    return point == name and _passed[name] == int(count)


def kill_point(name: str) -> None:
    kill, wait = os.environ.get("PDMP_TEST_KILL_AT"), os.environ.get("PDMP_TEST_WAIT_AT")
    if not (kill or wait):
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _matches(wait, name):
        release = Path(os.environ["PDMP_TEST_WAIT_FOR"])
        Path(f"{release}.waiting").touch()
        while not release.exists():
            time.sleep(0.05)
    if _matches(kill, name):
        once = os.environ.get("PDMP_TEST_KILL_ONCE")
        if once:
            try:
                Path(once).touch(exist_ok=False)
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
