"""UME, UMT and AGM: their core rules against hand-computed values, UMT(λ=0) = joint bit for bit, and the
CLI flow rank → compare → report on tiny av-digits (UME and UMT are built on rank's unimodal models)."""
from __future__ import annotations

import csv
import math
import shutil

import pytest
import torch
from sklearn.metrics import f1_score

from pdmp_cli.cli import method_list
from pdmp_cli.config import RunConfig, resolve_config
from pdmp_cli.engine import build_model, build_trainer, fit, load_checkpoint
from pdmp_cli.errors import PdmpError
from pdmp_cli.experiments import Session, resolve_train_config
from pdmp_cli.layout import Layout, read_jsonl
from pdmp_cli.methods import METHODS, get_method
from pdmp_cli.methods.agm import agm_coefficients, shapley_outputs
from pdmp_cli.methods.ume import ensemble_log_probs
from pdmp_cli.methods.umt import distillation_loss
from pdmp_cli.models.fusions import ConcatFusion
from tests.conftest import TINY_SAMPLES
from tests.test_cli import make_invoke, ok, read, snapshot
from tests.test_methods import config, first_batch, step_grads

KEY = f"av-digits@n{TINY_SAMPLES}"


# ---- core rules on fixed tensors ---------------------------------------------------------------------

def test_ume_averages_the_members_probabilities():
    a = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax: [.5, .5], [.75, .25]
    b = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax: [.25, .75], [.5, .5]
    probs = ensemble_log_probs([a, b]).exp()
    assert torch.allclose(probs, torch.tensor([[0.375, 0.625], [0.625, 0.375]]))
    huge = torch.tensor([[1000.0, 0.0]])  # stable where log(mean(softmax)) would underflow to -inf
    assert torch.isfinite(ensemble_log_probs([huge, -huge])).all()


def test_umt_distillation_loss_is_the_sum_of_per_modality_mse():
    features = {"audio": torch.tensor([[1.0, 2.0]]), "visual": torch.zeros(1, 3)}
    teacher = {"audio": torch.zeros(1, 2), "visual": torch.ones(1, 3)}
    assert distillation_loss(features, teacher).item() == pytest.approx((1 + 4) / 2 + 1.0)


def test_agm_shapley_outputs_of_a_nonlinear_head():
    x, y, z = torch.tensor([[2.0]]), torch.tensor([[3.0]]), torch.tensor([[5.0]])
    phi_x, phi_y = shapley_outputs(lambda f: f[0] * f[1] + f[0] + 2, [x, y])
    assert phi_x.item() == pytest.approx(2 + 6 / 2) and phi_y.item() == pytest.approx(6 / 2)  # x + xy/2, xy/2
    phis = shapley_outputs(lambda f: f[0] * f[1] * f[2] + f[2], [x, y, z])  # xyz shared equally; z alone owns +z
    assert [p.item() for p in phis] == pytest.approx([10.0, 10.0, 10.0 + 5.0])


def test_agm_shapley_outputs_of_concat_are_the_modality_blocks_without_bias():
    torch.manual_seed(0)
    fusion = ConcatFusion([3, 2], 4)
    za, zv = torch.randn(5, 3), torch.randn(5, 2)
    phi_a, phi_v = shapley_outputs(fusion, [za, zv])
    assert torch.allclose(phi_a, za @ fusion.fc.weight[:, :3].t(), atol=1e-6)
    assert torch.allclose(phi_v, zv @ fusion.fc.weight[:, 3:].t(), atol=1e-6)
    assert torch.allclose(phi_a + phi_v, fusion([za, zv]) - fusion.fc.bias, atol=1e-6)  # efficiency


def test_agm_coefficients():
    ratios, optimal, coeffs = agm_coefficients({"a": 0.5, "v": 1.5}, {"a": 1.0, "v": 1.0}, alpha=0.1)
    assert ratios == pytest.approx({"a": math.e, "v": math.exp(-1)}) and optimal == pytest.approx({"a": 1, "v": 1})
    assert coeffs == pytest.approx({"a": math.exp(0.1 * (1 - math.e)), "v": math.exp(0.1 * (1 - math.exp(-1)))})
    _, _, capped = agm_coefficients({"a": 5.0, "v": 0.0}, {"a": 0.0, "v": 5.0}, alpha=1.0)
    assert capped["a"] == pytest.approx(math.exp(10.0))  # e^5 − e^-5 > 10: the exponent is capped
    ratios3, _, _ = agm_coefficients({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 0, "b": 0, "c": 0}, alpha=1.0)
    assert ratios3 == pytest.approx({"a": math.exp(2.0), "b": math.exp(0.5), "c": math.exp(-2.5)})  # vs mean of others


def test_agm_scales_each_encoder_gradient_by_its_coefficient(tiny_data_config, tiny):
    batch = first_batch(tiny)
    torch.manual_seed(0)  # the model step_grads builds: its first step's coefficient, computed independently
    model = build_model(config(tiny_data_config, "joint"), tiny)
    with torch.no_grad():
        features = model.encode(batch.inputs)
        phis = shapley_outputs(model.fusion, [features[m] for m in model.modalities])
    scores = {m: -torch.softmax(phi, 1).gather(1, batch.labels[:, None]).clamp_min(1e-8).log().mean().item()
              for m, phi in zip(model.modalities, phis)}
    _, _, coef = agm_coefficients(scores, {m: 0.0 for m in scores}, alpha=1.0)  # no running average yet
    assert all(c != pytest.approx(1.0) for c in coef.values())
    joint = step_grads(config(tiny_data_config, "joint"), tiny, batch)
    agm = step_grads(config(tiny_data_config, "agm"), tiny, batch)
    for name, g in agm.items():
        scale = coef[name.split(".")[1]] if name.startswith("encoders.") else 1.0  # the fusion head is untouched
        expected = joint[name] * scale  # the same up to float rounding (scaled before, not after, backprop)
        assert (g - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-9, name


def test_compare_all_is_every_multimodal_method():
    names = method_list("all")
    assert names == [n for n in METHODS.names() if n != "unimodal"]
    assert {"joint", "ogm-ge", "pdmp", "ume", "umt", "agm"} <= set(names)


def test_checkpoint_paths_are_provenance_and_their_hashes_identity(tiny_data_config):
    def cfg(sha, source):
        return resolve_config(dataset="av-digits", method="umt", data={"samples": TINY_SAMPLES},
                              method_params={"unimodal_sha256": sha, "unimodal_source": source})
    sha = {"audio": "1", "visual": "2"}
    assert cfg(sha, {"audio": "/a", "visual": "/v"}).hash() == cfg(sha, {"audio": "/b", "visual": "/w"}).hash()
    assert cfg(sha, {}).hash() != cfg({"audio": "1", "visual": "3"}, {}).hash()
    # rank's models come with each seed: the setting (what report averages over seeds) is the same
    assert cfg(sha, {}).setting_hash() == cfg({"audio": "1", "visual": "3"}, {}).setting_hash()


# ---- on rank's unimodal models ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranked(tmp_path_factory, data_root, tiny):
    """Tiny av-digits ranked with one 1-epoch seed, then ume, umt and agm compared for one epoch."""
    runs = tmp_path_factory.mktemp("runs")
    invoke = make_invoke(runs, data_root)
    ok(invoke("rank", "--samples", str(TINY_SAMPLES), "--seeds", "1", epochs="1"))
    ok(invoke("compare", "--methods", "ume,umt,agm", "--seeds", "0", epochs="1"))
    return runs, invoke


def test_ume_umt_agm_train_through_the_cli_and_appear_in_the_report(ranked):
    runs, invoke = ranked
    out = ok(invoke("report", "--dataset", "av-digits", "--samples", str(TINY_SAMPLES)))
    table = {r["method"]: r for r in csv.DictReader((runs / KEY / "report" / "results.csv").open())}
    md = (runs / KEY / "report" / "report.md").read_text()
    for method in ("ume", "umt", "agm"):
        result = read(runs / KEY / "train" / f"{method}-concat+epochs=1-s0" / "result.json")
        assert float(table[method]["accuracy_mean"]) == pytest.approx(result["test"]["accuracy"])
        fusion = "none" if method == "ume" else "concat"  # UME uses no fusion
        assert f"| {method} [epochs=1] | {fusion} | val | 1 |" in md and method in out.output
    umt = read(runs / KEY / "train" / "umt-concat+epochs=1-s0" / "config.json")["config"]["method"]["params"]
    checkpoint = runs / KEY / "rank" / "audio" / "s0" / "best.pt"
    assert umt["unimodal_source"]["audio"] == str(checkpoint) and len(umt["unimodal_sha256"]["audio"]) == 64
    logged = read_jsonl(runs / KEY / "train" / "agm-concat+epochs=1-s0" / "metrics.jsonl")[0]["method"]
    assert {"coef/audio", "coef/visual", "ratio/audio", "running_score/visual"} <= set(logged)


def rank_model(runs, modality, tiny):
    """Rank's unimodal model of `modality` (seed 0), rebuilt here from its checkpoint, in eval mode."""
    state = load_checkpoint(runs / KEY / "rank" / modality / "s0" / "best.pt")
    model = build_model(RunConfig.from_dict(state["config"]), tiny)
    model.load_state_dict(state["model"])
    return model.eval()


def test_ume_is_exactly_rank_s_unimodal_models(ranked, tiny):
    runs, _ = ranked
    run = runs / KEY / "train" / "ume-concat+epochs=1-s0"
    result = read(run / "result.json")
    test = tiny.splits["test"]  # the ensemble's test accuracy: the mean of the members' softmax, recomputed here
    inputs = {m: torch.from_numpy(test.inputs[m][:].copy()) for m in tiny.modalities}
    with torch.no_grad():
        probs = sum(torch.softmax(rank_model(runs, m, tiny)(inputs).logits, 1) for m in ("audio", "visual")) / 2
    labels = torch.from_numpy(test.labels.astype("int64"))
    preds = probs.argmax(1)
    assert result["test"]["accuracy"] == pytest.approx((preds == labels).double().mean().item(), abs=1e-7)
    f1 = f1_score(labels, preds, average="macro", labels=list(range(tiny.num_classes)), zero_division=0)
    assert result["test"]["macro_f1"] == pytest.approx(f1, abs=1e-7)
    nll = -probs.gather(1, labels[:, None]).log().mean().item()  # the ensemble's loss: its whole probabilities
    assert result["test"]["loss"] == pytest.approx(nll, rel=1e-5)
    for m in ("audio", "visual"):  # the members' own predictions: the per-modality accuracy is rank's test accuracy
        assert result["test"]["modality_accuracy"][m] == read(runs / KEY / "rank" / m / "s0" / "result.json")["test"]["accuracy"]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 1 and metrics[0]["train_loss"] is None and result["best_epoch"] == 0
    saved = load_checkpoint(run / "best.pt")  # the whole ensemble: members' encoders and heads
    member = load_checkpoint(runs / KEY / "rank" / "audio" / "s0" / "best.pt")["model"]
    own = [k for k in member if k.startswith("encoders.audio.") or k in ("mean_audio", "std_audio")]
    assert len(own) > 4 and all(torch.equal(saved["model"][k], member[k]) for k in own)
    assert torch.equal(saved["method"]["modules"]["audio.fc.weight"], member["fusion.fc.weight"])


def test_umt_with_zero_weight_reproduces_joint_bit_for_bit(ranked, tiny_data_config, tiny, tmp_path):
    runs, _ = ranked
    session = Session(Layout(runs), quiet=True)
    results = {}
    for method, params in (("joint", {}), ("umt", {"distill_weight": 0.0})):
        cfg = resolve_train_config(session, tiny_data_config, method, params, seed=0, optim={"epochs": 2}, device="cpu")
        (tmp_path / method).mkdir()
        results[method] = (fit(cfg, tiny, tmp_path / method), load_checkpoint(tmp_path / method / "best.pt")["model"])
    (joint, joint_state), (umt, umt_state) = results["joint"], results["umt"]
    assert joint["val"] == umt["val"] and joint["test"] == umt["test"]
    assert all(torch.equal(joint_state[k], umt_state[k]) for k in joint_state)


def test_umt_step_gradient_is_joint_s_plus_the_distillation_gradient(ranked, tiny_data_config, tiny):
    runs, _ = ranked
    session = Session(Layout(runs), quiet=True)
    batch, weight = first_batch(tiny), 10.0

    def cfg(method, params):
        return resolve_train_config(session, tiny_data_config, method, params, seed=0, optim={"epochs": 1}, device="cpu")

    joint = step_grads(cfg("joint", {}), tiny, batch)
    umt = step_grads(cfg("umt", {"distill_weight": weight}), tiny, batch)
    with torch.no_grad():  # the teachers: rank's models rebuilt here, not through UMT's loading
        targets = {m: rank_model(runs, m, tiny).encode(batch.inputs)[m] for m in ("audio", "visual")}
    torch.manual_seed(0)  # the model step_grads builds, in train mode as in the step
    model = build_model(cfg("joint", {}), tiny)
    features = model.encode(batch.inputs)
    distill = weight * sum(torch.nn.functional.mse_loss(features[m], targets[m]) for m in targets)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if n.startswith("encoders.")])
    extra = dict(zip(names, torch.autograd.grad(distill, params, allow_unused=True)))
    assert sum(g.norm() for g in extra.values() if g is not None) > 0.01 * sum(joint[n].norm() for n in names)
    for name, g in umt.items():
        expected = joint[name] + extra[name] if extra.get(name) is not None else joint[name]
        if not name.startswith("encoders."):
            assert torch.equal(g, expected), name  # the fusion head gets joint's gradient exactly
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name)


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "ume", "--seed", "3"], "--samples 200 --seeds 4` first"),
    (["train", "--method", "umt", "--seed", "1"], "--samples 200 --seeds 2` first"),
    (["train", "--method", "umt", "--set", "umt.distill_weight=-1"],
     "umt.distill_weight must be >= 0 and finite (got -1.0); set it with --set umt.distill_weight=VALUE"),
    (["train", "--method", "agm", "--set", "agm.alpha=0"], "agm.alpha must be > 0 and finite (got 0.0)"),
    (["train", "--method", "agm", "--set", "agm.start_epoch=5", "--set", "agm.end_epoch=2"],
     "agm.end_epoch must be >= start_epoch (5) (got 2); set it with --set agm.end_epoch=VALUE"),
    (["train", "--method", "agm", "--set", "agm.start_epoch=-1"], "agm.start_epoch must be >= 0 (got -1)"),
    (["train", "--method", "umt", "--width", "8"], "use the --encoder and --width that `pdmp rank` used"),
])
def test_bad_input_is_one_line(ranked, args, message):
    runs, invoke = ranked
    before = snapshot(runs)
    out = invoke(*args, "--samples", str(TINY_SAMPLES), epochs="1")
    assert out.exit_code == 2, out.output
    assert out.output.strip().startswith("error: ") and message in " ".join(out.output.split())
    assert snapshot(runs) == before


def test_ume_without_rank_names_the_file_and_the_command(tmp_path, data_root):
    out = make_invoke(tmp_path, data_root)("train", "--method", "ume", "--samples", str(TINY_SAMPLES))
    assert out.exit_code == 2
    text = " ".join(out.output.split())
    assert "no unimodal model of audio for seed 0" in text and "rank/audio/s0/best.pt is missing" in text
    assert f"run `pdmp rank --dataset av-digits --samples {TINY_SAMPLES} --seeds 1` first" in text


def test_a_teacher_replaced_after_configuration_is_refused(ranked, tiny_data_config, tiny, tmp_path):
    runs, _ = ranked
    copy = tmp_path / "runs"
    shutil.copytree(runs / KEY / "rank", copy / KEY / "rank")
    for name in ("rank.json", "last_dataset.json"):
        if (runs / KEY / name).exists():
            shutil.copy(runs / KEY / name, copy / KEY / name)
    cfg = resolve_train_config(Session(Layout(copy), quiet=True), tiny_data_config, "umt", {}, seed=0, device="cpu")
    checkpoint = copy / KEY / "rank" / "audio" / "s0" / "best.pt"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")  # another `pdmp rank` since
    with pytest.raises(PdmpError, match="changed since this run was configured"):
        build_trainer(cfg, build_model(cfg, tiny), get_method("umt")(cfg.method.params, cfg), tiny, torch.device("cpu"))
