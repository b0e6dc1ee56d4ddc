"""Several processes training one run: `torchrun --nproc-per-node N -m pdmp_cli train …` or `pdmp train --nproc N`.

The process group comes from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); `launch` sets the same variables for N local processes. CPU runs use gloo, CUDA runs nccl
with one GPU per local rank. Everything here is the identity on one process, so the engine calls it
unconditionally. What the engine does with it (engine.py): every process draws the same seeded
permutation and trains on its contiguous share of each global batch; Trainer.sync_gradients sums the
share-weighted gradients; BatchNorm statistics are those of the global batch (`sync_batchnorm`);
evaluation is sharded and its predictions gathered; rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pdmp_cli.errors import PdmpError

T = TypeVar("T")
TIMEOUT_ENV = "PDMP_DIST_TIMEOUT"  # seconds a collective may wait for the other processes (default 600)
LAUNCHED_ENV = "PDMP_LAUNCHED"  # set by `launch`: it reports the failure that ended the run, once
PEER_LOST_EXIT = 3  # exit code of a process that stopped because another one failed (launch reports that one)


class PeerLost(PdmpError):
    """A collective failed: another process died or stopped answering."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


_world = World()


def world() -> World:
    return _world


def is_main() -> bool:
    return _world.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun (or `launch`) set it; 1 outside such a launch."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise PdmpError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun or --nproc") from None


def check_device(device: str, processes: int) -> None:
    """Several processes take one GPU each (the local rank's): a fixed cuda:N would put them all on one."""
    if processes > 1 and device.startswith("cuda:"):
        raise PdmpError(f"--device {device} names one GPU, but {processes} processes each need their own; use "
                        f"--device cuda (process r trains on GPU r) or set CUDA_VISIBLE_DEVICES")


def check_batch_size(batch_size: int, processes: int) -> None:
    if processes > 1 and batch_size % processes:
        raise PdmpError(f"--batch-size {batch_size} does not divide across {processes} processes; use a multiple of "
                        f"{processes} (the global batch is split evenly) or another process count")


@contextlib.contextmanager
def process_group(on_cuda: bool) -> Iterator[World]:
    """Join the process group the environment describes (nothing to join on one process); leave it at the end."""
    global _world
    size = env_world_size()
    if size <= 1:
        yield _world
        return
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise PdmpError(f"WORLD_SIZE={size} but RANK={os.environ.get('RANK')!r} and LOCAL_RANK="
                        f"{os.environ.get('LOCAL_RANK')!r}: each process needs its integer RANK; start the processes "
                        f"with torchrun or --nproc") from None
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise PdmpError(f"local rank {local_rank} has no GPU (torch sees {torch.cuda.device_count()}); start at "
                            f"most one process per GPU")
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    # torch._dynamo, imported lazily by the first optimizer or torch.compile, keeps a process group that exists
    # when it is first imported alive past destroy_process_group (torch 2.13); its gloo threads are then torn
    # down at interpreter exit, which aborts the process at random (SIGABRT, "terminate called without an
    # active exception"). Imported before the group exists, it holds nothing.
    import torch._dynamo  # noqa: F401
    try:
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timeout)
    except Exception as exc:
        raise PdmpError(f"process {rank} could not join the process group at {os.environ.get('MASTER_ADDR')}:"
                        f"{os.environ.get('MASTER_PORT')} ({first_line(exc)}); check MASTER_ADDR/MASTER_PORT") from None
    _world = World(rank, size, local_rank)
    try:
        yield _world
    except PeerLost:
        if os.environ.get(LAUNCHED_ENV):  # the launcher prints the error of the process that failed first
            raise SystemExit(PEER_LOST_EXIT) from None
        raise
    finally:
        _world = World()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """One GPU per local rank: a bare `cuda` means this process's GPU."""
    if device.type == "cuda" and device.index is None and _world.size > 1:
        return torch.device("cuda", _world.local_rank)
    return device


# ---- collectives (all the identity on one process) ------------------------------------------------

def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """A failed collective means another process died or stopped answering: say so in one line."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        raise PeerLost(f"process {_world.rank} lost contact with the other processes of the run ({first_line(exc)}); "
                        f"another process failed (its error is reported) or hung past {TIMEOUT_ENV}") from None


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place."""
    if _world.size > 1:
        with collective():
            dist.all_reduce(tensor)
    return tensor


def all_reduce_many(tensors: list[torch.Tensor], bucket_bytes: int = 25 << 20) -> None:
    """Sum every tensor over processes, in place, in flattened buckets (one collective per bucket)."""
    if _world.size <= 1 or not tensors:
        return
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for t in tensors:  # buckets of one dtype and device, up to bucket_bytes each
        key, size = (t.dtype, t.device), t.numel() * t.element_size()
        kind = buckets.setdefault(key, [[]])
        if kind[-1] and filled[key] + size > bucket_bytes:
            kind.append([])
            filled[key] = 0
        kind[-1].append(t)
        filled[key] = filled.get(key, 0) + size
    for groups in buckets.values():
        for group in groups:
            flat = torch._utils._flatten_dense_tensors(group)
            all_reduce(flat)
            torch._foreach_copy_(group, list(torch._utils._unflatten_dense_tensors(flat, group)))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce(grad.clone())


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order (shards may differ in length)."""
    if _world.size <= 1:
        return tensor
    counts = torch.zeros(_world.size, dtype=torch.long, device=tensor.device)  # on the device: nccl needs it there
    counts[_world.rank] = len(tensor)
    counts = all_reduce(counts).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(_world.size)]
    with collective():
        dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if _world.size <= 1:
        return obj
    box = [obj]
    with collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters (and buffers) on every process."""
    if _world.size <= 1:
        return
    tensors = list(module.buffers() if buffers_only else module.state_dict().values())
    with collective(), torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


# ---- data: every process's share of the same global batches ----------------------------------------

def shard_batches(order: np.ndarray, batch_size: int) -> tuple[np.ndarray, list[int]]:
    """This process's samples of each global batch of `order` (contiguous shares), and the global batch sizes.

    Chunking the result by batch_size // world gives exactly this process's share of each global batch, so
    N processes train on the same batches as one. A last batch with fewer samples than processes is left out
    (one process leaves out a last batch of one sample).
    """
    size, rank = _world.size, _world.rank
    starts = range(0, len(order), batch_size)
    sizes = [min(batch_size, len(order) - s) for s in starts]
    if size <= 1:
        return order, sizes
    mine, kept = [], []
    for start, n in zip(starts, sizes):
        if n < size:
            continue
        mine.append(np.array_split(order[start : start + n], size)[rank])
        kept.append(n)
    return (np.concatenate(mine) if mine else order[:0]), kept


def shard_range(n: int) -> np.ndarray:
    """This process's contiguous part of positions 0..n-1 (evaluation)."""
    return np.array_split(np.arange(n), _world.size)[_world.rank]


# ---- BatchNorm over the global batch ---------------------------------------------------------------

class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all processes), with the exact
    gradient: the per-process count, mean and centred sum of squares go through one differentiable all-reduce
    and are combined as Chan et al.'s parallel variance. nn.SyncBatchNorm does this on GPUs only; this one
    runs anywhere (gloo on CPU). Same state_dict as BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world.size <= 1:
            return super().forward(x)
        x = x.float()  # statistics in fp32 whatever autocast does
        dims = [0, 2, 3]
        n = x.numel() // x.shape[1]
        mean = x.mean(dims) if n else x.new_zeros(x.shape[1])
        m2 = ((x - mean[None, :, None, None]) ** 2).sum(dims)
        row = torch.cat([x.new_full((1,), float(n)), mean, m2])
        table = x.new_zeros((_world.size, row.numel())).index_copy(0, torch.tensor([_world.rank], device=x.device), row[None])
        table = _AllReduceSum.apply(table)
        counts, means, m2s = table[:, :1], table[:, 1 : 1 + x.shape[1]], table[:, 1 + x.shape[1] :]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - global_mean) ** 2).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(global_mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (total / (total - 1)), alpha=factor)
        shape = (1, -1, 1, 1)
        y = (x - global_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module: nn.Module, on_cuda: bool) -> nn.Module:
    """BatchNorm layers that normalise with the global batch's statistics (nn.SyncBatchNorm on CUDA). On CPU
    the layers become GlobalBatchNorm in place, keeping their parameters (a method may hold references)."""
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = GlobalBatchNorm
    return module


# ---- rank 0 decides, the others follow (experiments.train_run) ---------------------------------------

_released = False


def lead(work: Callable[[], T]) -> T:
    """On rank 0: run `work`; if it ends without having released the others into training (`release`),
    send them its result or error, so that no process waits for a message that never comes."""
    global _released
    _released = False
    if _world.size <= 1:
        return work()
    try:
        result = work()
    except BaseException as exc:
        if not _released:
            with contextlib.suppress(PdmpError):  # the others may be gone already (Ctrl-C reaches them all)
                broadcast_object({"error": first_line(exc)})
        raise
    if not _released:
        broadcast_object({"result": result})
    return result


def release(staging: str) -> None:
    """Rank 0: the run directory is ready; the others may load its state and train."""
    global _released
    if _world.size > 1 and not _released:
        broadcast_object({"staging": staging})
        _released = True


def follow() -> dict[str, Any]:
    """The others: rank 0's decision ({"staging": path}, {"result": …} or {"error": message})."""
    return broadcast_object(None)


# ---- `pdmp train --nproc N`: N local processes with torchrun's environment ---------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str] | None = None, grace_s: float = 10.0, program: list[str] | None = None) -> int:
    """Run this command line in `nproc` processes (RANK 0..N-1 on this machine); returns the exit code.

    Rank 0 prints to this terminal; the others are silent unless one fails first, whose one-line error is
    printed. When a process fails, the others get `grace_s` to notice (a collective with a dead peer fails)
    and are then terminated, so an error anywhere ends the whole run. `program` is what runs `argv`
    (default: this Python's `-m pdmp_cli`).
    """
    logs: list[Any] = []  # rank r's stderr (r > 0), read when it is the one that failed
    try:
        return _launch(nproc, argv, grace_s, [sys.executable, "-m", "pdmp_cli"] if program is None else program, logs)
    finally:
        for log in logs:
            if log is not None:
                log.close()


def _launch(nproc: int, argv: list[str] | None, grace_s: float, program: list[str], logs: list[Any]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = {**os.environ, LAUNCHED_ENV: "1", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # no oversubscribed cores
    procs: list[subprocess.Popen] = []

    def pass_on(signum: int, frame: Any) -> None:  # a SIGTERM to the launcher (pre-emption) stops the run
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        for rank in range(nproc):
            log = tempfile.TemporaryFile() if rank else None
            logs.append(log)
            procs.append(subprocess.Popen([*program, *argv],
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=subprocess.DEVNULL if rank else None, stderr=log))
        failed: list[int] = []  # ranks in the order their failure was seen
        failed_at = None
        while any(p.poll() is None for p in procs):
            failed += [r for r, p in enumerate(procs) if p.returncode not in (None, 0) and r not in failed]
            if failed and failed_at is None:
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                grace_s = float("inf")
            time.sleep(0.05)
        failed += [r for r, p in enumerate(procs) if p.returncode != 0 and r not in failed]
    except KeyboardInterrupt:  # Ctrl-C reached the children too: they save, stop and say so
        interrupted = any(p.poll() is None for p in procs)  # else the run had ended: report how, as usual
        deadline = time.time() + grace_s
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        pass_on(signal.SIGTERM, None)
        for p in procs:
            p.wait()
        if interrupted:
            return 130
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes = [128 - c if c < 0 else c for c in (p.returncode for p in procs)]  # killed by signal S: 128 + S
    if not failed:
        return 0
    rank = next((r for r in failed if codes[r] != PEER_LOST_EXIT), failed[0])  # the cause, not its echoes
    if codes[rank] == PEER_LOST_EXIT:  # every process stopped on a failed collective, none on an error of its own
        message = (f"error: the {nproc} processes lost contact with each other (a collective failed or waited past "
                   f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV, '600')} s); re-run to resume, or raise {TIMEOUT_ENV} "
                   f"if a step legitimately takes that long")
    elif procs[rank].returncode < 0:
        message = f"error: process {rank} of {nproc} was killed (signal {-procs[rank].returncode})"
    elif rank == 0:  # rank 0 printed its own error
        return codes[0]
    else:
        logs[rank].seek(0)
        lines = [l for l in logs[rank].read().decode(errors="replace").splitlines() if l.strip()]
        cause = lines[-1].removeprefix("error: ") if lines else f"exit code {codes[rank]}"
        message = f"error: process {rank} of {nproc} failed: {cause}"
    print(message, file=sys.stderr)
    return codes[rank]
