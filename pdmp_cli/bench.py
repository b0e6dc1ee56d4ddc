"""`make bench`: time per training step of each method on the same model and batches.

Each method trains a fresh copy of the same seeded model on the same fixed batches. Methods are
timed in interleaved rounds (so drift in machine load hits them alike); the figure per method is the
median over rounds of the mean step time inside a round, reported with its ratio to joint.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pdmp_cli.config import resolve_config
from pdmp_cli.engine import build_trainer, resolve_device
from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import write_json
from pdmp_cli.methods import Batch, get_method
from pdmp_cli.models import MultimodalClassifier

# av-digits' cache shapes [T, C, H, W] per modality.
SHAPES = {"audio": (1, 1, 40, 63), "visual": (1, 1, 28, 28)}
METHOD_PARAMS = {"pdmp": {"ranking": ["audio", "visual"]}}
# Methods built on rank's unimodal models get randomly initialised ones: timing needs no rank run.
RANDOM_UNIMODAL = {"unimodal_sha256": {m: "random-init" for m in SHAPES}}


def make_batches(n: int, batch_size: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [Batch({m: torch.randn(batch_size, *s, generator=g).to(device) for m, s in SHAPES.items()},
                  torch.randint(0, 10, (batch_size,), generator=g).to(device), torch.arange(batch_size))
            for _ in range(n)]


def random_unimodal_model(encoder: str, width: int, device: torch.device):
    def build(modality: str) -> MultimodalClassifier:
        model = MultimodalClassifier([modality], {modality: SHAPES[modality][1]}, 10, encoder, "concat", width)
        return model.to(device).eval().requires_grad_(False)
    return build


def make_trainer(method_name: str, encoder: str, fusion: str, device: torch.device):
    method_cls = get_method(method_name)
    if not method_cls.trains:
        raise PdmpError(f"{method_name} trains nothing (it has no training step to time); leave it out of --methods")
    params = METHOD_PARAMS.get(method_name, RANDOM_UNIMODAL if method_cls.needs_unimodal_models else {})
    cfg = resolve_config(dataset="av-digits", method=method_name, method_params=params,
                         model={"encoder": encoder, "fusion": fusion}, device=str(device))
    torch.manual_seed(0)
    model = MultimodalClassifier(list(SHAPES), {m: s[1] for m, s in SHAPES.items()}, 10, encoder, fusion,
                                 cfg.model.width).to(device)
    method = method_cls(cfg.method.params, cfg)
    build_trainer(cfg, model, method, None, device, random_unimodal_model(encoder, cfg.model.width, device))
    method.on_epoch_start(0)
    return method


def run(methods: list[str], encoder: str = "small", fusion: str = "concat", batch_size: int = 64, steps: int = 20,
        rounds: int = 15, device: str = "auto", json_path: Path | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = make_batches(steps, batch_size, dev)
    trainers = {m: make_trainer(m, encoder, fusion, dev) for m in methods}
    for method in trainers.values():  # warm-up: allocator, kernels, thread pools
        for batch in batches[:5]:
            method.step(batch)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods if r % 2 == 0 else methods[::-1]
        for m in order:
            method = trainers[m]
            sync()
            start = time.perf_counter()
            for batch in batches:
                method.step(batch)
            sync()
            times[m].append((time.perf_counter() - start) / steps)
    base = statistics.median(times[methods[0]])
    results = {
        "setup": {"encoder": encoder, "fusion": fusion, "batch_size": batch_size, "steps_per_round": steps,
                  "rounds": rounds, "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "methods": {m: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t), "max_ms": 1000 * max(t),
                        "ratio_to_" + methods[0]: statistics.median(t) / base} for m, t in times.items()},
    }
    if json_path:
        write_json(json_path, results)
    return results
