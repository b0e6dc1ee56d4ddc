"""G-Blending and MLA: their rules against hand-computed values, their steps on a real batch, G-Blending's
neutral setting against joint, and both through the CLI into `report`."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from pdmp_cli.cli import app
from pdmp_cli.engine import build_model, build_trainer, fit, load_checkpoint
from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import read_jsonl
from pdmp_cli.methods import get_method
from pdmp_cli.methods.gblending import blend_weights
from pdmp_cli.methods.mla import entropy_weights, fuse, projected
from tests.conftest import TINY_SAMPLES
from tests.test_cli import KEY, make_invoke, ok
from tests.test_methods import config, first_batch

# ---- G-Blending ---------------------------------------------------------------------------------


def test_blend_weights_from_given_losses():
    previous = {"train": {"fused": 1.0, "audio": 1.2, "visual": 1.5}, "val": {"fused": 1.5, "audio": 1.6, "visual": 1.8}}
    current = {"train": {"fused": 0.5, "audio": 0.8, "visual": 1.4}, "val": {"fused": 1.2, "audio": 1.4, "visual": 1.9}}
    # fused: ΔG = 1.5 − 1.2 = 0.3, ΔO = (1.2 − 0.5) − (1.5 − 1.0) = 0.2 → 0.3 / 0.04 = 7.5
    # audio: ΔG = 0.2, ΔO = 0.6 − 0.4 = 0.2 → 5.0;  visual: ΔG = −0.1 < 0 → 0
    assert blend_weights(previous, current) == pytest.approx({"fused": 0.6, "audio": 0.4, "visual": 0.0})
    worse = {"train": current["train"], "val": {k: v + 1 for k, v in previous["val"].items()}}
    assert blend_weights(previous, worse) is None  # no branch generalised: the caller keeps its weights


def gblending(tiny_data_config, tiny, **params):
    cfg = config(tiny_data_config, "gblending", params=params)
    torch.manual_seed(0)
    method = get_method("gblending")(cfg.method.params, cfg)
    build_trainer(cfg, build_model(cfg, tiny), method, tiny, torch.device("cpu"))
    return method


def test_gblending_branch_losses_are_the_heads_cross_entropy_on_the_split(tiny_data_config, tiny):
    method = gblending(tiny_data_config, tiny, every=1)
    assert method.weights == pytest.approx({"fused": 1 / 3, "audio": 1 / 3, "visual": 1 / 3})
    method.model.train()
    method.on_epoch_start(0)
    assert method.model.training  # measuring leaves the model in the mode it found it in
    split = tiny.splits["val"]
    with torch.no_grad():
        method.model.eval()
        out = method.model({m: torch.from_numpy(split.inputs[m][:].copy()) for m in tiny.modalities})
        labels = torch.from_numpy(split.labels[:].astype("int64"))
        expected = {"fused": torch.nn.functional.cross_entropy(out.logits, labels).item()}
        for m in tiny.modalities:
            expected[m] = torch.nn.functional.cross_entropy(method.modules[m](out.features[m]), labels).item()
    assert method.checkpoint["val"] == pytest.approx(expected, rel=1e-5)
    assert set(method.checkpoint["train"]) == {"fused", "audio", "visual"}


def test_gblending_weights_and_checkpoint_survive_a_state_dict_round_trip(tiny_data_config, tiny):
    method = gblending(tiny_data_config, tiny, every=1)
    method.on_epoch_start(0)
    method.weights = {"fused": 0.5, "audio": 0.25, "visual": 0.25}
    state = method.state_dict()
    other = gblending(tiny_data_config, tiny, every=1)
    other.load_state_dict(state)
    assert other.weights == method.weights and other.checkpoint == method.checkpoint
    assert all(torch.equal(a, b) for a, b in zip(other.modules.parameters(), method.modules.parameters()))


def test_gblending_with_fused_weights_fixed_reproduces_joint_bit_for_bit(tiny_data_config, tiny, tmp_path):
    results = {}
    for method, params in (("joint", {}), ("gblending", {"init": "fused", "every": 0})):
        run_dir = tmp_path / method
        run_dir.mkdir()
        results[method] = (fit(config(tiny_data_config, method, params=params, optim={"epochs": 1}), tiny, run_dir),
                           load_checkpoint(run_dir / "best.pt")["model"])
    (joint, joint_state), (blend, blend_state) = results["joint"], results["gblending"]
    assert joint["val"] == blend["val"] and joint["test"] == blend["test"]
    assert all(torch.equal(joint_state[k], blend_state[k]) for k in joint_state)


# ---- MLA ----------------------------------------------------------------------------------------


def test_mla_projection_by_hand():
    r = torch.tensor([[1.0, 0.0]])
    projector, grad = projected(torch.eye(2), torch.tensor([[2.0, 3.0]]), r, alpha=1.0)
    # k = P rᵀ = (1, 0)ᵀ; P − k kᵀ / (1 + 1) = diag(0.5, 1); ‖·‖_F = √1.25
    assert torch.allclose(projector, torch.tensor([[0.5, 0.0], [0.0, 1.0]]) / math.sqrt(1.25))
    assert torch.allclose(grad, torch.tensor([[1.0, 3.0]]) / math.sqrt(1.25))
    # with a small α the projected gradient is (almost) orthogonal to the input direction r
    r = torch.tensor([[0.3, -1.2, 0.7]])
    _, grad = projected(torch.eye(3), torch.randn(5, 3), r, alpha=1e-6)
    assert (grad @ r.t()).abs().max() < 1e-5


def test_mla_entropy_weights_and_fusion_by_hand():
    logits = {"audio": torch.tensor([[0.0, 0.0]]), "visual": torch.tensor([[math.log(4.0), 0.0]])}
    # audio is uniform: e = ln 2; visual p = (0.8, 0.2): e = −(0.8 ln 0.8 + 0.2 ln 0.2) = 0.500402
    # λ_visual = e^{−0.500402} / (e^{−0.500402} + e^{−ln 2}) = 0.606287 / 1.106287 = 0.548038
    weights = entropy_weights(logits)
    assert weights["visual"].item() == pytest.approx(0.548038, abs=1e-6)
    assert weights["audio"].item() == pytest.approx(1 - 0.548038, abs=1e-6)
    assert fuse(logits, "entropy") == pytest.approx(torch.tensor([[0.548038 * math.log(4.0), 0.0]]), abs=1e-6)
    assert torch.allclose(fuse(logits, "fixed"), torch.tensor([[math.log(4.0) / 2, 0.0]]))
    batch = {m: torch.cat([o, o.flip(1)]) for m, o in logits.items()}  # per sample: each row has its own weights
    assert torch.allclose(entropy_weights(batch)["visual"], torch.tensor([0.548038, 0.548038]), atol=1e-6)


def mla_updates(tiny_data_config, tiny, batch, **params):
    """(method, model, per optimizer step: head weight gradient and which encoders had gradients)."""
    cfg = config(tiny_data_config, "mla", params=params)
    torch.manual_seed(0)
    model = build_model(cfg, tiny)
    method = get_method("mla")(cfg.method.params, cfg)
    optimizer = build_trainer(cfg, model, method, tiny, torch.device("cpu")).optimizer
    method.on_epoch_start(0)
    calls, real_step = [], optimizer.step

    def step():
        calls.append((method.head.weight.grad.clone(),
                      {m for m, enc in model.encoders.items() if any(p.grad is not None for p in enc.parameters())},
                      any(p.grad is not None for p in model.fusion.parameters())))
        real_step()
    optimizer.step = step
    fusion_before = [p.clone() for p in model.fusion.parameters()]
    method.step(batch)
    assert all(torch.equal(a, b) for a, b in zip(fusion_before, model.fusion.parameters()))  # the fusion is unused
    return method, calls


def test_mla_step_alternates_modalities_and_projects_the_second_update(tiny_data_config, tiny):
    batch = first_batch(tiny)
    plain, plain_calls = mla_updates(tiny_data_config, tiny, batch, projection=False)
    method, calls = mla_updates(tiny_data_config, tiny, batch)
    assert [c[1] for c in calls] == [{"audio"}, {"visual"}] and not any(c[2] for c in calls)
    assert method.updates == 2
    # the first update is left alone (as the official code); both runs are identical up to the second
    assert torch.equal(calls[0][0], plain_calls[0][0])
    torch.testing.assert_close(calls[1][0], plain_calls[1][0] @ method.projector.t())
    assert not torch.allclose(method.projector, torch.eye(len(method.projector)))


def test_mla_predicts_from_the_features_in_the_model_output(tiny_data_config, tiny):
    method, _ = mla_updates(tiny_data_config, tiny, first_batch(tiny))
    with torch.no_grad():
        out = method.model(first_batch(tiny, 8).inputs)
        per_modality = {m: method.head(z) for m, z in out.features.items()}
        assert torch.equal(method.predict(out), fuse(per_modality, "entropy"))
        assert all(torch.equal(method.modality_logits(out)[m], o) for m, o in per_modality.items())


@pytest.mark.parametrize("method, params, message", [
    ("gblending", {"every": -1}, "gblending.every must be >= 0 (got -1); set it with --set gblending.every=VALUE"),
    ("gblending", {"init": "random"}, "gblending.init must be one of uniform, fused (got 'random')"),
    ("mla", {"inference": "vote"}, "mla.inference must be one of entropy, fixed (got 'vote')"),
    ("mla", {"alpha": 0.0}, "mla.alpha must be > 0 and finite (got 0.0); set it with --set mla.alpha=VALUE"),
])
def test_invalid_values_are_refused(tiny_data_config, method, params, message):
    with pytest.raises(PdmpError, match=re.escape(message)):
        config(tiny_data_config, method, params=params)


# ---- through the CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize("method, sets, epochs", [("gblending", ["--set", "gblending.every=1"], "2"), ("mla", [], "1")])
def test_trains_through_the_cli_and_appears_in_report(tmp_path, data_root, tiny, method, sets, epochs):
    runs = tmp_path / "runs"
    invoke = make_invoke(runs, data_root)
    ok(invoke("train", "--method", method, "--samples", str(TINY_SAMPLES), *sets, epochs=epochs))
    [run] = (runs / KEY / "train").iterdir()
    records = read_jsonl(run / "metrics.jsonl")
    assert len(records) == int(epochs)
    if method == "gblending":
        first, second = (r["method"] for r in records)
        assert first["weight/fused"] == pytest.approx(1 / 3)
        checkpoints = [{s: {k: m[f"{s}_loss/{k}"] for k in ("fused", "audio", "visual")} for s in ("train", "val")}
                       for m in (first, second)]
        # epoch 1's weights: estimated from the losses at the starts of epochs 0 and 1
        expected = blend_weights(*checkpoints) or {k: 1 / 3 for k in ("fused", "audio", "visual")}
        assert {k: second[f"weight/{k}"] for k in expected} == pytest.approx(expected)
        # the fused branch's validation loss at the start of epoch 1 is the engine's validation loss after epoch 0
        assert second["val_loss/fused"] == pytest.approx(records[0]["val"]["loss"], rel=1e-5)
    else:
        assert set(records[0]["method"]) == {"loss/audio", "loss/visual"}
        accuracies = records[0]["val"]["modality_accuracy"]
        assert set(accuracies) == {"audio", "visual"}
    ok(invoke("report", "--dataset", "av-digits", "--samples", str(TINY_SAMPLES)))
    table = list(csv.DictReader((runs / KEY / "report" / "results.csv").open()))
    assert any(row["method"].startswith(method) for row in table), table


@pytest.mark.parametrize("method, params", [("gblending", {"every": 1}), ("mla", {})])
def test_a_run_resumed_after_an_epoch_ends_as_if_never_interrupted(tiny_data_config, tiny, tmp_path, monkeypatch, method, params):
    """The cross-epoch state (G-Blending's weights and last losses, MLA's projector) travels in state.pt."""
    cfg = config(tiny_data_config, method, params=params)
    whole = fit(cfg, tiny, tmp_path / "whole")

    def crash(point):
        if point == "epoch":
            raise KeyboardInterrupt  # after epoch 0's state.pt is written
    monkeypatch.setattr("pdmp_cli.engine.kill_point", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tiny, tmp_path / "resumed")
    monkeypatch.undo()
    resumed = fit(cfg, tiny, tmp_path / "resumed")
    assert resumed["resumed_after_epoch"] == 0
    assert resumed["val"] == whole["val"] and resumed["test"] == whole["test"]
    logged = [[r["method"] for r in read_jsonl(tmp_path / d / "metrics.jsonl")] for d in ("whole", "resumed")]
    assert logged[0] == logged[1]


def test_bench_times_both_methods_without_a_dataset():
    from pdmp_cli.bench import run

    results = run(["joint", "gblending", "mla"], steps=1, rounds=1, device="cpu")["methods"]
    assert set(results) == {"joint", "gblending", "mla"} and all(r["ratio_to_joint"] > 0 for r in results.values())


def test_mla_leaves_a_non_finite_head_gradient_to_the_scaler(tiny_data_config, tiny):
    """An fp16 overflow in the head's gradient: neither .grad (the scaler found its inf and skips the step)
    nor the projector is changed."""
    cfg = config(tiny_data_config, "mla")
    torch.manual_seed(0)
    model = build_model(cfg, tiny)
    method = get_method("mla")(cfg.method.params, cfg)
    build_trainer(cfg, model, method, tiny, torch.device("cpu"))
    method.updates = 1
    weight = method.head.weight
    weight.grad = torch.ones_like(weight)
    weight.grad[0, 0] = float("inf")
    grad, projector = weight.grad.clone(), method.projector.clone()
    method.modify_head_gradient(torch.randn(4, weight.shape[1]), 0.5)
    assert torch.equal(weight.grad, grad) and torch.equal(method.projector, projector)
    weight.grad[0, 0] = 1.0  # finite: projected
    method.modify_head_gradient(torch.randn(4, weight.shape[1]), 0.5)
    assert not torch.equal(weight.grad, torch.ones_like(weight))


def test_mla_is_trained_once_in_a_grid_over_fusions(tmp_path, data_root, tiny):
    """MLA never uses the fusion: every --fusion names the same run (built and recorded with concat); the
    report shows its fusion as none and compares PDMP of every fusion with it."""
    runs = tmp_path / "runs"
    invoke = make_invoke(runs, data_root)
    samples = ["--samples", str(TINY_SAMPLES)]
    ok(invoke("compare", "--methods", "joint,mla,pdmp", "--ranking", "audio,visual", "--fusions", "concat,sum",
              "--seeds", "0,1", *samples, epochs="1"))
    results = [json.loads(p.read_text()) for p in (runs / KEY / "train").glob("*/result.json")]
    assert sorted((r["method"], r["fusion"], r["seed"]) for r in results if r["method"] != "pdmp") == [
        ("joint", "concat", 0), ("joint", "concat", 1), ("joint", "sum", 0), ("joint", "sum", 1),
        ("mla", "concat", 0), ("mla", "concat", 1)]
    ok(invoke("report", "--dataset", "av-digits", "--samples", str(TINY_SAMPLES)))
    table = list(csv.DictReader((runs / KEY / "report" / "results.csv").open()))
    assert [(row["fusion"], row["seeds"]) for row in table if row["method"] == "mla"] == [("none", "2")]
    paired = list(csv.DictReader((runs / KEY / "report" / "paired.csv").open()))
    assert sorted((row["baseline"], row["fusion"], row["n"]) for row in paired) == [
        ("joint", "concat", "2"), ("joint", "sum", "2"), ("mla", "concat", "2"), ("mla", "sum", "2")]
    finished = ok(CliRunner().invoke(app, ["train", "--method", "mla", "--fusion", "sum", *samples, "--epochs", "1",
                                           "--runs-dir", str(runs), "--data-dir", str(data_root)]))
    assert "mla does not use a fusion; the run is built and recorded with concat" in " ".join(finished.output.split())
    assert len(list((runs / KEY / "train").iterdir())) == 10  # no new run: the grid's MLA run of seed 0
    wrong = CliRunner().invoke(app, ["train", "--method", "mla", "--fusion", "nonsense", *samples, "--quiet",
                                     "--runs-dir", str(runs), "--data-dir", str(data_root)])
    assert wrong.exit_code == 2 and "fusion" in wrong.output and "nonsense" in wrong.output, wrong.output
