"""`make bench` / `pdmp bench`: where training time goes, as ratios, in one run.

1. Data pipeline alone (memory-mapped cache → batches → augmentation, no model) against a
   decode-every-sample pipeline, the reference code's approach: per sample, read the raw media and
   recompute the features (spectrogram, decoded and resized frames) with the dataset's own recipes.
2. The training step alone (fixed batches already on the device), in samples per second.
3. Each method's step time against joint: every method trains a fresh copy of the same seeded
   model on the same batches, timed in interleaved rounds (drift in machine load hits all alike);
   the figure is the median over rounds of the mean step time inside a round.
4. Samples per second of the joint step for each encoder (`small`, `resnet18`).
5. On CUDA: FLOPs of one step (fwd + bwd, torch.utils.flop_counter) → achieved TFLOP/s, against
   the GPU's dense bf16 peak where it is known.

`gpu_check` is the prepared GPU measurement (resnet18 pair, 224×224, 3 frames, batch 64): samples/s
with and without the fast path.
"""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pdmp_cli.config import DataConfig, resolve_config
from pdmp_cli.engine import backend_flags, build_trainer, resolve_device, resolve_precision
from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import write_json
from pdmp_cli.methods import METHODS, Batch, Method, get_method
from pdmp_cli.models import MultimodalClassifier

# av-digits' cache shapes [T, C, H, W] per modality (the step benchmarks run on random tensors of them).
SHAPES = {"audio": (1, 1, 40, 63), "visual": (1, 1, 28, 28)}
# The GPU check: the lineage's setting (STFT spectrogram 257×188 as in OGM-GE; 3 RGB frames of 224×224).
GPU_SHAPES = {"audio": (1, 1, 257, 188), "visual": (3, 3, 224, 224)}
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets. A key matches when all
# its words are words of the device name (so L4 is not L40, A10 not A10G); the first match counts, so the
# more specific variants (NVL, PCIe) come before their family. A GPU not listed (A10G, whose data sheet figure
# was not at hand, consumer cards) gets no fraction of peak rather than a guessed one.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0))


def default_methods() -> list[str]:
    """Every registered multimodal method with a training step (UME has none), joint first (the reference of
    the ratios)."""
    names = [n for n in METHODS.names() if not get_method(n).unimodal and get_method(n).trains]
    return sorted(names, key=lambda n: n != "joint")


def method_params(name: str, given: dict[str, dict[str, Any]] | None = None,
                  modalities: list[str] = list(SHAPES)) -> dict[str, Any]:
    """What a method needs to run in the benchmark: a ranking by hand for ranking-based ones, plus --set."""
    params = {"ranking": list(modalities)} if get_method(name).needs_ranking else {}
    return params | (given or {}).get(name, {})


def make_batches(n: int, batch_size: int, device: torch.device, shapes: dict[str, tuple] = SHAPES,
                 num_classes: int = 10) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [Batch({m: torch.randn(batch_size, *s, generator=g).to(device) for m, s in shapes.items()},
                  torch.randint(0, num_classes, (batch_size,), generator=g).to(device), torch.arange(batch_size))
            for _ in range(n)]


def random_unimodal_model(encoder: str, width: int, device: torch.device, shapes: dict[str, tuple]):
    """Randomly initialised stand-ins for rank's unimodal models (UMT's teachers): timing needs no rank run."""
    def build(modality: str) -> MultimodalClassifier:
        model = MultimodalClassifier([modality], {modality: shapes[modality][1]}, 10, encoder, "concat", width)
        return model.to(device).eval().requires_grad_(False)
    return build


def make_trainer(method_name: str, encoder: str, fusion: str, device: torch.device, params: dict[str, Any] | None = None,
                 speed: dict[str, Any] | None = None, shapes: dict[str, tuple] = SHAPES) -> Method:
    method_cls = get_method(method_name)
    if not method_cls.trains:
        raise PdmpError(f"{method_name} trains nothing (it has no training step to time); leave it out of --methods")
    if method_cls.needs_unimodal_models:
        params = {"unimodal_sha256": {m: "random-init" for m in shapes}} | (params or {})
    cfg = resolve_config(dataset="av-digits", method=method_name, method_params=params or {},
                         model={"encoder": encoder, "fusion": fusion}, device=str(device), speed=speed or {})
    torch.manual_seed(0)
    model = MultimodalClassifier(list(shapes), {m: s[1] for m, s in shapes.items()}, 10, encoder, fusion,
                                 cfg.model.width).to(device)
    method = method_cls(cfg.method.params, cfg)
    build_trainer(cfg, model, method, None, device, random_unimodal_model(encoder, cfg.model.width, device, shapes))
    method.on_epoch_start(0)
    return method


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_steps(trainers: dict[str, Method], batches: list[Batch], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per step of each trainer, one figure per round; rounds alternate the order."""
    sync = synchronizer(batches[0].labels.device)
    for method in trainers.values():  # warm-up: allocator, kernels, thread pools, cudnn.benchmark's search
        for batch in batches[:warmup]:
            method.step(batch)
    names = list(trainers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            for batch in batches:
                trainers[n].step(batch)
            sync()
            times[n].append((time.perf_counter() - start) / len(batches))
    return times


def step_flops(method: Method, batch: Batch) -> int:
    """FLOPs of one training step (forward + backward) as torch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        method.step(batch)
    return counter.get_total_flops()


def bf16_peak_of(name: str) -> float | None:
    """The table's peak for a device name such as "NVIDIA H100 80GB HBM3" (whole words, case-insensitive)."""
    words = set(re.findall(r"[A-Z0-9]+", name.upper()))
    return next((peak for key, peak in BF16_PEAK_TFLOPS if set(key.upper().split()) <= words), None)


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no peak: not a CUDA device"
    name = torch.cuda.get_device_name(device)
    peak = bf16_peak_of(name)
    if peak is not None:
        return peak, name
    return None, f"{name}: bf16 peak unknown (table: {', '.join(k for k, _ in BF16_PEAK_TFLOPS)})"


# ---- 1. the data pipeline ----------------------------------------------------------------------------

def feature_recipes(cache: Any) -> dict[str, Any]:
    """The recipe objects that made the cache's features (the decode pipeline recomputes them per sample)."""
    if cache.manifest["dataset"] == "av-digits":
        from pdmp_cli.data.avdigits import AUDIO_RECIPE, VISUAL_RECIPE

        return {"audio": AUDIO_RECIPE, "visual": VISUAL_RECIPE}
    from pdmp_cli.data.recipes import make_feature

    return {m: make_feature(cache.manifest["recipe"]["modalities"][m]) for m in cache.modalities}


def source_manifest(cache: Any) -> Path:
    """The clip list the cache was prepared from; a relative path recorded from another working directory is
    found again below the dataset's folder (<root>/<dataset>/...)."""
    source = Path(cache.manifest["source"])
    parts = source.parts
    if not source.exists() and cache.manifest["dataset"] in parts:
        return cache.path.parents[1].joinpath(*parts[parts.index(cache.manifest["dataset"]) + 1:])
    return source


def pipeline_throughput(cache: Any, batch_size: int, device: torch.device, decode_samples: int, rounds: int = 3,
                        prefetch: int = 2) -> dict[str, Any]:
    """Samples/s of the cache pipeline (read + batch + crop/flip on the device) and of decoding every sample."""
    from pdmp_cli.config import AugmentConfig
    from pdmp_cli.data.cache import read_manifest_csv
    from pdmp_cli.data.pipeline import Augmenter, batches, frame_modalities

    train, modalities = cache.splits["train"], list(cache.modalities)
    sync = synchronizer(device)
    augment = Augmenter(AugmentConfig(crop=True, flip=True), frame_modalities(cache, modalities), device, seed=0)
    cached = []
    for r in range(rounds):
        order = np.random.default_rng(r).permutation(len(train))
        sync()
        start = time.perf_counter()
        for batch in batches(train, modalities, batch_size, device, order, prefetch):
            augment(batch)
        sync()
        cached.append(len(train) / (time.perf_counter() - start))

    # The reference approach: every sample decoded from its media files, every epoch, in this one process
    # (one core; the reference's DataLoader workers would multiply it by their count, at that many cores).
    recipes = feature_recipes(cache)
    rows = [r for r in read_manifest_csv(source_manifest(cache), modalities) if r["split"] == "train"]
    rows = rows[:decode_samples]

    def decode(chunk: list[dict[str, str]]) -> None:
        inputs = {m: torch.from_numpy(np.stack([recipes[m].load(r[f"{m}_path"]) for r in chunk])).to(device)
                  for m in modalities}
        augment(Batch(inputs, torch.zeros(len(chunk), dtype=torch.long, device=device), torch.arange(len(chunk))))

    decode(rows[:batch_size])  # untimed warm-up (imports, librosa's caches, first file reads), as the step timings
    decoded_rounds = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for first in range(0, len(rows), batch_size):
            decode(rows[first:first + batch_size])
        sync()
        decoded_rounds.append(len(rows) / (time.perf_counter() - start))
    best, decoded = statistics.median(cached), statistics.median(decoded_rounds)
    return {"cache_samples_per_s": best, "decode_samples_per_s": decoded, "cache_vs_decode": best / decoded,
            "decode_processes": 1,
            "augmented_modalities": augment.modalities, "samples_per_round": len(train), "decoded_samples": len(rows),
            "prefetch": prefetch, "dataset": cache.manifest["dataset"], "cache": str(cache.path)}


# ---- the whole benchmark -------------------------------------------------------------------------------

def run(methods: list[str] | None = None, encoder: str = "small", fusion: str = "concat", batch_size: int = 64,
        steps: int = 10, rounds: int = 7, device: str = "auto", json_path: Path | None = None,
        params: dict[str, dict[str, Any]] | None = None, encoders: list[str] | None = None,
        encoder_steps: int = 3, encoder_rounds: int = 3, speed: dict[str, Any] | None = None,
        data: DataConfig | None = None, decode_samples: int = 128, progress: Callable[[str], None] = lambda s: None,
        ) -> dict[str, Any]:
    """Everything `pdmp bench` reports; `data=None` leaves out the data-pipeline part."""
    dev = resolve_device(device)
    methods = methods or default_methods()
    encoders = ["small", "resnet18"] if encoders is None else encoders
    speed = speed or {}
    flags_cfg = resolve_config(dataset="av-digits", method="joint", device=str(dev), speed=speed)
    results: dict[str, Any] = {"setup": {
        "encoder": encoder, "fusion": fusion, "batch_size": batch_size, "steps_per_round": steps, "rounds": rounds,
        "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "precision": resolve_precision(flags_cfg, dev), "speed": flags_cfg.to_dict()["speed"]}}
    with backend_flags(flags_cfg, dev):
        if data is not None:
            from pdmp_cli.data import load_dataset

            progress("data pipeline")
            results["pipeline"] = pipeline_throughput(load_dataset(data, quiet=True), batch_size, dev, decode_samples)

        progress("methods")
        batches = make_batches(steps, batch_size, dev)
        trainers, errors = {}, {}
        for name in methods:
            try:
                trainers[name] = make_trainer(name, encoder, fusion, dev, method_params(name, params), speed)
            except PdmpError as exc:  # a method that needs what a synthetic batch lacks: reported, not fatal
                errors[name] = str(exc)
        times = time_steps(trainers, batches, rounds) if trainers else {}
        base = statistics.median(times[methods[0]]) if methods[0] in times else None
        results["methods"] = {m: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t),
                                  "max_ms": 1000 * max(t), "ratio_to_" + methods[0]: statistics.median(t) / base if base else None}
                              for m, t in times.items()}
        results["methods"] |= {m: {"error": e} for m, e in errors.items()}
        if base:
            step = results["step"] = {"method": methods[0], "samples_per_s": batch_size / base}
            if "pipeline" in results:
                step["pipeline_vs_step"] = results["pipeline"]["cache_samples_per_s"] / step["samples_per_s"]
                step["decode_vs_step"] = results["pipeline"]["decode_samples_per_s"] / step["samples_per_s"]

        progress("encoders")
        results["encoders"] = {}
        enc_batches = batches[:encoder_steps]
        for name in encoders:
            trainer = make_trainer("joint", name, fusion, dev, {}, speed)
            t = statistics.median(time_steps({name: trainer}, enc_batches, encoder_rounds, warmup=1)[name])
            entry = results["encoders"][name] = {"median_ms": 1000 * t, "samples_per_s": batch_size / t}
            if dev.type == "cuda":
                entry |= flops_entry(trainer, enc_batches[0], t, dev)
        small = results["encoders"].get("small")
        for entry in results["encoders"].values():
            if small:
                entry["ratio_to_small"] = entry["samples_per_s"] / small["samples_per_s"]
    if dev.type != "cuda":
        results["flops_note"] = "achieved TFLOP/s is reported with --device cuda only"
    if json_path:
        write_json(json_path, results)
    return results


def flops_entry(trainer: Method, batch: Batch, seconds: float, device: torch.device) -> dict[str, Any]:
    flops = step_flops(trainer, batch)
    peak, note = bf16_peak(device)
    achieved = flops / seconds / 1e12
    return {"gflop_per_step": flops / 1e9, "tflops": achieved, "bf16_peak_tflops": peak,
            "fraction_of_peak": achieved / peak if peak else None, "gpu": note}


def gpu_check(size: int = 224, frames: int = 3, batch_size: int = 64, steps: int = 20, rounds: int = 3,
              device: str = "cuda", json_path: Path | None = None, encoder: str = "resnet18") -> dict[str, Any]:
    """resnet18 pair (spectrogram + `frames` RGB frames of size×size): samples/s with and without the fast path.

    Fast: the defaults on CUDA (bf16 autocast or fp16 + scaler, channels-last, cudnn.benchmark); on CPU (smoke
    tests) bf16 autocast. Plain: fp32, contiguous NCHW, no cudnn.benchmark."""
    dev = resolve_device(device)
    shapes = {"audio": GPU_SHAPES["audio"] if size == 224 else (1, 1, size, size), "visual": (frames, 3, size, size)}
    settings = {"fast": {"precision": "auto" if dev.type == "cuda" else "bf16", "channels_last": dev.type == "cuda",
                         "cudnn_benchmark": dev.type == "cuda"},
                "plain": {"precision": "fp32", "channels_last": False, "cudnn_benchmark": False}}
    out: dict[str, Any] = {"setup": {"encoder": encoder, "shapes": {m: list(s) for m, s in shapes.items()},
                                     "batch_size": batch_size, "steps": steps, "rounds": rounds, "device": str(dev),
                                     "torch": torch.__version__,
                                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}}
    batches = make_batches(steps, batch_size, dev, shapes)
    for label, speed in settings.items():
        cfg = resolve_config(dataset="av-digits", method="joint", device=str(dev), speed=speed)
        with backend_flags(cfg, dev):
            trainer = make_trainer("joint", encoder, "concat", dev, {}, speed, shapes)
            t = statistics.median(time_steps({label: trainer}, batches, rounds, warmup=min(3, steps))[label])
            entry = out[label] = {"precision": resolve_precision(cfg, dev), **speed, "median_ms": 1000 * t,
                                  "samples_per_s": batch_size / t}
            entry |= flops_entry(trainer, batches[0], t, dev)
            if dev.type == "cuda":
                entry["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                torch.cuda.reset_peak_memory_stats(dev)
        del trainer
    out["speedup"] = out["fast"]["samples_per_s"] / out["plain"]["samples_per_s"]
    if json_path:
        write_json(json_path, out)
    return out
