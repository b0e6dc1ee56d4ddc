"""Method rules against hand-computed values, and the invariants that tie methods to joint training."""
from __future__ import annotations

import math
import re

import pytest
import torch

from pdmp_cli.config import resolve_config
from pdmp_cli.engine import build_model, build_trainer, fit, load_checkpoint
from pdmp_cli.errors import PdmpError
from pdmp_cli.methods import Batch, get_method
from pdmp_cli.methods.ogm import ogm_coefficients
from pdmp_cli.methods.pdmp import ScaleGrad, coefficients


def test_ogm_coefficients_two_modalities():
    ratios, coeffs = ogm_coefficients({"audio": 30.0, "visual": 15.0}, alpha=0.5)
    assert ratios == {"audio": 2.0, "visual": 0.5}
    assert coeffs["audio"] == pytest.approx(1 - math.tanh(1.0)) == pytest.approx(0.2384058440)
    assert coeffs["visual"] == 1.0


def test_ogm_coefficients_three_modalities_use_the_mean_of_the_others():
    ratios, coeffs = ogm_coefficients({"a": 6.0, "b": 2.0, "c": 4.0}, alpha=0.1)
    assert ratios == pytest.approx({"a": 2.0, "b": 0.4, "c": 1.0})
    assert coeffs == pytest.approx({"a": 1 - math.tanh(0.2), "b": 1.0, "c": 1.0})  # ρ = 1 is not > 1


def test_pdmp_coefficients_from_a_ranking():
    assert coefficients(["visual", "audio"], 3.0, 0.25) == {"visual": 3.0, "audio": 0.25}
    assert coefficients(["a", "b", "c"], 3.0, 0.5) == {"a": 3.0, "b": 0.5, "c": 0.5}
    assert coefficients(["a", "b", "c"], 3.0, 0.5, "graded") == {"a": 3.0, "b": 1.75, "c": 0.5}


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = ScaleGrad.apply(x, 2.5)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.5))


# ---- on a real model and batch -------------------------------------------------------------------

def config(tiny_data_config, method, **kw):
    params = kw.pop("params", {})
    if method == "pdmp":
        params = {"ranking": ["audio", "visual"], **params}
    return resolve_config(dataset="av-digits", method=method, data={"samples": tiny_data_config.samples,
                          "root": tiny_data_config.root}, method_params=params,
                          optim={"epochs": 2, **kw.pop("optim", {})}, device="cpu", **kw)


def first_batch(tiny, n=32):
    split = tiny.splits["train"]
    idx = torch.arange(n)
    return Batch({m: torch.from_numpy(split.inputs[m][:n].copy()) for m in tiny.modalities},
                 torch.from_numpy(split.labels[:n].astype("int64")), idx)


def step_grads(cfg, tiny, batch):
    """Gradients of every parameter after one training step's backward (seeded model)."""
    torch.manual_seed(0)
    model = build_model(cfg, tiny)
    method = get_method(cfg.method.name)(cfg.method.params, cfg)
    optimizer = build_trainer(cfg, model, method, tiny, torch.device("cpu")).optimizer
    method.on_epoch_start(0)
    captured = {}
    real_step = optimizer.step
    optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()}) or real_step()
    method.step(batch)
    return captured


def test_pdmp_step_scales_each_encoder_gradient_by_its_gamma(tiny_data_config, tiny):
    batch = first_batch(tiny)
    joint = step_grads(config(tiny_data_config, "joint"), tiny, batch)
    pdmp = step_grads(config(tiny_data_config, "pdmp", params={"gamma_p": 3.0, "gamma_r": 0.25}), tiny, batch)
    for name, g in joint.items():
        gamma = 3.0 if name.startswith("encoders.audio") else 0.25 if name.startswith("encoders.visual") else 1.0
        # γ = 3 is not a power of two, so float rounding inside conv backward differs slightly.
        torch.testing.assert_close(pdmp[name], gamma * g, rtol=1e-4, atol=1e-4 * gamma * g.abs().max().item(), msg=name)
    assert any(name.startswith("fusion") for name in joint)


def ogm_k(cfg, tiny, batch) -> dict[str, float]:
    """OGM's coefficients recomputed by hand from a fresh forward of the same seeded model."""
    torch.manual_seed(0)
    model = build_model(cfg, tiny)
    with torch.no_grad():
        out = model(batch.inputs)
        scores = {m: torch.softmax(o, 1)[torch.arange(len(batch.labels)), batch.labels].sum().item()
                  for m, o in out.modality_logits.items()}
    return ogm_coefficients(scores, cfg.method.params["alpha"])[1]


def test_ogm_scales_only_conv_kernels_of_the_leading_modality(tiny_data_config, tiny):
    batch = first_batch(tiny)
    joint = step_grads(config(tiny_data_config, "joint"), tiny, batch)
    cfg = config(tiny_data_config, "ogm", params={"alpha": 0.8})
    ogm = step_grads(cfg, tiny, batch)
    k = ogm_k(cfg, tiny, batch)
    assert min(k.values()) < 1.0  # something is modulated in this batch
    for name, g in joint.items():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        expected = g * k[m] if m and g.dim() == 4 else g
        torch.testing.assert_close(ogm[name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_ogm_ge_adds_noise_with_the_original_gradients_std(tiny_data_config, tiny):
    batch = first_batch(tiny)
    joint = step_grads(config(tiny_data_config, "joint"), tiny, batch)
    cfg = config(tiny_data_config, "ogm-ge", params={"alpha": 0.8})
    ge = step_grads(cfg, tiny, batch)
    plain = step_grads(config(tiny_data_config, "ogm", params={"alpha": 0.8}), tiny, batch)
    k = ogm_k(cfg, tiny, batch)
    assert min(k.values()) < 0.5  # noise σ from the original gradient is then far from σ of the scaled one
    large_convs = [n for n, g in joint.items() if g.dim() == 4 and g.numel() >= 1000]
    assert {n.split(".")[1] for n in large_convs} == {"audio", "visual"}
    for name in large_convs:  # every conv kernel of both encoders, as the reference code
        noise = ge[name] - plain[name]
        assert noise.std().item() == pytest.approx(joint[name].std().item(), rel=0.15), name
        assert abs(noise.mean().item()) < 0.15 * joint[name].std().item(), name
    for n, g in joint.items():  # non-conv tensors are untouched
        if g.dim() != 4:
            torch.testing.assert_close(ge[n], g)


def test_ogm_outside_its_epoch_window_is_joint(tiny_data_config, tiny):
    batch = first_batch(tiny)
    joint = step_grads(config(tiny_data_config, "joint"), tiny, batch)
    late = step_grads(config(tiny_data_config, "ogm-ge", params={"alpha": 0.8, "start_epoch": 1}), tiny, batch)
    for name, g in joint.items():
        assert torch.equal(late[name], g), name


def test_pdmp_with_unit_gammas_reproduces_joint_bit_for_bit(tiny_data_config, tiny, tmp_path):
    results = {}
    for method, params in (("joint", {}), ("pdmp", {"gamma_p": 1.0, "gamma_r": 1.0})):
        run_dir = tmp_path / method
        run_dir.mkdir()
        results[method] = (fit(config(tiny_data_config, method, params=params), tiny, run_dir),
                           load_checkpoint(run_dir / "best.pt")["model"])
    (joint, joint_state), (pdmp, pdmp_state) = results["joint"], results["pdmp"]
    assert joint["val"] == pdmp["val"] and joint["test"] == pdmp["test"]
    assert all(torch.equal(joint_state[k], pdmp_state[k]) for k in joint_state)


def test_pdmp_lr_mode_for_adam_scales_encoder_learning_rates(tiny_data_config, tiny):
    cfg = config(tiny_data_config, "pdmp", params={"gamma_p": 2.0, "gamma_r": 0.5, "end_epoch": 1},
                 optim={"optimizer": "adam", "lr": 1e-3})
    assert cfg.method.params["mode"] == "lr"  # auto resolved and recorded
    method = get_method("pdmp")(cfg.method.params, cfg)
    optimizer = build_trainer(cfg, build_model(cfg, tiny), method, tiny, torch.device("cpu")).optimizer
    seen = []
    real_step = optimizer.step
    optimizer.step = lambda: seen.append({g["name"]: g["lr"] for g in optimizer.param_groups}) or real_step()
    method.on_epoch_start(0)
    method.step(first_batch(tiny))
    method.step(first_batch(tiny, 16))
    assert seen == [{"encoder:audio": 2e-3, "encoder:visual": 5e-4, "fusion": 1e-3}] * 2  # every step of the epoch
    method.on_epoch_end(0)
    # Restored exactly before the engine steps the scheduler and saves state.pt (neither sees a scaled rate).
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3] * 3
    method.on_epoch_start(0)
    method.on_epoch_start(0)  # started again without an end (bench, tests): scaled once, not twice
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["encoder:audio"] == 2e-3
    method.on_epoch_end(0)
    method.on_epoch_start(1)  # outside the window [0, 1): unscaled
    method.step(first_batch(tiny))
    assert seen[-1] == {"encoder:audio": 1e-3, "encoder:visual": 1e-3, "fusion": 1e-3}


def test_pdmp_epoch_window(tiny_data_config, tiny):
    cfg = config(tiny_data_config, "pdmp", params={"start_epoch": 1, "end_epoch": 3})
    method = get_method("pdmp")(cfg.method.params, cfg)
    build_trainer(cfg, build_model(cfg, tiny), method, tiny, torch.device("cpu"))
    active = []
    for epoch in range(4):
        method.on_epoch_start(epoch)
        active.append(method.log()["gamma/audio"])
    assert active == [1.0, 3.0, 3.0, 1.0]


@pytest.mark.parametrize("method, params, message", [
    ("pdmp", {"gamma_p": 0.0}, "pdmp.gamma_p must be > 0 and finite (got 0.0); set it with --set pdmp.gamma_p=VALUE"),
    ("pdmp", {"gamma_r": -1.0}, "pdmp.gamma_r must be > 0 and finite (got -1.0)"),
    ("pdmp", {"mode": "fast"}, "pdmp.mode must be one of auto, grad, lr (got 'fast'); set it with --set pdmp.mode=VALUE"),
    ("pdmp", {"start_epoch": 2, "end_epoch": 2}, "pdmp.end_epoch must be > start_epoch (2) (got 2)"),  # exclusive end
    ("ogm-ge", {"alpha": 0.0}, "ogm-ge.alpha must be > 0 and finite (got 0.0)"),
    ("ogm", {"start_epoch": -1}, "ogm.start_epoch must be >= 0 (got -1)"),
    ("ogm", {"start_epoch": 3, "end_epoch": 2}, "ogm.end_epoch must be >= start_epoch (3) (got 2)"),  # inclusive end
    ("joint", {"alpha": 0.1}, "has no option 'alpha'"),
])
def test_invalid_method_values_are_refused(tiny_data_config, method, params, message):
    with pytest.raises(PdmpError, match=re.escape(message)):
        config(tiny_data_config, method, params=params)


@pytest.mark.parametrize("method", ["ogm", "agm", "pmr", "opm", "mmpareto", "gblending", "mla", "pdmp"])
def test_methods_that_balance_modalities_refuse_a_single_modality(tiny_data_config, method):
    with pytest.raises(PdmpError, match=re.escape(f"{method} balances modalities, so it needs at least 2 (this run has "
                                                  f"1: audio)")):
        config(tiny_data_config, method, modalities=["audio"])
    assert config(tiny_data_config, "joint", modalities=["audio"]).modalities == ["audio"]


def test_epoch_windows():
    from pdmp_cli.methods.base import in_window

    assert [in_window(e, 1, 3, inclusive_end=True) for e in range(5)] == [False, True, True, True, False]
    assert [in_window(e, 1, 3, inclusive_end=False) for e in range(5)] == [False, True, True, False, False]
    assert [in_window(e, 2, None, inclusive_end=False) for e in range(4)] == [False, False, True, True]


def test_pdmp_refuses_a_ranking_of_other_modalities(tiny_data_config):
    with pytest.raises(PdmpError, match="does not match the run's modalities"):
        config(tiny_data_config, "pdmp", params={"ranking": ["audio", "depth"]})


def test_ranking_is_by_score_with_ties_broken_by_modality_order_and_recorded():
    from pdmp_cli.experiments import rank_modalities

    assert rank_modalities({"audio": 0.6, "visual": 0.8}) == (["visual", "audio"], [])
    assert rank_modalities({"rgb": 0.7, "depth": 0.9, "ir": 0.7}) == (["depth", "rgb", "ir"], [["rgb", "ir"]])
    assert rank_modalities({"ir": 0.7, "rgb": 0.7}) == (["ir", "rgb"], [["ir", "rgb"]])
