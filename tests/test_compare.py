"""compare grids: sweeps, parallel workers, skipping, failures, the Ray backend (tiny av-digits, 1 epoch)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdmp_cli import backends
from pdmp_cli.cli import app
from pdmp_cli.config import DataConfig
from pdmp_cli.errors import PdmpError
from pdmp_cli.experiments import Session, compare
from pdmp_cli.grid import build_grid, parse_sweeps, parse_values, variants
from pdmp_cli.layout import Layout
from tests.conftest import TINY_SAMPLES

KEY = f"av-digits@n{TINY_SAMPLES}"
GRID = ["--methods", "joint,pdmp", "--ranking", "audio,visual", "--seeds", "0,1"]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def rows_of(runs: Path, key: str = KEY) -> list[dict]:
    return list(csv.DictReader((runs / key / "compare" / "results.csv").open()))


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory, data_root, tiny):
    """2 methods × 2 seeds trained by 2 worker processes."""
    runs = tmp_path_factory.mktemp("runs")

    def invoke(*args: str):
        return CliRunner().invoke(app, ["compare", "--samples", str(TINY_SAMPLES), "--epochs", "1",
                                        "--data-dir", str(data_root), "--runs-dir", str(runs), *args])
    out = invoke(*GRID, "--workers", "2")
    assert out.exit_code == 0, out.output
    return runs, invoke, out.output


def test_parse_values_and_cartesian_variants():
    assert parse_values("1.5,2,3") == [1.5, 2, 3] and parse_values("lr") == ["lr"] and parse_values("[1, 2]") == [[1, 2]]
    sweeps = parse_sweeps(["pdmp.gamma_p=1.5,2", "pdmp.gamma_r=0.25,0.5,1", "ogm-ge.alpha=0.5"], ["pdmp", "ogm-ge"])
    assert sweeps == {"pdmp": {"gamma_p": [1.5, 2], "gamma_r": [0.25, 0.5, 1]}, "ogm-ge": {"alpha": [0.5]}}
    combos = variants({"start_epoch": 1}, sweeps["pdmp"])
    assert len(combos) == 6 and {(c["gamma_p"], c["gamma_r"]) for c in combos} == {
        (p, r) for p in (1.5, 2) for r in (0.25, 0.5, 1)}
    assert all(c["start_epoch"] == 1 for c in combos)
    assert variants({}, {}) == [{}]
    with pytest.raises(PdmpError, match="given twice"):
        parse_sweeps(["pdmp.gamma_p=1", "pdmp.gamma_p=2"], ["pdmp"])
    with pytest.raises(PdmpError, match="METHOD.KEY=VALUE"):
        parse_sweeps(["joint.x=1"], ["pdmp"])


def test_grid_over_datasets_methods_and_sweeps_names_every_run(tmp_path):
    session = Session(Layout(tmp_path / "runs"), quiet=True)
    datas = [DataConfig(samples=TINY_SAMPLES, root=str(tmp_path)),
             DataConfig(preset="visual-dominant", samples=TINY_SAMPLES, root=str(tmp_path))]
    sweeps = parse_sweeps(["pdmp.gamma_p=1.5,2,3", "ogm-ge.alpha=0.1,0.5,0.8"], ["joint", "ogm-ge", "pdmp"])
    grid = build_grid(session, datas, ["joint", "ogm-ge", "pdmp"], ["concat", "sum"], [0, 1], sweeps=sweeps,
                      ranking=["audio", "visual"], optim={"epochs": 1})
    # per dataset: (1 joint + 3 alphas + 3 gammas) × 2 fusions × 2 seeds, every one its own directory
    assert len(grid) == 2 * 7 * 2 * 2 and len({p.run_dir for p in grid}) == len(grid)
    names = {p.run_dir.name for p in grid if p.key == KEY}
    assert "pdmp+gamma_p=1.5-sum+epochs=1-s1" in names and "ogm-ge+alpha=0.8-concat+epochs=1-s0" in names
    assert "pdmp-concat+epochs=1-s0" in names  # γp = 3 is av-digits' default: no tag
    assert {p.key for p in grid} == {KEY, f"av-digits@visual-dominant@n{TINY_SAMPLES}"}
    assert all(p.finished is None for p in grid)


def test_grid_with_two_workers_trains_every_run(grid_runs):
    runs, _, output = grid_runs
    rows = rows_of(runs)
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [
        (m, s, "trained") for m in ("joint", "pdmp") for s in ("0", "1")]
    for r in rows:
        result = read(Path(r["run_dir"]) / "result.json")
        assert float(r["test_accuracy"]) == result["test"]["accuracy"] and int(r["seed"]) == result["seed"]
        assert r["threads"] == str(max(1, backends.cpu_count() // 2))  # the cores divided between 2 workers
        config = read(Path(r["run_dir"]) / "config.json")
        assert config["config"]["seed"] == result["seed"]
    assert "2 worker processes" in output and "4 trained, 0 skipped, 0 failed" in " ".join(output.split())
    assert not [p for p in (runs / KEY / "train").iterdir() if p.name.startswith(".")]  # no staging left


def test_rerun_skips_finished_runs(grid_runs):
    runs, invoke, _ = grid_runs
    before = {p: (p / "result.json").stat().st_mtime_ns for p in (runs / KEY / "train").iterdir()}
    out = invoke(*GRID, "--workers", "2")
    assert out.exit_code == 0, out.output
    assert "0 trained, 4 skipped" in " ".join(out.output.split())
    assert {r["status"] for r in rows_of(runs)} == {"skipped"}
    assert {p: (p / "result.json").stat().st_mtime_ns for p in (runs / KEY / "train").iterdir()} == before


def test_a_failing_run_is_recorded_and_the_others_go_on(grid_runs):
    runs, invoke, _ = grid_runs
    # γp = 1e30 makes the loss non-finite in the first epoch; seed 2 of joint is new and must still train.
    out = invoke("--methods", "joint,pdmp", "--ranking", "audio,visual", "--seeds", "0,2",
                 "--set", "pdmp.gamma_p=1e30", "--workers", "2")
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and "2 of 4 runs failed" in text and "failed runs" in text
    rows = {(r["method"], r["seed"]): r for r in rows_of(runs)}
    assert rows[("joint", "0")]["status"] == "skipped" and rows[("joint", "2")]["status"] == "trained"
    for seed in ("0", "2"):
        failed = rows[("pdmp+gamma_p=1e+30", seed)]
        assert failed["status"] == "failed" and "training loss became" in failed["error"]
        assert not Path(failed["run_dir"]).exists()
    failures = read(runs / KEY / "compare" / "failures.json")["failures"]
    assert "PdmpError" in failures[f"{KEY}/pdmp+gamma_p=1e+30-concat+epochs=1-s0"]  # the traceback
    assert (runs / KEY / "train" / "joint-concat+epochs=1-s2" / "result.json").exists()


def test_a_worker_killed_mid_grid_loses_no_run(grid_runs, tmp_path, monkeypatch, data_root):
    """One worker dies (SIGKILL): the executor stops the other worker's run too; both are retried alone."""
    runs, _, _ = grid_runs
    monkeypatch.setenv("PDMP_TEST_KILL_AT", "batch:2")
    monkeypatch.setenv("PDMP_TEST_KILL_ONCE", str(tmp_path / "killed"))
    out = CliRunner().invoke(app, ["compare", "--samples", str(TINY_SAMPLES), "--epochs", "1", "--data-dir",
                                   str(data_root), "--runs-dir", str(tmp_path / "runs"), *GRID, "--workers", "2"])
    assert (tmp_path / "killed").exists()  # a worker did die
    assert out.exit_code == 0 and "4 trained, 0 skipped, 0 failed" in " ".join(out.output.split()), out.output
    for row in rows_of(tmp_path / "runs"):  # and the grid ends as the uninterrupted one (same threads per run)
        name = Path(row["run_dir"]).name
        assert read(tmp_path / "runs" / KEY / "train" / name / "result.json")["test"] == \
            read(runs / KEY / "train" / name / "result.json")["test"]


def test_ray_backend_on_a_local_instance(tmp_path, data_root, tiny):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'pdmp[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                                 os.environ.get("PYTHONPATH")]))}})
    try:
        session = Session(Layout(tmp_path / "runs"), quiet=True)
        table = compare(session, DataConfig(samples=TINY_SAMPLES, root=str(data_root)), ["joint"], ["concat"], [0, 1],
                        backend="ray", optim={"epochs": 1})
    finally:
        ray.shutdown()
    assert list(table["status"]) == ["trained", "trained"]
    for seed in (0, 1):
        run = tmp_path / "runs" / KEY / "train" / f"joint-concat+epochs=1-s{seed}"
        result = read(run / "result.json")
        assert result["seed"] == seed and (run / "metrics.jsonl").exists() and (run / "best.pt").exists()
    assert [float(r["test_accuracy"]) for r in rows_of(tmp_path / "runs")] == list(table["test_accuracy"])


def test_dataset_keys_name_preset_and_size():
    from pdmp_cli.cli import dataset_variant

    assert dataset_variant(f"av-digits@visual-dominant@n{TINY_SAMPLES}", None, None) == (
        "av-digits", "visual-dominant", TINY_SAMPLES)
    assert dataset_variant("av-digits", "balanced", 300) == ("av-digits", "balanced", 300)


def test_each_local_worker_takes_one_gpu(monkeypatch):
    import multiprocessing

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.setattr(backends, "_events", None)
    gpus = multiprocessing.get_context("spawn").Queue()
    for i in (0, 1):
        gpus.put(i)
    seen = []
    for _ in (0, 1):  # what two workers' initialisers do, in turn
        backends._init_worker(None, gpus, 4)
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["0", "1"] and os.environ["OMP_NUM_THREADS"] == "4"
