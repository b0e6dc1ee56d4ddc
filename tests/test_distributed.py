"""Several processes (gloo on CPU): `pdmp train --nproc 2` trains what one process trains with the same global batch.

The 2-process runs go through the public entry point (`python -m pdmp_cli train --nproc 2`, which starts the
processes with torchrun's environment). A sitecustomize on the children's path records, through Python's
audit hooks, every file each rank opens for writing, renames or removes under the runs directory: rank 0
must have written the run, the others nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from pdmp_cli import distributed
from pdmp_cli.cli import app
from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import read_json, read_jsonl
from tests.conftest import TINY_SAMPLES

KEY = f"av-digits@n{TINY_SAMPLES}"
# 120 training samples in batches of 16: seven full global batches and a last one of 8.
ARGS = ["--samples", str(TINY_SAMPLES), "--epochs", "2", "--width", "4", "--batch-size", "16", "--device", "cpu",
        "--quiet"]
RTOL = 1e-4  # BatchNorm statistics and gradient sums are added in another order over 2 processes

AUDIT = textwrap.dedent('''
    import os, sys
    _runs, _log = os.environ["AUDIT_RUNS"], os.environ["AUDIT_LOG"] + "." + os.environ.get("RANK", "x")
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode and any(c in str(mode) for c in "wax+")) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree") and args:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(_runs):
            with open(_log, "a") as f:  # outside the runs directory: not recorded again
                f.write(f"{event} {os.fsdecode(path)}\\n")
    if os.environ.get("WORLD_SIZE"):
        sys.addaudithook(_hook)
''')


def two_processes(tmp_path: Path, data_root: Path, runs: Path, *args: str, env: dict[str, str] | None = None):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(AUDIT)
    path = os.pathsep.join([str(hooks), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, "PYTHONPATH": path, "AUDIT_RUNS": str(runs), "AUDIT_LOG": str(tmp_path / "writes"),
                "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pdmp_cli", "train", *args, "--nproc", "2", "--runs-dir", str(runs),
                           "--data-dir", str(data_root)], env=full_env, capture_output=True, text=True, timeout=120)


def one_process(data_root: Path, runs: Path, *args: str) -> None:
    out = CliRunner().invoke(app, ["train", *args, "--runs-dir", str(runs), "--data-dir", str(data_root)])
    assert out.exit_code == 0, out.output


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out |= numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def assert_same_run(one: Path, two: Path) -> None:
    a, b = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        na, nb = numbers(ra), numbers(rb)
        assert na.keys() == nb.keys()
        for k in na:
            assert nb[k] == pytest.approx(na[k], rel=RTOL, abs=1e-6), (ra["epoch"], k)
    ra, rb = read_json(one / "result.json"), read_json(two / "result.json")
    assert rb["best_epoch"] == ra["best_epoch"]
    assert numbers(rb["test"]) == pytest.approx(numbers(ra["test"]), rel=RTOL, abs=1e-6)
    assert (ra["world_size"], rb["world_size"]) == (1, 2)
    assert rb["config_hash"] == ra["config_hash"]  # the same experiment; how many processes ran it is recorded
    assert read_json(two / "config.json")["world_size"] == 2


def test_two_processes_train_what_one_process_trains_and_only_rank_0_writes(tmp_path, data_root, tiny):
    # with augmentation: each process crops and flips its share with its rows of the global batch's draws
    args = ["--method", "joint", "--augment", *ARGS]
    one_process(data_root, tmp_path / "one", *args)
    done = two_processes(tmp_path, data_root, tmp_path / "two", *args)
    assert done.returncode == 0, done.stderr
    run = "joint-concat+augment.crop=True+augment.flip=True+batch_size=16+epochs=2+width=4-s0"
    assert_same_run(tmp_path / "one" / KEY / "train" / run, tmp_path / "two" / KEY / "train" / run)
    written = {r: (tmp_path / f"writes.{r}").read_text() if (tmp_path / f"writes.{r}").exists() else "" for r in "01"}
    assert "result.json" in written["0"] and "state.pt" in written["0"]  # the hook sees rank 0's writes...
    assert written["1"] == ""  # ...and none of rank 1's


def test_ogm_scores_are_those_of_the_global_batch_and_a_killed_process_ends_the_run_which_resumes(tmp_path, data_root, tiny):
    """OGM's coefficients come from the all-reduced scores; a process killed in epoch 1 ends both (one line),
    and the re-run resumes from epoch 0's state.pt (loaded by both ranks) to the 1-process numbers."""
    args = ["--method", "ogm", *ARGS]
    one_process(data_root, tmp_path / "one", *args)
    killed = two_processes(tmp_path, data_root, tmp_path / "two", *args,
                           env={"PDMP_TEST_KILL_AT": "batch:10", "PDMP_TEST_KILL_ONCE": str(tmp_path / "once")})
    assert killed.returncode != 0
    lines = [l for l in killed.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "was killed (signal 9)" in lines[0], killed.stderr
    resumed = two_processes(tmp_path, data_root, tmp_path / "two", *args)
    assert resumed.returncode == 0, resumed.stderr
    run = "ogm-concat+batch_size=16+epochs=2+width=4-s0"
    one, two = tmp_path / "one" / KEY / "train" / run, tmp_path / "two" / KEY / "train" / run
    assert read_json(two / "result.json")["resumed_after_epoch"] == 0
    assert_same_run(one, two)
    coef = [r["method"]["coef/audio"] for r in read_jsonl(two / "metrics.jsonl")]
    assert coef == pytest.approx([r["method"]["coef/audio"] for r in read_jsonl(one / "metrics.jsonl")], rel=RTOL)
    assert any(c < 1 for c in coef)  # the modulation was at work


def test_a_global_batch_that_does_not_divide_across_processes_is_refused_before_any_starts(tmp_path, data_root):
    out = CliRunner().invoke(app, ["train", "--method", "joint", *ARGS[:-3], "--batch-size", "15", "--nproc", "2",
                                   "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(data_root)])
    assert out.exit_code == 2
    lines = [l for l in out.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "--batch-size 15 does not divide across 2 processes" in lines[0], out.output
    assert not (tmp_path / "runs" / KEY).exists()


def test_each_process_gets_its_contiguous_share_of_every_global_batch(monkeypatch):
    order = np.random.default_rng(0).permutation(23)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_world", distributed.World(rank, 3, rank))
        mine, sizes = distributed.shard_batches(order, 6)
        assert sizes == [6, 6, 6, 5]
        shares.append([mine[i * 2 : i * 2 + 2] for i in range(3)] + [mine[6:]])
    for b, size in enumerate([6, 6, 6, 5]):  # the union of the shares is the global batch, in order
        assert np.concatenate([s[b] for s in shares]).tolist() == order[b * 6 : b * 6 + size].tolist()
    monkeypatch.setattr(distributed, "_world", distributed.World(0, 3, 0))
    assert distributed.shard_batches(order[:14], 6)[1] == [6, 6]  # a last batch of 2 < 3 processes is left out


def test_only_train_runs_as_several_processes(tmp_path):
    out = CliRunner().invoke(app, ["report", "--runs-dir", str(tmp_path)], env={"WORLD_SIZE": "2"})
    assert out.exit_code == 2 and "only `pdmp train` runs as several processes" in out.output


def _uneven_share_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of `world` processes: its share of a global batch of 5 (3 + 2), global BatchNorm, summed gradients."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from pdmp_cli.methods import Trainer

    with distributed.process_group(on_cuda=False):
        model, x, y = _tiny_problem()
        distributed.sync_batchnorm(model, on_cuda=False)
        share = np.array_split(np.arange(len(y)), world)[rank]
        trainer = Trainer(model, None, None, torch.device("cpu"), torch.optim.SGD(model.parameters(), lr=0.1))
        trainer.batch_share = len(share) / len(y)
        trainer.zero_grad()
        trainer.backward(torch.nn.functional.cross_entropy(model(x[share]), y[share]))
        trainer.sync_gradients()
        missing = _missing_gradients(rank)
        if rank == 0:
            torch.save([p.grad for p in model.parameters()] + [model[1].running_var] + missing, out)
    with open(f"{out}.{rank}.threads", "w") as f:  # what is left of the process group once it is left
        f.write(" ".join(_process_group_threads()))


def _process_group_threads() -> list[str]:
    """The names of this process's gloo and TCPStore threads (Linux)."""
    tasks, names = "/proc/self/task", []
    for task in os.listdir(tasks):
        try:
            names.append(Path(tasks, task, "comm").read_text().strip())
        except FileNotFoundError:  # the thread ended in between
            continue
    return sorted(name for name in names if "gloo" in name or "tcpstore" in name)


def _missing_gradients(rank: int | None) -> list:
    """Rank 0 reaches both layers, rank 1 only the first, no one the third: the gradients after sync_gradients
    (rank None: one process with both shares)."""
    import torch

    from pdmp_cli.methods import Trainer

    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)])
    trainer = Trainer(layers, None, None, torch.device("cpu"), torch.optim.SGD(layers.parameters(), lr=0.1))
    trainer.zero_grad()
    for r in (0, 1) if rank is None else (rank,):
        h = layers[0](torch.ones(2, 3) * (r + 1))
        trainer.backward((layers[1](h).sum() if r == 0 else 0) + h.sum())
    trainer.sync_gradients()
    return [p.grad for p in layers.parameters()]


def _tiny_problem():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(12, 4))
    return model, torch.randn(5, 2, 4, 4) * 3 + 1, torch.tensor([0, 1, 2, 3, 1])


def test_unequal_shares_give_the_global_batch_gradient_through_global_batchnorm(tmp_path):
    """A global batch of 5 over 2 processes (3 + 2 samples): the share-weighted, summed gradients — through
    GlobalBatchNorm's differentiable statistics — and the running variance equal one process's on all 5.
    Then gradients that only some processes have (see _missing_gradients)."""
    import torch
    import torch.multiprocessing as mp

    model, x, y = _tiny_problem()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = [p.grad for p in model.parameters()] + [model[1].running_var]
    mp.spawn(_uneven_share_worker, args=(2, distributed.free_port(), str(tmp_path / "grads.pt")), nprocs=2)
    got = torch.load(tmp_path / "grads.pt")
    for g, e in zip(got[: len(expected)], expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # A gradient only rank 0 has (its share reached a layer rank 1's did not) is reduced with rank 1's zeros,
    # not left out of rank 0's buckets alone; one no process has stays None, so the optimizer skips it.
    missing, one = got[len(expected):], _missing_gradients(None)
    for g, e in zip(missing[:4], one[:4]):
        torch.testing.assert_close(g, e)
    assert missing[4:] == one[4:] == [None, None]
    # Leaving the group ends its threads (gloo's, the store's), even though the optimizer imported torch._dynamo
    # inside it: threads torn down at interpreter exit instead abort the process at random (SIGABRT).
    if os.path.isdir("/proc/self/task"):
        assert [(tmp_path / f"grads.pt.{rank}.threads").read_text() for rank in (0, 1)] == ["", ""]


def launched(capsys, code: str) -> tuple[int, list[str]]:
    """`launch` of 2 processes running the Python `code` (RANK in their environment); (exit code, stderr lines)."""
    rc = distributed.launch(2, ["-c", code], grace_s=5.0, program=[sys.executable])
    return rc, [l for l in capsys.readouterr().err.splitlines() if l.strip()]


def test_launch_reports_the_failure_once(capsys):
    # every process lost contact (a timeout): one line says so, not silence
    rc, lines = launched(capsys, f"import sys; sys.exit({distributed.PEER_LOST_EXIT})")
    assert rc == distributed.PEER_LOST_EXIT and len(lines) == 1 and "lost contact with each other" in lines[0], lines
    # rank 1 failed with its own error, rank 0 only lost it: rank 1's line, once
    rc, lines = launched(capsys, "import os, sys\nif os.environ['RANK'] == '1':\n    sys.exit('error: disk full; free space')\n"
                                 f"sys.exit({distributed.PEER_LOST_EXIT})")
    assert rc == 1 and lines == ["error: process 1 of 2 failed: disk full; free space"]
    assert launched(capsys, "pass") == (0, [])


def test_a_world_without_ranks_or_a_fixed_gpu_for_several_processes_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(PdmpError, match="each process needs its integer RANK"):
        with distributed.process_group(on_cuda=False):
            pass
    with pytest.raises(PdmpError, match="--device cuda:1 names one GPU, but 2 processes"):
        distributed.check_device("cuda:1", 2)
    distributed.check_device("cuda", 2)
    distributed.check_device("cuda:1", 1)


def test_a_no_sync_bn_run_is_not_reused_or_resumed_with_another_process_count(tmp_path, tiny_data_config):
    import dataclasses

    from pdmp_cli.experiments import same_process_count
    from tests.test_methods import config

    cfg = config(tiny_data_config, "joint")
    off = dataclasses.replace(cfg, sync_bn=False)
    assert off.hash() != cfg.hash()  # another setting; the process count itself is checked against the run's record
    with pytest.raises(PdmpError, match="trained by 2 process\\(es\\) with --no-sync-bn.*--nproc 2"):
        same_process_count(tmp_path / "run", off, 2)
    same_process_count(tmp_path / "run", off, 1)
    same_process_count(tmp_path / "run", cfg, 2)  # global BatchNorm: any process count trains the same run


# The gradient-modulating methods, each as in its own module: what one process computes from the whole global
# batch (AGM's Shapley scores, OPM's ratios and per-sample drops, MMPareto's per-loss gradients) or from a whole
# split (PMR's class prototypes, G-Blending's branch losses), two processes compute from their shares. One spawn
# trains them all (3 global batches of 40 per epoch, 20 per process); method: (params, epochs).
MODULATING = {"agm": ({}, 1), "opm": ({"warmup_epochs": 0, "p_exe": 1.0}, 1), "mmpareto": ({}, 1), "pmr": ({}, 1),
              "gblending": ({"every": 1}, 2)}


def _modulating_config(root: str, method: str):
    from pdmp_cli.config import DataConfig
    from tests.test_methods import config

    params, epochs = MODULATING[method]
    return config(DataConfig(samples=TINY_SAMPLES, root=root), method, params=params,
                  model={"width": 4}, optim={"epochs": epochs, "batch_size": 40})


def _modulating_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from pdmp_cli.data import load_dataset
    from pdmp_cli.engine import fit

    with distributed.process_group(on_cuda=False):
        for method in MODULATING:
            cfg = _modulating_config(root, method)
            fit(cfg, load_dataset(cfg.data, quiet=True), Path(out) / method)  # rank 0 writes metrics.jsonl


def test_modulating_methods_on_two_processes_compute_what_one_process_computes(tmp_path, data_root, tiny):
    import torch.multiprocessing as mp

    from pdmp_cli.engine import fit

    mp.spawn(_modulating_worker, args=(2, distributed.free_port(), str(data_root), str(tmp_path / "two")), nprocs=2)
    for method in MODULATING:
        fit(_modulating_config(str(data_root), method), tiny, tmp_path / "one" / method)
        ones = read_jsonl(tmp_path / "one" / method / "metrics.jsonl")
        twos = read_jsonl(tmp_path / "two" / method / "metrics.jsonl")
        assert len(ones) == len(twos) == MODULATING[method][1]
        for one, two in zip(ones, twos):
            a, b = numbers(one), numbers(two)
            assert a.keys() == b.keys() and any(k.startswith("method.") for k in a), (method, sorted(a))
            for k in a:  # G-Blending's weights are ratios of loss differences: they amplify the losses' drift
                rel = 1e-3 if k.startswith("method.weight/") else RTOL
                assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-6), (method, k)
        if method == "opm":
            assert a["method.executed"] == 1.0  # the dropping acted in every batch
        if method == "gblending":  # the second epoch's weights come from split losses both runs computed
            assert any(v not in (0.0, 1 / 3) for k, v in a.items() if k.startswith("method.weight/")), a
        if method == "pmr":  # the prototype loss acted on some modality
            assert any(v > 0 for k, v in a.items() if k.startswith("method.beta/")), a


def test_a_follower_ends_with_rank_0s_error_as_a_lost_peer_so_it_is_printed_once(monkeypatch):
    from pdmp_cli import experiments

    monkeypatch.setattr(experiments, "load_dataset", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "follow", lambda: {"error": "the ranking is stale; re-run pdmp rank"})
    cfg = SimpleNamespace(data=None)
    with pytest.raises(distributed.PeerLost, match="process 0 stopped the run: the ranking is stale"):
        experiments.follow_main(None, cfg)
