"""Where the runs of a grid execute: in this process, in N local worker processes, or as Ray tasks.

Every backend runs the same picklable `Job` through the same `execute` (experiments.train_run in a
quiet session) and reports each outcome back to the parent, which alone writes the grid's CSV and
draws the progress view. Runs never share files: each has its own directory, built in a staging
folder and renamed into place, under the run's lock (layout.RunLock), so parallel workers or cluster
nodes on a shared file system never collide. Scheduling is the executor's (concurrent.futures) or
Ray's; pdmp has no scheduler.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pdmp_cli.errors import PdmpError

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    index: int
    config: dict[str, Any]  # RunConfig.to_dict()
    run_dir: str
    runs_root: str
    force: bool = False
    threads: int | None = None  # torch CPU threads of this run (None: torch's default)
    argv: list[str] = field(default_factory=list)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, PdmpError) else f"{type(exc).__name__}: {text}"


_events: Any = None  # queue through which local workers announce the job they start


def execute(job: Job) -> dict[str, Any]:
    """Train one run; never raises for a failed run (its error is returned), so the grid goes on."""
    started = time.time()
    if _events is not None:
        _events.put(job.index)
    try:
        import torch

        from pdmp_cli.config import RunConfig
        from pdmp_cli.experiments import Session, train_run
        from pdmp_cli.layout import Layout

        if job.threads:
            torch.set_num_threads(job.threads)
        session = Session(Layout(job.runs_root), quiet=True, argv=job.argv)
        result = train_run(session, RunConfig.from_dict(job.config), Path(job.run_dir), job.force)
        # torch's CPU reductions depend on the thread count: recorded, as results may differ in the last digits
        return {"index": job.index, "status": "trained", "result": result, "seconds": time.time() - started,
                "threads": torch.get_num_threads()}
    except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded, not raised
        return failed(job, one_line(exc), time.time() - started) | {"traceback": traceback.format_exc()}


def failed(job: Job, error: str, seconds: float = 0.0) -> dict[str, Any]:
    """The outcome of a run that did not finish (as the parent records it)."""
    return {"index": job.index, "status": "failed", "error": error, "seconds": seconds}


def _init_worker(events: Any, gpus: Any, threads: int | None) -> None:
    """Runs first in each spawned worker: before torch is imported, pin this worker to one GPU."""
    global _events
    _events = events
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


Started = Callable[[int], None]
Finished = Callable[[dict[str, Any]], None]


def run_inline(jobs: list[Job], started: Started, finished: Finished) -> None:
    for job in jobs:
        started(job.index)
        finished(execute(job))


def run_local(jobs: list[Job], workers: int, gpus: int, started: Started, finished: Finished, retry: bool = True) -> None:
    """N spawned worker processes (one per GPU when `gpus`); a dead worker fails only its own run.

    A worker that dies (out of memory, killed) breaks the whole pool, and the executor stops the
    runs training in the other workers too. Those runs are retried one at a time, each alone in a
    fresh one-worker pool: they resume from their last saved epoch, and the run that kills its
    worker again fails alone. Runs that had not started go to a fresh N-worker pool.
    """
    context = multiprocessing.get_context("spawn")  # fork after torch has threads is unsafe
    remaining = list(jobs)
    while remaining:
        events = context.Queue()
        gpu_ids = None
        if gpus:
            gpu_ids = context.Queue()
            for i in range(workers):
                gpu_ids.put(i % gpus)
        begun: set[int] = set()

        def drain() -> None:
            while True:
                try:
                    index = events.get_nowait()
                except queue.Empty:
                    return
                begun.add(index)
                started(index)

        broken: list[Job] = []
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(events, gpu_ids, remaining[0].threads))
        try:
            futures = {pool.submit(execute, job): job for job in remaining}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    job = futures[future]
                    try:
                        finished(future.result())
                    except BrokenProcessPool as exc:
                        broken.append(job)
                        if job.index in begun and not retry:  # it broke its own one-worker pool again
                            finished(failed(job, f"worker process died ({exc or 'killed'})"))
        except BaseException:  # Ctrl-C: queued runs are dropped; running ones save their epoch for resume
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        drain()
        if retry:
            for job in (job for job in broken if job.index in begun):
                run_local([job], 1, gpus, started, finished, retry=False)
        remaining = [job for job in broken if job.index not in begun]


def run_ray(jobs: list[Job], address: str | None, use_gpus: bool, started: Started, finished: Finished) -> None:
    """Each run is a Ray task (num_gpus=1 when the grid trains on CUDA); Ray schedules them."""
    try:
        import ray
    except ImportError:
        raise PdmpError("--backend ray needs Ray: pip install 'pdmp[ray]' (or pip install ray)") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:  # address None: RAY_ADDRESS or a running local cluster, else a new local instance
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise PdmpError(f"cannot connect to Ray at {address or 'the default address'} ({one_line(exc)}); "
                            f"start it with `ray start --head` or pass --address HOST:PORT") from None
    if use_gpus and not ray.cluster_resources().get("GPU"):
        if started_here:
            ray.shutdown()
        raise PdmpError("the grid trains on CUDA but the Ray cluster has no GPU; add GPU nodes or pass --device cpu")
    try:
        task = ray.remote(execute).options(num_cpus=jobs[0].threads or 1, num_gpus=1 if use_gpus else 0,
                                           max_retries=0)
        refs = {task.remote(job): job for job in jobs}
        for job in jobs:
            started(job.index)  # submitted: Ray decides when each starts
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in ready:
                job = refs.pop(ref)
                try:
                    finished(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - a lost worker or node fails that run only
                    finished(failed(job, one_line(exc)))
    finally:
        if started_here:
            ray.shutdown()
