"""The whole CLI flow (rank → train → compare → report) on tiny av-digits, checking files and contents."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pdmp_cli.cli import app
from pdmp_cli.config import RunConfig
from pdmp_cli.layout import read_jsonl
from tests.conftest import TINY_SAMPLES

KEY = f"av-digits@n{TINY_SAMPLES}"


@pytest.fixture(scope="module")
def flow(tmp_path_factory, data_root, tiny):
    """One ranked tiny dataset with a compare grid, shared by the tests of this module."""
    runs = tmp_path_factory.mktemp("runs")
    invoke = make_invoke(runs, data_root)
    ok(invoke("rank", "--samples", str(TINY_SAMPLES), "--seeds", "2"))
    ok(invoke("compare", "--methods", "joint,ogm-ge,pdmp", "--seeds", "0,1"))
    return runs, invoke


def make_invoke(runs: Path, data_root: Path):
    def invoke(*args: str, epochs: str = "2"):
        extra = ["--runs-dir", str(runs)]
        if args[0] not in ("report", "list"):
            extra += ["--data-dir", str(data_root), "--quiet"] + ([] if "--epochs" in args else ["--epochs", epochs])
        return CliRunner().invoke(app, [*args, *extra])
    return invoke


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_rank_writes_scores_and_ranking(flow, tiny):
    runs, _ = flow
    rank = read(runs / KEY / "rank.json")
    assert rank["dataset"] == "av-digits" and rank["recipe_hash"] == tiny.recipe_hash
    assert rank["metric"] == "accuracy" and rank["split"] == "val" and rank["seeds"] == [0, 1]
    assert sorted(rank["ranking"]) == ["audio", "visual"] and rank["dominant"] == rank["ranking"][0]
    for m in ("audio", "visual"):
        entry = rank["modalities"][m]
        per_seed = [read(runs / KEY / "rank" / m / f"s{s}" / "result.json")["val"]["accuracy"] for s in (0, 1)]
        assert entry["per_seed"] == {"0": per_seed[0], "1": per_seed[1]}
        assert entry["score"] == pytest.approx(sum(per_seed) / 2)
    scores = [rank["modalities"][m]["score"] for m in rank["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert read(runs / "last_dataset.json")["dataset_key"] == KEY


def test_train_run_directory_contents(flow, tiny):
    runs, _ = flow
    run = runs / KEY / "train" / "pdmp-concat+epochs=2-s1"
    config = read(run / "config.json")
    cfg = RunConfig.from_dict(config["config"])
    assert cfg.seed == 1 and cfg.method.name == "pdmp" and cfg.optim.epochs == 2
    assert cfg.method.params["ranking"] == read(runs / KEY / "rank.json")["ranking"]
    assert cfg.method.params["mode"] == "grad"
    assert config["recipe_hash"] == tiny.recipe_hash and config["command"] and config["environment"]["torch"]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1]
    for m in metrics:
        assert {"accuracy", "macro_f1", "modality_accuracy", "loss"} <= set(m["val"])
        assert set(m["method"]) == {"gamma/audio", "gamma/visual"} and m["train_loss"] > 0
    result = read(run / "result.json")
    best = max(range(2), key=lambda e: (metrics[e]["val"]["accuracy"], -e))
    assert result["best_epoch"] == best and result["selection"]["split"] == "val"
    assert result["val"] == metrics[best]["val"] and metrics[best]["best_so_far"]
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["config"] == config["config"] and checkpoint["epoch"] == best

    # The test metrics are those of the saved checkpoint, evaluated once on the test split.
    from pdmp_cli.engine import build_model, evaluate
    from pdmp_cli.methods import get_method

    model = build_model(cfg, tiny)
    model.load_state_dict(checkpoint["model"])
    method = get_method("pdmp")(cfg.method.params, cfg)
    again = evaluate(model, method, tiny.splits["test"], 64, torch.device("cpu"), tiny.num_classes)
    assert again["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert again["macro_f1"] == pytest.approx(result["test"]["macro_f1"])


def test_compare_results_csv_and_skipping(flow):
    runs, invoke = flow
    rows = list(csv.DictReader((runs / KEY / "compare" / "results.csv").open()))
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in ("joint", "ogm-ge", "pdmp") for s in ("0", "1")]
    for r in rows:
        result = read(Path(r["run_dir"]) / "result.json")
        assert float(r["test_accuracy"]) == pytest.approx(result["test"]["accuracy"])
    mtime = (runs / KEY / "train" / "joint-concat+epochs=2-s0" / "result.json").stat().st_mtime
    ok(invoke("compare", "--methods", "joint", "--seeds", "0"))
    assert (runs / KEY / "train" / "joint-concat+epochs=2-s0" / "result.json").stat().st_mtime == mtime
    assert list(csv.DictReader((runs / KEY / "compare" / "results.csv").open()))[0]["status"] == "skipped"
    ok(invoke("compare", "--methods", "joint,ogm-ge,pdmp", "--seeds", "0,1"))  # restore the full grid's csv


def test_report_tables_match_the_runs(flow):
    runs, invoke = flow
    out = ok(invoke("report", "--dataset", "av-digits", "--samples", str(TINY_SAMPLES)))
    assert "pdmp" in out.output and "unimodal (audio)" in out.output
    table = {(r["method"], r["fusion"]): r for r in csv.DictReader((runs / KEY / "report" / "results.csv").open())}
    accs = [read(runs / KEY / "train" / f"pdmp-concat+epochs=2-s{s}" / "result.json")["test"]["accuracy"] for s in (0, 1)]
    row = table[("pdmp", "concat")]
    assert int(row["seeds"]) == 2
    assert float(row["accuracy_mean"]) == pytest.approx(sum(accs) / 2)
    assert float(row["accuracy_std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    uni = table[("unimodal (visual)", "-")]
    rank = read(runs / KEY / "rank.json")
    assert float(uni["accuracy_mean"]) == pytest.approx(
        sum(t["accuracy"] for t in rank["modalities"]["visual"]["test"].values()) / 2)
    md = (runs / KEY / "report" / "report.md").read_text()
    assert f"dominant modality: **{rank['dominant']}**" in md and "| pdmp [epochs=2] | concat | val | 2 |" in md


def test_commands_without_dataset_use_the_last_ranked_one(flow, data_root):
    runs, _ = flow
    out = ok(CliRunner().invoke(app, ["train", "--method", "joint", "--seed", "7", "--epochs", "1",
                                      "--runs-dir", str(runs), "--data-dir", str(data_root)]))
    assert f"Using dataset {KEY}" in out.output
    assert read(runs / KEY / "train" / "joint-concat+epochs=1-s7" / "result.json")["dataset_key"] == KEY


def test_report_keeps_settings_apart(flow):
    runs, invoke = flow
    ok(invoke("train", "--method", "joint", "--seed", "8", epochs="1"))  # another setting than the 2-epoch grid
    out = ok(invoke("report"))
    table = list(csv.DictReader((runs / KEY / "report" / "results.csv").open()))
    grid_setting = read(runs / KEY / "train" / "joint-concat+epochs=2-s0" / "result.json")["setting_hash"]
    one_epoch = read(runs / KEY / "train" / "joint-concat+epochs=1-s8" / "result.json")["setting_hash"]
    joint = {r["setting"]: r for r in table if r["method"] == "joint"}
    assert joint[one_epoch]["options"] == "epochs=1"
    assert set(joint) == {grid_setting, one_epoch} and joint[grid_setting]["seeds"] == "2"
    assert "joint [epochs=1]" in out.output and "joint [epochs=2]" in out.output  # labelled apart


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tmp_path, data_root, flow):
    runs, _ = flow
    other = tmp_path / "runs"
    (other / KEY).mkdir(parents=True)
    (other / KEY / "rank.json").write_text((runs / KEY / "rank.json").read_text())
    invoke = make_invoke(other, data_root)
    out = invoke("compare", "--samples", str(TINY_SAMPLES), "--methods", "joint,pdmp", "--seeds", "0",
                 "--lr", "1e12")
    assert out.exit_code == 2 and "2 of 2 runs failed" in " ".join(out.output.split())
    rows = list(csv.DictReader((other / KEY / "compare" / "results.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed"] and "training loss became" in rows[0]["error"]
    left = sorted((other / KEY / "train").iterdir())  # no finished run; each failure is kept, marked with its epoch
    assert [p.name for p in left] == [".joint-concat+epochs=2+lr=1e+12-s0.partial", ".pdmp-concat+epochs=2+lr=1e+12-s0.partial"]
    for partial in left:  # epoch 0 survives lr=1e12; epoch 1 diverges
        failed = read(partial / "failed.json")
        assert (failed["epoch"], failed["last_good_epoch"]) == (1, 0) and "training loss became" in failed["error"]
        assert (partial / "state.pt").exists() and torch.load(partial / "best.pt", weights_only=True)["epoch"] == 0
    again = invoke("compare", "--samples", str(TINY_SAMPLES), "--methods", "joint", "--seeds", "0", "--lr", "1e12")
    assert again.exit_code == 2 and "failed earlier in epoch 1" in " ".join(again.output.split())  # not retried


def test_train_with_another_method_variant_gets_its_own_directory(flow):
    runs, invoke = flow
    ok(invoke("train", "--method", "pdmp", "--gamma-p", "2", "--gamma-r", "0.5", "--seed", "0"))
    result = read(runs / KEY / "train" / "pdmp+gamma_p=2+gamma_r=0.5-concat+epochs=2-s0" / "result.json")
    assert result["variant"] == "pdmp+gamma_p=2+gamma_r=0.5"


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "pdmpp"], "unknown method 'pdmpp'. Did you mean 'pdmp'?"),
    (["train", "--method", "joint", "--fusion", "concatt"], "unknown fusion 'concatt'. Did you mean 'concat'?"),
    (["train", "--dataset", "av-digit"], "unknown dataset 'av-digit'. Did you mean 'av-digits'?"),
    (["train", "--method", "pdmp", "--gamma-p", "0"], "pdmp.gamma_p must be > 0 and finite (got 0.0); set it with --set pdmp.gamma_p=VALUE"),
    (["train", "--method", "joint", "--lr", "-1"], "--lr must be > 0"),
    (["train", "--method", "joint", "--alpha", "0.5"], "--alpha applies to ogm or ogm-ge, not to 'joint'"),
    (["compare", "--methods", "joint,pdmp", "--alpha", "0.5"], "--alpha applies to ogm or ogm-ge, not to 'joint', 'pdmp'"),
    (["train", "--method", "unimodal"], "`pdmp rank` trains it"),
    (["train", "--method", "joint", "--scheduler", "linear"], "--scheduler must be one of step, cosine, none"),
    (["train", "--method", "joint", "--batch-size", "1"], "--batch-size must be >= 2"),
    (["train", "--method", "joint", "--encoder", "resnet81"], "unknown encoder 'resnet81'. Did you mean 'resnet18'?"),
    (["train", "--method", "joint", "--ranking", "audio,visual"], "--ranking applies to pdmp, not to 'joint'"),
    (["train", "--method", "pdmp", "--ranking", "audio,depth"], "does not match the run's modalities"),
    (["compare", "--seeds", "0,x"], "--seeds takes comma-separated integers"),
    (["train", "--method", "joint", "--preset", "loud"], "unknown preset 'loud'"),
    (["rank", "--dataset", "cremad", "--preset", "loud"], "cremad has no presets: leave out --preset"),
    (["compare", "--dataset", "cremad@rb8f20f5a"], "names a recipe by its hash; pass --dataset cremad with the --recipe"),
    (["compare", "--methods", "joint", "--seeds", "7,8", "--device", "cuda", "--workers", "2"] if not torch.cuda.is_available() else
     ["trian"], "torch sees no CUDA device" if not torch.cuda.is_available() else "No such command"),
    (["report", "--dataset", "av-digits@visual-dominant"], "no results under"),
    (["train", "--method", "joint", "--lr", "0"], "--lr must be > 0"),
    (["train", "--method", "joint", "--lr", "nan"], "--lr must be > 0 and finite (got nan)"),
    (["train", "--method", "pdmp", "--gamma-r", "-0.5"], "pdmp.gamma_r must be > 0 and finite (got -0.5)"),
    (["train", "--method", "pdmp", "--gamma-p", "inf"], "pdmp.gamma_p must be > 0 and finite (got inf)"),
    (["train", "--method", "ogm-ge", "--alpha", "0"], "ogm-ge.alpha must be > 0 and finite (got 0.0)"),
    (["train", "--method", "joint", "--epochs", "0"], "--epochs must be >= 1 (got 0)"),
    (["train", "--method", "joint", "--seed", "1.5"], "Invalid value for '--seed'"),
    (["train", "--method", "joint", "--seed", "-1"], "--seed must be an integer in [0, 2^32) (got -1)"),
    (["compare", "--methods", "joint", "--seeds", "0,1.5"], "--seeds takes comma-separated integers (got '0,1.5')"),
    (["train", "--method", "joint", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["train", "--sed", "1"], "No such option: --sed"),
    (["trian"], "No such command 'trian'"),
])
def test_bad_input_is_one_clear_line_and_exit_2(flow, args, message):
    runs, invoke = flow
    before = snapshot(runs)
    out = invoke(*args)
    assert out.exit_code == 2, out.output
    assert out.output.strip().startswith("error: ") and message in " ".join(out.output.split())
    assert snapshot(runs) == before  # nothing written, nothing lost


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_pdmp_without_a_ranking_names_the_command_to_run(tmp_path, data_root):
    invoke = make_invoke(tmp_path, data_root)
    out = invoke("train", "--samples", str(TINY_SAMPLES), "--method", "pdmp")
    assert out.exit_code == 2
    assert f"run `pdmp rank --dataset av-digits --samples {TINY_SAMPLES}` first" in " ".join(out.output.split())


def test_pdmp_refuses_a_ranking_made_for_another_recipe(flow, tmp_path, data_root):
    runs, _ = flow
    other = tmp_path / "runs"
    (other / KEY).mkdir(parents=True)
    rank = read(runs / KEY / "rank.json")
    rank["recipe_hash"] = "000000000000"
    (other / KEY / "rank.json").write_text(json.dumps(rank))
    out = make_invoke(other, data_root)("train", "--samples", str(TINY_SAMPLES), "--method", "pdmp")
    assert out.exit_code == 2
    assert "recipe 000000000000" in out.output and "pdmp rank" in out.output
    assert not (other / KEY / "train").exists()  # nothing was started


def test_a_finished_run_is_kept_unless_forced(flow):
    runs, invoke = flow
    result = runs / KEY / "train" / "joint-concat+epochs=2-s0" / "result.json"
    stale = read(result) | {"config_hash": "000000000000"}  # as if trained under other defaults
    result.write_text(json.dumps(stale))
    out = invoke("train", "--method", "joint", "--seed", "0")
    assert out.exit_code == 2 and "--force" in out.output
    assert read(result) == stale  # untouched
    ok(invoke("train", "--method", "joint", "--seed", "0", "--force"))
    assert read(result)["config_hash"] != "000000000000"
    assert not [p.name for p in result.parent.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_list_shows_every_registry():
    out = ok(CliRunner().invoke(app, ["list"]))
    for name in ("av-digits", "resnet18", "small", "concat", "sum", "film", "gated", "joint", "ogm-ge", "pdmp"):
        assert name in out.output
    out = ok(CliRunner().invoke(app, ["list", "methods", "--pattern", "ogm*"]))
    assert "ogm-ge" in out.output and "pdmp" not in out.output


def test_ogm_ge_logs_ratios_and_coefficients_per_epoch(flow):
    runs, _ = flow
    for record in read_jsonl(runs / KEY / "train" / "ogm-ge-concat+epochs=2-s0" / "metrics.jsonl"):
        logged = record["method"]
        assert set(logged) == {"ratio/audio", "ratio/visual", "coef/audio", "coef/visual"}
        assert all(0 < logged[f"coef/{m}"] <= 1 for m in ("audio", "visual"))


def test_selecting_on_test_is_labelled_everywhere(flow):
    runs, invoke = flow
    ok(invoke("train", "--method", "joint", "--seed", "9", "--select-split", "test"))
    result = read(runs / KEY / "train" / "joint-concat+epochs=2+select_split=test-s9" / "result.json")
    metrics = read_jsonl(runs / KEY / "train" / "joint-concat+epochs=2+select_split=test-s9" / "metrics.jsonl")
    assert result["selection"]["split"] == "test" and all("test" in m for m in metrics)
    assert result["test"] == metrics[result["best_epoch"]]["test"]
    out = ok(invoke("report"))
    assert "test (lineage protocol)" in out.output
    assert "| joint [epochs=2, select_split=test] | concat | test (lineage protocol) | 1 |" in (runs / KEY / "report" / "report.md").read_text()


def test_version_and_help():
    assert ok(CliRunner().invoke(app, ["--version"])).output.startswith("pdmp ")
    out = ok(CliRunner().invoke(app, ["train", "--help"]))
    assert "--gamma-p" in out.output and "--select-split" in out.output


def test_method_hyperparameters_through_set(flow):
    runs, invoke = flow
    ok(invoke("train", "--method", "pdmp", "--seed", "3", "--set", "start_epoch=1", "--set", "pdmp.schedule=graded"))
    run = runs / KEY / "train" / "pdmp+schedule=graded+start_epoch=1-concat+epochs=2-s3"
    assert read(run / "config.json")["config"]["method"]["params"]["start_epoch"] == 1
    gammas = [record["method"]["gamma/audio"] for record in read_jsonl(run / "metrics.jsonl")]
    rank = read(runs / KEY / "rank.json")
    assert gammas[0] == 1.0 and gammas[1] == (3.0 if rank["ranking"][0] == "audio" else 0.25)
    for args, message in ((["--set", "pdmp.start_epoch=x"], "pdmp.start_epoch takes int (got 'x')"),
                          (["--set", "start_epoch"], "--set takes METHOD.KEY=VALUE"),
                          (["--set", "pdmp.warmup=3"], "method 'pdmp' has no option 'warmup'")):
        out = invoke("train", "--method", "pdmp", *args)
        assert out.exit_code == 2 and message in " ".join(out.output.split()), out.output


def test_rank_by_macro_f1_on_the_test_split(flow, tmp_path, data_root):
    runs, _ = flow
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    ok(make_invoke(copy, data_root)("rank", "--samples", str(TINY_SAMPLES), "--seeds", "2", "--metric", "macro-f1",
                                    "--split", "test"))  # the unimodal runs are reused, not retrained
    rank = read(copy / KEY / "rank.json")
    assert rank["metric"] == "macro_f1" and rank["split"] == "test" and "paper-lineage" in rank["protocol"]
    for m in ("audio", "visual"):
        f1 = [read(copy / KEY / "rank" / m / f"s{s}" / "result.json")["test"]["macro_f1"] for s in (0, 1)]
        assert rank["modalities"][m]["score"] == pytest.approx(sum(f1) / 2)


def test_prepare_and_bench_commands(flow, data_root, tmp_path):
    out = ok(CliRunner().invoke(app, ["prepare", "--dataset", "av-digits", "--samples", str(TINY_SAMPLES),
                                      "--data-dir", str(data_root), "--quiet"]))
    assert "train 120, val 40, test 40" in out.output
    out = ok(CliRunner().invoke(app, ["bench", "--methods", "joint,ogm-ge,pdmp", "--rounds", "1", "--steps", "2",
                                      "--device", "cpu", "--encoders", "small", "--encoder-rounds", "1",
                                      "--encoder-steps", "1", "--data-dir", str(data_root), "--samples",
                                      str(TINY_SAMPLES), "--decode-samples", "4", "--json", str(tmp_path / "bench.json")]))
    bench = read(tmp_path / "bench.json")
    figures = bench["methods"]
    assert set(figures) == {"joint", "ogm-ge", "pdmp"} and figures["joint"]["ratio_to_joint"] == 1.0
    assert all(f["median_ms"] > 0 for f in figures.values()) and "ratio to joint" in out.output
    assert bench["pipeline"]["cache_vs_decode"] > 0 and "decode every sample" in out.output
