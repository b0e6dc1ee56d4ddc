"""Issue 7 (speed): the data pipeline, batched augmentation, autocast / gradient scaling correctness of the
gradient-modulating methods, the fast-path wiring and the benchmark (tiny sizes, CPU)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pdmp_cli import bench, engine
from pdmp_cli.config import AugmentConfig, RunConfig, resolve_config
from pdmp_cli.data.base import FeatureCache, Split
from pdmp_cli.data.pipeline import Augmenter, batches, frame_modalities, global_rows, prefetched
from pdmp_cli.methods import Batch, get_method

CPU = torch.device("cpu")


def image_batch(b: int = 6, t: int = 2, c: int = 1, h: int = 8, w: int = 10) -> torch.Tensor:
    return torch.arange(b * t * c * h * w, dtype=torch.float32).view(b, t, c, h, w)


# ---- augmentation ------------------------------------------------------------------------------------

def test_flip_alone_mirrors_exactly_the_drawn_samples_and_leaves_the_rest():
    x = image_batch(b=64)
    aug = Augmenter(AugmentConfig(flip=True), ["visual"], CPU, seed=3)
    drawn = Augmenter(AugmentConfig(flip=True), ["visual"], CPU, seed=3).params(64, CPU)["flip"]
    out = aug.apply(x)
    assert out.shape == x.shape and 10 < int(drawn.sum()) < 54  # about half of 64
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if drawn[i] else x[i])
    assert not torch.equal(x[0].flip(-1), x[0])  # the test image is not symmetric: a flip shows


def test_shares_of_a_global_batch_are_augmented_as_one_process_augments_the_whole_batch():
    # Two processes each hold half of a global batch (the shares of distributed.shard_batches): with the
    # global batch's positions, each draws parameters for all of it and keeps its own samples' rows.
    cfg = AugmentConfig(crop=True, flip=True)
    global_batch = np.array([7, 2, 9, 4, 0, 5])  # permutation order; one process reads it sorted
    x = torch.randn(6, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = Batch({"visual": x}, torch.zeros(6, dtype=torch.long), torch.from_numpy(np.sort(global_batch)))
    expected = Augmenter(cfg, ["visual"], CPU, seed=3)(whole, global_rows(global_batch, whole.index)).inputs["visual"]
    position = {int(i): row for row, i in enumerate(np.sort(global_batch))}
    for share in np.array_split(global_batch, 2):
        idx = np.sort(share)
        rows = [position[int(i)] for i in idx]
        part = Batch({"visual": x[rows]}, torch.zeros(len(idx), dtype=torch.long), torch.from_numpy(idx))
        got = Augmenter(cfg, ["visual"], CPU, seed=3)(part, global_rows(global_batch, part.index)).inputs["visual"]
        assert torch.allclose(got, expected[rows])


def test_per_sample_draws_of_uneven_shares_are_the_rows_of_one_draw_for_the_global_batch():
    """Trainer.rand (OPM's dropping): shares of 3 and 2 of a global batch of 5 get the rows one process gets
    for the whole batch, and every share's generator ends in the same state (later draws stay in step);
    on one process it is torch.rand of the batch as it stands."""
    from pdmp_cli.data.pipeline import global_rows
    from pdmp_cli.methods import Trainer

    trainer = Trainer(None, None, None, CPU)
    global_batch = np.array([7, 2, 9, 4, 0])
    whole = Batch({}, torch.zeros(5, dtype=torch.long), torch.from_numpy(np.sort(global_batch)))
    trainer.global_rows = global_rows(global_batch, whole.index)
    assert trainer.global_rows[1] is None
    expected = trainer.rand(whole, 2, torch.Generator().manual_seed(1))
    assert torch.equal(expected, torch.rand((5, 2), generator=torch.Generator().manual_seed(1)))
    position = {int(i): row for row, i in enumerate(np.sort(global_batch))}
    states = []
    for share in np.array_split(global_batch, 2):
        idx = np.sort(share)
        part = Batch({}, torch.zeros(len(idx), dtype=torch.long), torch.from_numpy(idx))
        trainer.global_rows = global_rows(global_batch, part.index)
        generator = torch.Generator().manual_seed(1)
        assert torch.equal(trainer.rand(part, 2, generator), expected[[position[int(i)] for i in idx]])
        states.append(generator.get_state())
    assert torch.equal(states[0], states[1])


def test_crop_params_stay_inside_the_image_and_in_the_configured_ranges():
    cfg = AugmentConfig(crop=True, crop_scale=[0.2, 0.6], crop_ratio=[0.5, 2.0], flip=True)
    p = Augmenter(cfg, ["visual"], CPU, seed=0).params(4000, CPU)
    w, h = p["width"], p["height"]
    assert ((w > 0) & (w <= 1) & (h > 0) & (h <= 1)).all()
    assert (p["centre_x"].abs() + w <= 1 + 1e-6).all() and (p["centre_y"].abs() + h <= 1 + 1e-6).all()
    free = (w < 1) & (h < 1)  # not clamped: area and aspect ratio exactly as drawn
    assert free.float().mean() > 0.9
    assert ((w * h)[free] >= 0.2 - 1e-6).all() and ((w * h)[free] <= 0.6 + 1e-6).all()
    assert ((w / h)[free] >= 0.5 - 1e-5).all() and ((w / h)[free] <= 2.0 + 1e-5).all()
    assert 0.45 < p["flip"].float().mean() < 0.55


def test_crop_resamples_the_drawn_window_as_computed_by_hand():
    # A horizontal ramp (value = column index): bilinear resampling is exact on it, so each output column
    # must hold the input x-coordinate its crop maps it to: ((cx + s·w·x_out + 1)·W − 1) / 2, s = −1 if flipped.
    b, h, w = 16, 6, 12
    x = torch.arange(w, dtype=torch.float32).expand(b, 1, 1, h, w).clone()
    cfg = AugmentConfig(crop=True, crop_scale=[0.3, 0.9], flip=True)
    p = Augmenter(cfg, ["visual"], CPU, seed=1).params(b, CPU)
    out = Augmenter(cfg, ["visual"], CPU, seed=1).apply(x)
    x_out = (2 * torch.arange(w) + 1) / w - 1
    for i in range(b):
        sign = -1.0 if p["flip"][i] else 1.0
        expected = (((p["centre_x"][i] + sign * p["width"][i] * x_out + 1) * w - 1) / 2).clamp(0, w - 1)
        assert torch.allclose(out[i, 0, 0], expected.expand(h, w), atol=1e-4)


def test_augmentation_is_seeded_and_resumable_from_its_generator_state():
    x = torch.randint(0, 255, (8, 3, 3, 16, 16), dtype=torch.uint8)
    cfg = AugmentConfig(crop=True, flip=True)
    a, b = Augmenter(cfg, ["visual"], CPU, 7), Augmenter(cfg, ["visual"], CPU, 7)
    first = a.apply(x)
    assert first.dtype == torch.float32 and first.shape == x.shape
    assert torch.equal(first, b.apply(x))
    assert not torch.equal(first, Augmenter(cfg, ["visual"], CPU, 8).apply(x))
    state = a.generator.get_state()
    second = a.apply(x)
    assert not torch.equal(second, first)  # the stream moves on
    b.generator.set_state(state)
    assert torch.equal(b.apply(x), second)
    # frames of one clip share their crop: identical frames stay identical
    same = x[:, :1].expand(-1, 3, -1, -1, -1)
    out = Augmenter(cfg, ["visual"], CPU, 0).apply(same)
    assert torch.equal(out[:, 0], out[:, 2])


def test_the_augmentation_stream_is_saved_with_its_device_and_refused_on_another():
    from pdmp_cli.errors import PdmpError

    order = np.random.default_rng(0)
    assert engine.rng_state(order, cuda=False)["augment"] is None  # no augmentation: nothing saved
    generator = torch.Generator().manual_seed(5)
    state = engine.rng_state(order, cuda=False, augment=generator)
    assert state["augment"]["device"] == "cpu"
    expected = torch.rand(3, generator=generator)
    restored = torch.Generator()
    engine.set_rng_state(state, order, restored)
    assert torch.equal(torch.rand(3, generator=restored), expected)
    old = {**state, "augment": state["augment"]["state"]}  # a state.pt from before the device was recorded
    engine.set_rng_state(old, order, restored)
    assert torch.equal(torch.rand(3, generator=restored), expected)
    engine.set_rng_state({**state, "augment": None}, order, restored)  # saved without augmentation: left alone
    moved = {**state, "augment": {**state["augment"], "device": "cuda"}}
    with pytest.raises(PdmpError, match="started on cuda .* resume it with --device cuda, or pass --force"):
        engine.set_rng_state(moved, order, restored)


def manifest_cache(recipe: object, modalities: list[str]) -> FeatureCache:
    return FeatureCache(Path("."), {"recipe": recipe}, "h", modalities, ["a"], {})


def test_only_frame_modalities_are_augmented_spectrograms_and_flow_never():
    real = {"modalities": {"audio": {"kind": "logmel"}, "visual": {"kind": "frames"}, "flow": {"kind": "flow"},
                           "rgb": {"kind": "frames"}}}
    assert frame_modalities(manifest_cache(real, ["audio", "visual", "flow", "rgb"]), ["audio", "visual", "flow", "rgb"]) == ["visual", "rgb"]
    assert frame_modalities(manifest_cache({"audio": {}, "visual": {}}, ["audio", "visual"]), ["audio", "visual"]) == ["visual"]
    spec = torch.randn(4, 1, 1, 8, 12)
    batch = Batch({"audio": spec, "visual": image_batch(b=4)}, torch.zeros(4, dtype=torch.long), torch.arange(4))
    out = Augmenter(AugmentConfig(crop=True, flip=True), ["visual"], CPU, 0)(batch)
    assert out.inputs["audio"] is spec and not torch.equal(out.inputs["visual"], batch.inputs["visual"])


def test_augmentation_off_is_the_identity():
    batch = Batch({"visual": image_batch()}, torch.zeros(6, dtype=torch.long), torch.arange(6))
    assert Augmenter(AugmentConfig(), ["visual"], CPU, 0)(batch) is batch
    assert Augmenter(AugmentConfig(crop=True), [], CPU, 0)(batch) is batch


# ---- the pipeline ------------------------------------------------------------------------------------

def old_engine_batches(split, modalities, batch_size, device, order=None):
    """engine.batches as it was before the pipeline moved out (commit a3d5eab): the reference."""
    order = np.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = np.sort(order[start : start + batch_size])
        yield Batch(
            inputs={m: torch.from_numpy(np.ascontiguousarray(split.inputs[m][idx])).to(device) for m in modalities},
            labels=torch.from_numpy(split.labels[idx].astype(np.int64)).to(device),
            index=torch.from_numpy(idx),
        )


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_pipeline_yields_exactly_the_old_batches(tiny, prefetch):
    train = tiny.splits["train"]
    order = np.random.default_rng(0).permutation(len(train))
    for kw in ({"order": order}, {}):
        old = list(old_engine_batches(train, tiny.modalities, 16, CPU, **kw))
        new = list(batches(train, tiny.modalities, 16, CPU, prefetch=prefetch, **kw))
        assert len(new) == len(old) == math.ceil(len(train) / 16)
        for a, b in zip(old, new):
            assert torch.equal(a.labels, b.labels) and torch.equal(a.index, b.index)
            for m in tiny.modalities:
                assert a.inputs[m].dtype == b.inputs[m].dtype and torch.equal(a.inputs[m], b.inputs[m])


def test_prefetch_reraises_errors_and_stops_its_thread_when_the_consumer_stops():
    def failing():
        yield 1
        raise ValueError("bad read")

    with pytest.raises(ValueError, match="bad read"):
        list(prefetched(failing(), 2))
    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    for i in prefetched(endless(), 2):
        if i == 3:
            break
    assert len(produced) < 10  # the producer stopped after the consumer did, a few items ahead at most


# ---- autocast and gradient scaling -----------------------------------------------------------------------

def run_steps(method_name: str, scaler_scale: float | None, steps: int = 2, precision: str = "fp32"):
    """Train `steps` steps; returns, per step, the gradients a method's after_backward receives (what it reads and
    modulates) and those the optimizer steps with (after it), and the log."""
    method = bench.make_trainer(method_name, "small", "concat", CPU, bench.method_params(method_name),
                                {"precision": precision})
    if scaler_scale is not None:
        method.trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale)
    entry, seen = [], []

    def grads() -> list[torch.Tensor]:
        return [p.grad.clone() for p in method.model.parameters() if p.grad is not None]

    after_backward, optimizer_step = method.after_backward, method.trainer.optimizer.step
    method.after_backward = lambda out, batch: entry.append(grads()) or after_backward(out, batch)
    method.trainer.optimizer.step = lambda *a, **k: seen.append(grads()) or optimizer_step(*a, **k)
    torch.manual_seed(5)  # OGM-GE's noise: the same draws in both runs
    for batch in bench.make_batches(steps, 12, CPU):
        method.step(batch)
    return (entry, seen), method.log(), method


@pytest.mark.parametrize("name", ["ogm", "ogm-ge", "pdmp", "joint"])
def test_modulating_methods_act_on_unscaled_gradients_under_a_gradient_scaler(name):
    plain, plain_log, _ = run_steps(name, None)
    scaled, scaled_log, method = run_steps(name, 2.0**14)
    assert method.trainer.grad_scale == 2.0**14  # no overflow: the scale stayed, so every step was taken
    for plain_grads, scaled_grads in zip(plain, scaled):  # at after_backward's entry, then at the optimizer step
        assert len(plain_grads) == len(scaled_grads) == 2
        for a, b in zip(plain_grads, scaled_grads):
            assert len(a) == len(b) > 0
            for ga, gb in zip(a, b):
                assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)
    assert plain_log.keys() == scaled_log.keys()
    for key in plain_log:
        assert plain_log[key] == pytest.approx(scaled_log[key], rel=1e-6)
    if name.startswith("ogm"):
        assert any(k.startswith("coef/") and v < 1 for k, v in plain_log.items())  # modulation really acted


def test_a_scaler_step_with_overflowing_gradients_is_skipped_cleanly():
    method = bench.make_trainer("ogm", "small", "concat", CPU, {})
    method.trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in method.model.parameters()]
    head_weight = next(method.model.fusion.parameters())
    hook = head_weight.register_hook(lambda g: g * float("inf"))  # an fp16-style overflow in one gradient
    method.step(bench.make_batches(1, 16, CPU)[0])
    assert all(torch.equal(a, p) for a, p in zip(before, method.model.parameters()))  # the step was skipped
    assert method.trainer.grad_scale == 2.0**9  # and the scale backed off
    assert all(math.isfinite(v) for v in method.log().values())
    hook.remove()
    method.step(bench.make_batches(1, 16, CPU)[0])  # the next sane step trains again
    assert not all(torch.equal(a, p) for a, p in zip(before, method.model.parameters()))


def test_bf16_autocast_on_cpu_trains_and_keeps_modulation_inputs_in_float32():
    (entry, seen), log, method = run_steps("ogm-ge", None, steps=2, precision="bf16")
    assert method.trainer.amp_dtype == torch.bfloat16 and method.trainer.scaler is None
    batch = bench.make_batches(1, 8, CPU)[0]
    with method.trainer.autocast():
        out = method.model(batch.inputs)
    assert out.logits.dtype == torch.bfloat16
    assert all(z.dtype == torch.float32 for z in out.modality_logits.values())  # read outside autocast by OGM
    assert all(torch.isfinite(g).all() for grads in entry + seen for g in grads) and all(math.isfinite(v) for v in log.values())


def test_fast_path_settings_resolve_and_wire_into_the_trainer():
    cfg = resolve_config(dataset="av-digits", method="joint", device="cpu")
    assert engine.resolve_precision(cfg, CPU) == "fp32"  # CPU default: today's numbers
    fp16 = resolve_config(dataset="av-digits", method="joint", device="cpu",
                          speed={"precision": "fp16", "channels_last": True})
    method = bench.make_trainer("joint", "small", "concat", CPU, {}, dataclasses.asdict(fp16.speed))
    trainer = method.trainer
    assert trainer.amp_dtype == torch.float16 and isinstance(trainer.scaler, torch.amp.GradScaler)
    # a weight with one input channel (the stems of 1-channel inputs) is channels-last either way: check the others
    convs = [m for m in method.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    plain = bench.make_trainer("joint", "small", "concat", CPU, {}, {"channels_last": False})
    convs = [m for m in plain.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and not any(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # speed is how a run goes (not in the hash); augmentation is what is trained (in the hash when on)
    assert fp16.hash() == cfg.hash()
    augmented = resolve_config(dataset="av-digits", method="joint", device="cpu", augment={"crop": True})
    assert augmented.hash() != cfg.hash() and augmented.augment.crop and not cfg.augment.active
    old = cfg.to_dict()
    del old["augment"], old["speed"]  # a config written before these groups existed
    assert RunConfig.from_dict(old).hash() == cfg.hash()
    from pdmp_cli.errors import PdmpError

    with pytest.raises(PdmpError, match="--precision"):
        resolve_config(dataset="av-digits", method="joint", speed={"precision": "fp8"})
    with pytest.raises(PdmpError, match="crop_scale"):
        resolve_config(dataset="av-digits", method="joint", augment={"crop_scale": [0.5, 2.0]})


def test_a_run_with_augmentation_resumed_after_a_crash_ends_as_if_never_interrupted(tmp_path, tiny, tiny_data_config, monkeypatch):
    cfg = resolve_config(dataset="av-digits", method="joint", data=dataclasses.asdict(tiny_data_config),
                         optim={"epochs": 2, "batch_size": 32}, device="cpu", augment={"crop": True, "flip": True})
    whole = engine.fit(cfg, tiny, tmp_path / "whole")

    class Crash(Exception):
        pass

    def crash_once(name: str) -> None:
        if name == "epoch" and not crashed:
            crashed.append(name)
            raise Crash

    crashed: list[str] = []
    monkeypatch.setattr(engine, "kill_point", crash_once)
    with pytest.raises(Crash):
        engine.fit(cfg, tiny, tmp_path / "resumed")
    resumed = engine.fit(cfg, tiny, tmp_path / "resumed")
    assert resumed["resumed_after_epoch"] == 0
    assert resumed["val"] == whole["val"] and resumed["test"] == whole["test"]
    history = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert history == [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]


# ---- the benchmark ---------------------------------------------------------------------------------------

def test_bench_reports_pipeline_step_methods_and_encoders_as_ratios(tmp_path, tiny_data_config):
    out = bench.run(None, steps=1, rounds=1, batch_size=8, device="cpu", json_path=tmp_path / "bench.json",
                    encoders=["small"], encoder_steps=1, encoder_rounds=1, data=tiny_data_config, decode_samples=4)
    assert json.loads((tmp_path / "bench.json").read_text()).items() >= json.loads(json.dumps(out)).items()
    assert list(out["methods"]) == bench.default_methods() and bench.default_methods()[0] == "joint"
    assert "unimodal" not in out["methods"]
    timed = {m: r for m, r in out["methods"].items() if "error" not in r}
    assert {"joint", "ogm", "ogm-ge", "pdmp"} <= set(timed) and timed["joint"]["ratio_to_joint"] == 1.0
    p = out["pipeline"]
    assert p["cache_samples_per_s"] > 0 and p["decode_samples_per_s"] > 0 and p["decoded_samples"] == 4
    assert p["cache_vs_decode"] == pytest.approx(p["cache_samples_per_s"] / p["decode_samples_per_s"])
    assert p["augmented_modalities"] == ["visual"]
    assert out["step"]["pipeline_vs_step"] == pytest.approx(p["cache_samples_per_s"] / out["step"]["samples_per_s"])
    assert out["encoders"]["small"]["ratio_to_small"] == 1.0 and "flops_note" in out


def test_gpu_check_runs_at_tiny_size_on_cpu(tmp_path):
    # the small encoder keeps the test quick; scripts/gpu_check.sh (resnet18) was smoke-run at 16×16 by hand
    out = bench.gpu_check(size=16, frames=2, batch_size=2, steps=1, rounds=1, device="cpu", json_path=tmp_path / "g.json",
                          encoder="small")
    assert out["setup"]["shapes"] == {"audio": [1, 1, 16, 16], "visual": [2, 3, 16, 16]}
    assert out["fast"]["precision"] == "bf16" and out["plain"]["precision"] == "fp32"
    assert out["speedup"] == pytest.approx(out["fast"]["samples_per_s"] / out["plain"]["samples_per_s"])
    assert out["plain"]["gflop_per_step"] > 0 and out["plain"]["bf16_peak_tflops"] is None
    assert json.loads((tmp_path / "g.json").read_text())["speedup"] == pytest.approx(out["speedup"])


def test_train_command_takes_the_speed_and_augmentation_flags_and_records_them(tmp_path, data_root, tiny):
    from typer.testing import CliRunner

    from pdmp_cli.cli import app
    from tests.conftest import TINY_SAMPLES

    out = CliRunner().invoke(app, ["train", "--method", "joint", "--samples", str(TINY_SAMPLES), "--epochs", "1",
                                   "--device", "cpu", "--precision", "bf16", "--no-channels-last", "--augment",
                                   "--data-dir", str(data_root), "--runs-dir", str(tmp_path), "--quiet"])
    assert out.exit_code == 0, out.output
    run_dir = next(tmp_path.glob("*/train/*"))
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["speed"]["precision"] == "bf16" and config["speed"]["channels_last"] is False
    assert config["augment"]["crop"] and config["augment"]["flip"] and "+augment.crop=True" in run_dir.name
    assert json.loads((run_dir / "result.json").read_text())["precision"] == "bf16"
    bad = CliRunner().invoke(app, ["train", "--method", "joint", "--samples", str(TINY_SAMPLES), "--precision", "fp8",
                                   "--data-dir", str(data_root), "--runs-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "--precision must be one of" in bad.output


def test_trainer_grads_are_unscaled_under_a_scaler():
    method = bench.make_trainer("joint", "small", "concat", CPU, {})
    batch = bench.make_batches(1, 8, CPU)[0]
    params = list(method.model.fusion.parameters()) + [torch.nn.Parameter(torch.ones(2))]  # the last one unused
    loss = method.loss(method.model(batch.inputs), batch)
    plain = method.trainer.grads(loss, params)
    method.trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = method.trainer.grads(loss, params)
    assert all(torch.allclose(a, b) for a, b in zip(plain, scaled)) and torch.equal(scaled[-1], torch.zeros(2))


def test_augmentation_is_on_for_the_real_dataset_presets_and_off_for_av_digits():
    from pdmp_cli.data import DATASETS

    real = [n for n in DATASETS.names() if n not in ("av-digits", "custom")]
    assert real
    for name in real:
        assert resolve_config(dataset=name, method="joint", device="cpu").augment.active, name
        assert not resolve_config(dataset=name, method="joint", device="cpu", augment={"crop": False, "flip": False}).augment.active
    assert not resolve_config(dataset="av-digits", method="joint", device="cpu").augment.active


def test_bf16_peaks_match_whole_words_of_the_device_name():
    peaks = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L40S": 362.0,
             "NVIDIA L40": 181.0, "NVIDIA L4": 121.0, "NVIDIA A10G": None, "NVIDIA A10": 125.0,
             "NVIDIA GeForce RTX 4090": None, "NVIDIA A40": None}
    assert {name: bench.bf16_peak_of(name) for name in peaks} == peaks
