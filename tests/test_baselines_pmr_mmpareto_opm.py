"""PMR, MMPareto and OPM: their rules against hand-computed values, their neutral settings against joint
training, and one epoch of each through the CLI into `pdmp report`."""
from __future__ import annotations

import csv
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pdmp_cli.cli import app
from pdmp_cli.engine import build_model, build_trainer, fit, load_checkpoint
from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import read_json, read_jsonl
from pdmp_cli.methods import Batch, get_method
from pdmp_cli.methods.mmpareto import min_norm_weights, pareto_weights
from pdmp_cli.methods.opm import drop_probabilities
from tests.conftest import TINY_SAMPLES
from tests.test_methods import config, first_batch


def bound(cfg, tiny):
    """A method bound to a freshly seeded model, at epoch 0."""
    torch.manual_seed(0)
    model = build_model(cfg, tiny)
    method = get_method(cfg.method.name)(cfg.method.params, cfg)
    build_trainer(cfg, model, method, tiny, torch.device("cpu"))
    return method


def capture_step(method, batch):
    """Every gradient the optimizer sees in one step of `method` (model and method modules)."""
    optimizer = method.trainer.optimizer
    named = list(method.model.named_parameters()) + [(f"method.{n}", p) for n, p in method.modules.named_parameters()]
    captured = {}
    real_step = optimizer.step
    optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in named}) or real_step()
    method.step(batch)
    return captured


# ---- PMR ------------------------------------------------------------------------------------------

def test_pmr_prototypes_are_class_means_of_eval_features_blended_with_momentum(tiny_data_config, tiny):
    method = bound(config(tiny_data_config, "pmr", params={"momentum": 0.25}), tiny)
    method.on_epoch_start(0)
    assert method.model.training  # the prototype pass restores train mode
    split = tiny.splits["train"]
    labels = torch.from_numpy(split.labels.astype("int64"))
    method.model.eval()
    with torch.no_grad():
        feats = method.model.encode({m: torch.from_numpy(split.inputs[m][:].copy()) for m in tiny.modalities})
    first = method.prototypes
    for m, z in feats.items():
        expected = torch.stack([z[labels == c].mean(0) for c in range(tiny.num_classes)])
        torch.testing.assert_close(first[m], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a changed encoder: the next prototypes are 0.75·new + 0.25·old
        for p in method.model.encoders["audio"].parameters():
            p.mul_(1.1)
    method.on_epoch_start(1)
    with torch.no_grad():
        z = method.model.encode({m: torch.from_numpy(split.inputs[m][:].copy()) for m in tiny.modalities})["audio"]
    new = torch.stack([z[labels == c].mean(0) for c in range(tiny.num_classes)])
    torch.testing.assert_close(method.prototypes["audio"], 0.75 * new + 0.25 * first["audio"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.prototypes["visual"], first["visual"], rtol=1e-4, atol=1e-5)  # unchanged encoder


def test_pmr_loss_stimulates_the_modality_with_the_lower_prototype_score(tiny_data_config, tiny):
    method = bound(config(tiny_data_config, "pmr", params={"alpha": 0.5}), tiny)
    method.on_epoch_start(0)
    # audio features sit on their class prototypes (distances 0 and 5); visual ones on the wrong class (1 vs 0).
    method.prototypes = {"audio": torch.tensor([[0.0, 0.0], [3.0, 4.0]]), "visual": torch.tensor([[0.0, 0.0], [1.0, 0.0]])}
    out = SimpleNamespace(logits=torch.zeros(2, 2),
                          features={"audio": torch.tensor([[0.0, 0.0], [3.0, 4.0]]), "visual": torch.tensor([[1.0, 0.0], [0.0, 0.0]])})
    batch = Batch({}, torch.tensor([0, 1]), torch.arange(2))
    loss = method.loss(out, batch)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    s_a, s_v = 2 * sigmoid(5), 2 * sigmoid(-1)  # Σ softmax(−d)[y] per modality
    # ρ_audio = s_a/s_v > 1: visual is the slow learner and gets α·CE(−d_v, y), CE(−d_v, y) = log(1 + e).
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * math.log(1 + math.e), rel=1e-6)
    logged = method.log()
    assert logged["ratio/audio"] == pytest.approx(s_a / s_v) and logged["ratio/visual"] == pytest.approx(s_v / s_a)
    assert logged["beta/audio"] == 0.0 and logged["beta/visual"] == 0.5
    # With the entropy regulariser on, the dominant modality's (audio's) prototype entropy is subtracted.
    method.p.entropy_weight, method.p.entropy_epochs = 0.1, 1
    p = torch.tensor([sigmoid(5), sigmoid(-5)])
    h = -(p * p.log()).sum().item()
    assert method.loss(out, batch).item() == pytest.approx(loss.item() - 0.1 * h, rel=1e-6)


# ---- MMPareto -------------------------------------------------------------------------------------

def test_min_norm_weights_of_two_known_vectors():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    w, w2 = min_norm_weights(g1, g2)  # min over w of (2w − 1)² + (1 − w)²: w = 0.6
    assert (w, w2) == pytest.approx((0.6, 0.4))
    point = w * g1 + w2 * g2
    assert float(point.dot(g1 - g2)) == pytest.approx(0.0, abs=1e-7)  # the min-norm point is orthogonal to the segment
    assert min_norm_weights(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])) == (0.0, 1.0)  # clipped at the end
    assert pareto_weights(g1, g2) == pytest.approx((-1 / math.sqrt(2), 0.6, 0.4))  # conflict: min-norm
    assert pareto_weights(g1, torch.tensor([1.0, 1.0])) == pytest.approx((1 / math.sqrt(2), 0.5, 0.5))  # agreement


def test_mmpareto_step_writes_the_rescaled_pareto_gradient(tiny_data_config, tiny):
    method = bound(config(tiny_data_config, "mmpareto", params={"gamma": 1.5}), tiny)
    method.on_epoch_start(0)
    batch = first_batch(tiny)
    model, heads = method.model, method.modules
    feats = model.encode(batch.inputs)
    fused = F.cross_entropy(model.head(feats).logits, batch.labels)
    expected = {}
    for m in model.modalities:
        params = list(model.encoders[m].parameters())
        uni = F.cross_entropy(heads[m](feats[m]), batch.labels)
        g = torch.autograd.grad(fused, params, retain_graph=True)
        g_m = torch.autograd.grad(uni, params, retain_graph=True)
        flat_g, flat_m = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in g_m])
        cos = float(F.cosine_similarity(flat_g, flat_m, dim=0))
        w = 0.5 if cos > 0 else float((flat_m - flat_g).dot(flat_m) / (flat_g - flat_m).pow(2).sum())
        for (name, _), a, b in zip(model.encoders[m].named_parameters(), g, g_m):
            d = 2 * w * a + 2 * (1 - w) * b
            expected[f"encoders.{m}.{name}"] = 1.5 * max(1.0, float((a + b).norm() / d.norm())) * d
        for name, gh in zip(("weight", "bias"), torch.autograd.grad(uni, list(heads[m].parameters()), retain_graph=True)):
            expected[f"method.{m}.{name}"] = gh
    for (name, _), gf in zip(model.fusion.named_parameters(), torch.autograd.grad(fused, list(model.fusion.parameters()))):
        expected[f"fusion.{name}"] = gf  # the fusion head gets the multimodal gradient only
    got = capture_step(method, batch)
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    logged = method.log()
    assert set(logged) == {f"{k}/{m}" for k in ("cos", "w_fused", "conflict") for m in ("audio", "visual")}


# ---- OPM ------------------------------------------------------------------------------------------

def test_opm_drop_probabilities():
    q = drop_probabilities({"audio": 2.0, "visual": 0.5}, q_base=0.5, lam=0.5)
    assert q["audio"] == pytest.approx(0.5 * (1 + 0.5 * math.tanh(1.0))) == pytest.approx(0.6903985)
    assert q["visual"] == 0.0
    q3 = drop_probabilities({"a": 3.0, "b": 1.0, "c": 0.2}, q_base=0.5, lam=0.5)  # ρ = 1 is not a lead
    assert q3 == pytest.approx({"a": 0.5 * (1 + 0.5 * math.tanh(2.0)), "b": 0.0, "c": 0.0})
    assert drop_probabilities({"a": 5.0, "b": 0.2}, q_base=0.9, lam=1.0)["a"] == 1.0  # clipped


def test_opm_zeroes_the_leading_modality_per_sample_and_rescales(tiny_data_config, tiny):
    method = bound(config(tiny_data_config, "opm", params={"p_exe": 1.0, "warmup_epochs": 0}), tiny)
    method.on_epoch_start(0)
    n = 64
    labels = torch.arange(n) % 2
    logits = {"audio": torch.zeros(n, 10), "visual": torch.zeros(n, 10)}
    logits["audio"][torch.arange(n), labels] = 10.0  # audio confident and right: it leads
    method.model.fusion.modality_logits = lambda feats: [logits["audio"], logits["visual"]]
    feats = {"audio": torch.ones(n, 4), "visual": torch.full((n, 2), 2.0)}
    out = method.transform_features(feats, Batch(feats, labels, torch.arange(n)))
    ratios = {"audio": method.log()["ratio/audio"]}
    q = drop_probabilities({"audio": ratios["audio"], "visual": 0.0}, 0.5, 0.5)["audio"]  # the defaults
    assert q == pytest.approx(method.log()["q/audio"]) and q == pytest.approx(0.75, abs=1e-3)  # tanh(ρ − 1) ≈ 1
    scale = 1 / (1 - 4 * q / 6)  # θ = Σ d_m q_m / Σ d_m
    dropped = out["audio"].sum(1) == 0
    assert torch.allclose(out["audio"][~dropped], torch.full_like(out["audio"][~dropped], scale))
    assert torch.allclose(out["visual"], torch.full_like(out["visual"], 2.0 * scale))  # never dropped, rescaled
    assert 0.5 * n < dropped.sum() < 0.95 * n  # ≈ q·n = 48 of the samples lose audio
    assert method.log()["executed"] == 1.0


# ---- neutral settings reproduce joint training ----------------------------------------------------

def fit_and_weights(tiny_data_config, tiny, run_dir, method, params):
    run_dir.mkdir()
    result = fit(config(tiny_data_config, method, params=params, optim={"epochs": 1}, model={"width": 4}), tiny, run_dir)
    return result, load_checkpoint(run_dir / "best.pt")["model"]


@pytest.fixture(scope="module")
def joint_run(tiny_data_config, tiny, tmp_path_factory):
    return fit_and_weights(tiny_data_config, tiny, tmp_path_factory.mktemp("joint") / "run", "joint", {})


# PMR outside its epoch window still computes prototypes every epoch: the no-grad pass over the training
# split must leave the weights, BatchNorm statistics and random streams untouched.
@pytest.mark.parametrize("method, params", [("opm", {"q_base": 0.0, "warmup_epochs": 0}), ("pmr", {"start_epoch": 5})])
def test_neutral_setting_reproduces_joint_bit_for_bit(tiny_data_config, tiny, tmp_path, joint_run, method, params):
    (joint, joint_state), (other, other_state) = joint_run, fit_and_weights(tiny_data_config, tiny, tmp_path / method, method, params)
    assert joint["val"] == other["val"] and joint["test"] == other["test"]
    assert all(torch.equal(joint_state[k], other_state[k]) for k in joint_state)


@pytest.mark.parametrize("method, params, message", [
    ("pmr", {"momentum": 1.0}, "pmr.momentum must be in [0, 1) (got 1.0); set it with --set pmr.momentum=VALUE"),
    ("pmr", {"alpha": -1.0}, "pmr.alpha must be >= 0 and finite (got -1.0)"),
    ("pmr", {"entropy_weight": float("inf")}, "pmr.entropy_weight must be >= 0 and finite (got inf)"),
    ("pmr", {"entropy_epochs": -1}, "pmr.entropy_epochs must be >= 0 (got -1)"),
    ("pmr", {"start_epoch": -1}, "pmr.start_epoch must be >= 0 (got -1)"),
    ("pmr", {"start_epoch": 3, "end_epoch": 2}, "pmr.end_epoch must be >= start_epoch (3) (got 2)"),
    ("mmpareto", {"gamma": 0.0}, "mmpareto.gamma must be > 0 and finite (got 0.0)"),
    ("opm", {"q_base": 1.5}, "opm.q_base must be in [0, 1] (got 1.5); set it with --set opm.q_base=VALUE"),
    ("opm", {"lam": -0.1}, "opm.lam must be >= 0 and finite (got -0.1)"),
    ("opm", {"warmup_epochs": -1}, "opm.warmup_epochs must be >= 0 (got -1)"),
])
def test_invalid_values_are_refused(tiny_data_config, method, params, message):
    with pytest.raises(PdmpError, match=re.escape(message)):
        config(tiny_data_config, method, params=params)


# ---- through the CLI -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, params, label, logged", [
    ("pmr", [], "pmr", "beta/visual"),
    ("mmpareto", [], "mmpareto", "w_fused/audio"),
    ("opm", ["--set", "opm.warmup_epochs=0", "--set", "opm.p_exe=1.0"], "opm+p_exe=1+warmup_epochs=0", "q/audio"),
])
def test_one_epoch_through_the_cli_appears_in_report(tmp_path, data_root, tiny, method, params, label, logged):
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs)]
    result = CliRunner().invoke(app, ["train", "--method", method, "--epochs", "1", "--samples", str(TINY_SAMPLES),
                                      "--width", "4", "--data-dir", str(data_root), "--quiet", *params, *common])
    assert result.exit_code == 0, result.output
    report = CliRunner().invoke(app, ["report", "--dataset", "av-digits", "--samples", str(TINY_SAMPLES), *common])
    assert report.exit_code == 0, report.output
    assert label in report.output
    (run_dir,) = runs.glob("*/train/*")
    assert logged in read_jsonl(run_dir / "metrics.jsonl")[0]["method"]
    (row,) = csv.DictReader(next(runs.glob("*/report/results.csv")).open())
    assert (row["method"], row["fusion"], row["seeds"]) == (label, "concat", "1")
    assert float(row["accuracy_mean"]) == pytest.approx(read_json(run_dir / "result.json")["test"]["accuracy"])


def test_mmpareto_gradients_do_not_depend_on_the_loss_scale(tiny_data_config, tiny):
    """Under fp16 loss scaling .grad carries the scale until sync_gradients: the Pareto rule must see and write
    the true gradients (here a CPU GradScaler with scale 2¹⁰ against none)."""
    cfg = config(tiny_data_config, "mmpareto")
    batch = first_batch(tiny)
    method = bound(cfg, tiny)
    method.on_epoch_start(0)
    plain = capture_step(method, batch)
    method = bound(cfg, tiny)
    method.on_epoch_start(0)
    method.trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert method.trainer.grad_scale == 1024.0
    scaled = capture_step(method, batch)
    for name, g in plain.items():
        torch.testing.assert_close(scaled[name], g, rtol=1e-4, atol=1e-6, msg=name)


class Stop(Exception):
    pass


@pytest.mark.parametrize("method, params", [("pmr", {}), ("opm", {"warmup_epochs": 0, "p_exe": 1.0})])
def test_a_run_stopped_after_an_epoch_resumes_as_if_never_stopped(tiny_data_config, tiny, tmp_path, monkeypatch, method, params):
    """PMR's prototypes (momentum chain) and OPM's generator are carried across epochs by state_dict."""
    cfg = config(tiny_data_config, method, params=params, model={"width": 4})  # 2 epochs, narrow encoders
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    expected = fit(cfg, tiny, whole)

    def stop_after_first_epoch(point):
        if point == "epoch":
            raise Stop
    monkeypatch.setattr("pdmp_cli.engine.kill_point", stop_after_first_epoch)
    with pytest.raises(Stop):
        fit(cfg, tiny, stopped)
    monkeypatch.undo()
    resumed = fit(cfg, tiny, stopped)
    assert resumed["resumed_after_epoch"] == 0
    assert read_jsonl(stopped / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")
    assert resumed["val"] == expected["val"] and resumed["test"] == expected["test"]
    wa, wb = load_checkpoint(whole / "best.pt"), load_checkpoint(stopped / "best.pt")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])


def test_mmpareto_leaves_a_non_finite_gradient_to_the_scaler(tiny_data_config, tiny):
    """An fp16 overflow: the combined gradient is not finite, so .grad (where unscale_ found the inf) stays as
    it was, and the scaler skips the step; writing d would have replaced the inf after that check."""
    method = bound(config(tiny_data_config, "mmpareto"), tiny)
    method.on_epoch_start(0)
    params = method.encoder_params["audio"]
    for p in [p for ps in method.encoder_params.values() for p in ps]:
        p.grad = torch.ones_like(p)
    before = {m: [p.grad.clone() for p in ps] for m, ps in method.encoder_params.items()}
    finite = {m: ([torch.full_like(p, 0.5) for p in ps], [torch.full_like(p, 0.25) for p in ps])
              for m, ps in method.encoder_params.items()}
    finite["audio"][0][0] = finite["audio"][0][0].clone().fill_(float("inf"))
    method._grads = finite
    method.after_backward(None, None)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before["audio"]))  # left alone
    assert not torch.equal(method.encoder_params["visual"][0].grad, before["visual"][0])  # finite: written


def test_epoch_means_divide_each_name_by_the_steps_that_logged_it():
    """MMPareto leaves a modality out of a step it skips (non-finite gradient): that step is not a zero in its mean."""
    from pdmp_cli.methods.base import EpochMeans

    stats = EpochMeans()
    stats.add(executed=1.0, cos={"audio": 0.5, "visual": torch.tensor(-0.5)})
    stats.add(executed=0.0, cos={"audio": 0.25})  # visual skipped
    assert stats.means() == {"executed": 0.5, "cos/audio": 0.375, "cos/visual": -0.5}
