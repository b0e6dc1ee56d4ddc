"""The training loop, written once. Methods plug in through the hooks of methods/base.py.

`fit` trains, selects the checkpoint on the configured split (validation by default), evaluates
the test split once with the selected weights and returns the metrics; the run files it writes
(metrics.jsonl, best.pt, state.pt) are named by layout.py.

Resume: after every epoch, fit saves the full training state to state.pt (model, optimizer,
scheduler, every RNG — torch, CUDA, numpy, python, the data-order generator —, the metrics so far,
the best-so-far weights and the method's state). That file is the epoch's commit point: best.pt and
metrics.jsonl are rewritten from it afterwards, and again when a run resumes, so a run killed at
any moment continues from its last finished epoch and ends with exactly the numbers of a run that
was never interrupted (on CPU; on CUDA with --deterministic).

Several processes (torchrun, `pdmp train --nproc N`; distributed.py): every process draws the same
permutation and trains on its share of each global batch; gradients are reduced explicitly after
backward (Trainer.sync_gradients: share-weighted sums in flattened buckets), not by
DistributedDataParallel, because methods call model.encode and model.head separately, run several
backward passes per step (per-loss autograd.grad, alternating per-modality updates) and rewrite
gradients before the step, which DDP's reducer (hooks once per backward of its own forward) handles
poorly. The cost: communication starts after backward instead of overlapping with it. BatchNorm uses
the global batch's statistics (cfg.sync_bn), evaluation is sharded with gathered predictions, and
rank 0 alone writes files, so N processes reproduce one process's run to float rounding.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import pickle
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from pdmp_cli import distributed
from pdmp_cli.config import RunConfig
from pdmp_cli.data import FeatureCache, Split
from pdmp_cli.data.pipeline import Augmenter, batches, frame_modalities, global_rows
from pdmp_cli.diagnostics import ScoreRatio
from pdmp_cli.errors import PdmpError, TrainingDiverged
from pdmp_cli.faults import kill_point
from pdmp_cli.layout import CHECKPOINT, METRICS, STATE, file_sha256, write_bytes, write_jsonl
from pdmp_cli.methods import Method, Trainer, get_method
from pdmp_cli.models import MultimodalClassifier
from pdmp_cli.ui import Progress, progress_bar


def resolve_device(name: str) -> torch.device:
    """The device of this process (with several processes, a bare `cuda` is the local rank's GPU)."""
    if name == "auto":
        return distributed.device_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PdmpError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        return distributed.device_for(torch.device(name))
    except RuntimeError:
        raise PdmpError(f"invalid --device {name!r}; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_modalities(cfg: RunConfig, data: FeatureCache) -> list[str]:
    return list(cfg.modalities) if cfg.modalities else list(data.modalities)


def build_model(cfg: RunConfig, data: FeatureCache) -> MultimodalClassifier:
    modalities = run_modalities(cfg, data)
    train = data.splits["train"]
    return MultimodalClassifier(
        modalities,
        in_channels={m: train.inputs[m].shape[2] for m in modalities},
        num_classes=data.num_classes,
        encoder=cfg.model.encoder,
        fusion=cfg.model.fusion,
        width=cfg.model.width,
        norm_stats={m: data.norm_stats(m) for m in modalities},
    )


def build_optimizer(cfg: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer):
    o = cfg.optim
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_epoch, gamma=o.step_gamma)
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=o.epochs)
    return None


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    """--precision auto: bf16 on CUDA (fp16 where the GPU has no native bf16: emulated bf16 is slower), fp32 on CPU."""
    precision = cfg.speed.precision
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return precision


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_trainer(cfg: RunConfig, model: MultimodalClassifier, method: Method, data: FeatureCache | None,
                  device: torch.device, unimodal_models: Callable[[str], torch.nn.Module] | None = None) -> Trainer:
    """Bind `method` to a trainer for `model` (setup may add trainable modules), then build the optimizer.

    The fast path is set here: autocast dtype, a gradient scaler under fp16, channels-last weights
    and (optionally) compiled encoders; cudnn.benchmark is set by `backend_flags` around the run.
    Rank's unimodal models come from the checkpoints named in the config unless `unimodal_models` is given."""
    sources, hashes = cfg.method.params.get("unimodal_source"), cfg.method.params.get("unimodal_sha256")
    if unimodal_models is None and sources:
        def unimodal_models(modality: str) -> torch.nn.Module:
            return load_unimodal_model(Path(sources[modality]), data, device, (hashes or {}).get(modality))
    precision = resolve_precision(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if cfg.speed.channels_last if cfg.speed.channels_last is not None else device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # 4-D conv weights; cuDNN then runs NHWC kernels
    if cfg.speed.compile:
        for encoder in model.encoders.values():
            encoder.compile()  # in place: state_dict keys (checkpoints) unchanged
    trainer = Trainer(model, data, cfg, device, scaler=scaler, unimodal_models=unimodal_models)
    trainer.amp_dtype = AMP_DTYPES[precision]
    method.bind(trainer)
    if trainer.world_size > 1 and cfg.sync_bn:  # after setup, which may add modules; before the optimizer
        for module in (model, method.modules):
            distributed.sync_batchnorm(module, device.type == "cuda")
    trainer.optimizer = build_optimizer(cfg, method.param_groups())
    return trainer


def load_unimodal_model(path: Path, data: FeatureCache, device: torch.device, sha256: str | None = None
                        ) -> MultimodalClassifier:
    """A unimodal model `pdmp rank` trained, rebuilt from its checkpoint's own config: frozen, eval mode.
    With `sha256`, the file must still be the one the run was configured with."""
    if sha256 is not None and path.exists() and file_sha256(path) != sha256:
        raise PdmpError(f"{path} changed since this run was configured (another `pdmp rank`?); re-run the command "
                        f"with --force to train it on the new unimodal model")
    state = load_checkpoint(path)
    cfg = RunConfig.from_dict(state["config"])
    with torch.random.fork_rng(devices=[]):  # its (overwritten) initial weights must not move the run's RNG
        model = build_model(cfg, data)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise PdmpError(f"{path} does not match the model its config describes; re-run `pdmp rank --force`") from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def evaluate(model: MultimodalClassifier, method: Method, split: Split, batch_size: int, device: torch.device, num_classes: int,
             autocast: Any = contextlib.nullcontext, prefetch: int = 0) -> dict[str, Any]:
    """Metrics of the whole split. With several processes each evaluates a contiguous part; the predictions
    are gathered and the sums reduced, so every process gets the same metrics (and selects the same epoch)."""
    model.eval()
    preds, mod_preds, losses, score_ratio = [], {m: [] for m in model.modalities}, [], ScoreRatio()
    for batch in batches(split, model.modalities, batch_size, device, distributed.shard_range(len(split)), prefetch):
        with autocast():
            out = model(batch.inputs)
            logits = method.predict(out).float()
        losses.append(F.cross_entropy(logits, batch.labels, reduction="sum").item())
        preds.append(logits.argmax(1))
        modality_logits = method.modality_logits(out)
        for m, mlogits in modality_logits.items():
            mod_preds[m].append(mlogits.argmax(1))
        score_ratio.add(modality_logits, batch.labels)  # imbalance diagnostic, every method
    if distributed.world().size > 1:
        sums = distributed.all_reduce(torch.tensor([sum(losses)] + [score_ratio.scores.get(m, 0.0) for m in model.modalities],
                                                   dtype=torch.float64, device=device)).tolist()
        losses, score_ratio.scores = sums[:1], dict(zip(model.modalities, sums[1:]))

    def gathered(parts: list[torch.Tensor]) -> torch.Tensor:
        return distributed.gather_rows(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)).cpu()

    labels = torch.from_numpy(np.array(split.labels, dtype=np.int64))
    return classification_metrics(labels, gathered(preds), {m: gathered(p) for m, p in mod_preds.items()}, num_classes) | {
        "loss": sum(losses) / len(split), "score_ratio": score_ratio.ratios()
    }


def classification_metrics(labels: torch.Tensor, preds: torch.Tensor, modality_preds: dict[str, torch.Tensor], num_classes: int) -> dict[str, Any]:
    return {
        "accuracy": (preds == labels).float().mean().item(),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_classes)), zero_division=0)),
        "modality_accuracy": {m: (p == labels).float().mean().item() for m, p in modality_preds.items()},
    }


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device):
    """--deterministic: torch's deterministic algorithms (and cuDNN/cuBLAS settings) for the run."""
    if not enabled:
        yield
        return
    if device.type == "cuda":  # cuBLAS needs a fixed workspace to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        cudnn.deterministic, cudnn.benchmark = before[1], before[2]


@contextlib.contextmanager
def backend_flags(cfg: RunConfig, device: torch.device):
    """--deterministic, or cudnn.benchmark (default on CUDA: picks the fastest kernels for the run's shapes)."""
    benchmark = cfg.speed.cudnn_benchmark if cfg.speed.cudnn_benchmark is not None else device.type == "cuda"
    with deterministic_algorithms(cfg.deterministic, device):
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark and not cfg.deterministic
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C (or a SIGTERM the CLI turned into one) inside the block takes effect at its end, so that an
    epoch being saved is saved whole. Signals left to the OS's default action are not touched."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(signum)):  # a Python-level handler: one that raises KeyboardInterrupt
            previous[signum] = signal.signal(signum, lambda sig, frame: received.append(sig))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        previous[received[0]](received[0], None)


def rng_state(data_order: np.random.Generator, cuda: bool, augment: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state training draws from, as tensors and plain values (weights_only loads it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
            "data_order": data_order.bit_generator.state,
            # the augmentation stream (only when augmenting); a generator's state fits only its device type
            "augment": {"device": augment.device.type, "state": augment.get_state()} if augment is not None else None}


def set_rng_state(state: dict[str, Any], data_order: np.random.Generator, augment: torch.Generator | None = None) -> None:
    saved = state.get("augment")  # absent or None: no augmentation (or a state.pt from before it existed)
    if augment is not None and saved is not None:
        saved = saved if isinstance(saved, dict) else {"device": None, "state": saved}  # older: the bare state
        if saved["device"] not in (None, augment.device.type):
            raise PdmpError(f"this run started on {saved['device']} and its augmentation stream cannot continue on "
                            f"{augment.device.type}; resume it with --device {saved['device']}, or pass --force to start over")
        try:
            augment.set_state(saved["state"])
        except RuntimeError:
            raise PdmpError(f"the saved augmentation stream does not fit a {augment.device.type} generator (the run "
                            f"started on another device); resume it there, or pass --force to start over") from None
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    data_order.bit_generator.state = state["data_order"]


def fit(cfg: RunConfig, data: FeatureCache, run_dir: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Train `cfg` on `data`; returns selection and test metrics. Writes metrics and checkpoints to run_dir.

    When run_dir holds a state.pt of this config, training continues after its epoch.
    """
    device = resolve_device(cfg.device)
    with backend_flags(cfg, device):
        return _fit(cfg, data, device, run_dir, progress or progress_bar(quiet=True))


def _fit(cfg: RunConfig, data: FeatureCache, device: torch.device, run_dir: Path | None, progress: Progress) -> dict[str, Any]:
    world = distributed.world()
    distributed.check_batch_size(cfg.optim.batch_size, world.size)
    writes = run_dir is not None and distributed.is_main()  # the other processes only read state.pt
    seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    method = get_method(cfg.method.name)(cfg.method.params, cfg)
    trainer = build_trainer(cfg, model, method, data, device)
    optimizer = trainer.optimizer
    scheduler = build_scheduler(cfg, optimizer)
    shuffle_rng = np.random.default_rng(cfg.seed)  # the same on every process: they share one permutation
    augment = Augmenter(cfg.augment, frame_modalities(data, model.modalities), device, cfg.seed)
    train, n_classes = data.splits["train"], data.num_classes
    steps = math.ceil(len(train) / cfg.optim.batch_size)

    def evaluate_on(split: str) -> dict[str, Any]:
        return evaluate(model, method, data.splits[split], cfg.eval_batch_size, device, n_classes, trainer.autocast,
                        cfg.speed.prefetch)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start_epoch, seconds_before = 0, 0.0
    saved = load_state(run_dir / STATE, cfg) if run_dir is not None and (run_dir / STATE).exists() else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        method.load_state_dict(saved["method"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], shuffle_rng, augment.stream)
        if trainer.scaler is not None and saved.get("scaler"):
            trainer.scaler.load_state_dict(saved["scaler"])
        history, best, seconds_before = saved["history"], saved["best"], saved["seconds"]
        start_epoch = saved["epoch"] + 1
        if writes:
            write_epoch_files(run_dir, cfg, history, best, best_changed=True)  # they may lag behind state.pt
    distributed.broadcast_state(model)  # identical already (same seed or state.pt); made certain, as DDP does
    distributed.broadcast_state(method.modules)

    epochs = cfg.optim.epochs if method.trains else 1  # nothing to train: evaluate once, as epoch 0
    epoch_task = progress.add_task("epochs", total=epochs, completed=start_epoch)
    started = time.time()
    for epoch in range(start_epoch, epochs):
        method.on_epoch_start(epoch)
        model.train()
        batch_task = progress.add_task(f"epoch {epoch + 1}", total=steps if method.trains else 0)
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        # This process's share of every global batch (all of it on one process); chunks of batch_size / N.
        permutation = shuffle_rng.permutation(len(train))
        order, global_sizes = distributed.shard_batches(permutation, cfg.optim.batch_size)
        shares = batches(train, model.modalities, cfg.optim.batch_size // world.size, device, order, cfg.speed.prefetch)
        for step, batch in enumerate(shares if method.trains else ()):
            if global_sizes[step] < 2:  # BatchNorm cannot train on a single sample
                continue
            trainer.batch_share = len(batch.labels) / global_sizes[step]
            global_batch = permutation[step * cfg.optim.batch_size : (step + 1) * cfg.optim.batch_size]
            trainer.global_rows = global_rows(global_batch, batch.index)  # per-sample draws: Trainer.rand, augment
            loss, out = method.step(augment(batch, trainer.global_rows))
            loss_sum += loss.detach() * len(batch.labels)
            correct += (out.logits.detach().argmax(1) == batch.labels).sum()
            seen += len(batch.labels)
            progress.advance(batch_task)
            kill_point("batch")
        progress.remove_task(batch_task)
        totals = distributed.all_reduce(torch.stack([loss_sum.double(), correct.double(),
                                                     torch.tensor(float(seen), dtype=torch.float64, device=device)]))
        loss_total, correct_total, seen = totals.tolist()
        train_loss = loss_total / seen if seen else None  # None: no training step (nothing to train)
        if train_loss is not None and not math.isfinite(train_loss):
            raise TrainingDiverged(f"the training loss became {train_loss} in epoch {epoch}; lower --lr or the "
                                   f"method's coefficients", epoch)
        method.on_epoch_end(epoch)
        if world.size > 1 and not cfg.sync_bn:  # per-process BatchNorm statistics: evaluate with rank 0's, as DDP
            distributed.broadcast_state(model, buffers_only=True)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": correct_total / seen if seen else None,
            "lr": optimizer.param_groups[0]["lr"],
            "val": evaluate_on("val"),
            "method": method.log(),
        }
        if cfg.select_split == "test":  # the lineage protocol: selects on test, labelled as such
            record["test"] = evaluate_on("test")
        if scheduler and seen:  # no step, no schedule (a method with nothing to train)
            scheduler.step()
        score = record[cfg.select_split][cfg.select_metric]
        improved = best is None or score > best["score"]
        if improved:
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict()),
                    "method_state": copy.deepcopy(method.state_dict())}
        record["best_so_far"] = improved
        history.append(record)
        if writes:
            with interrupts_deferred():
                save_state(run_dir / STATE, cfg, epoch, model, method, optimizer, scheduler, shuffle_rng, history,
                           best, seconds_before + time.time() - started, augment.stream, trainer.scaler)
                kill_point("epoch")
                write_epoch_files(run_dir, cfg, history, best, best_changed=improved)
        progress.update(epoch_task, advance=1, description=f"epochs (val acc {record['val']['accuracy']:.3f})")
    progress.remove_task(epoch_task)

    assert best is not None
    model.load_state_dict(best["state"])
    method.load_state_dict(best["method_state"])
    best_record = history[best["epoch"]]
    test = best_record["test"] if cfg.select_split == "test" else evaluate_on("test")
    return {
        "best_epoch": best["epoch"],
        "selection": {"split": cfg.select_split, "metric": cfg.select_metric, "value": best["score"]},
        "val": best_record["val"],
        "test": test,
        "train_seconds": seconds_before + time.time() - started,
        "resumed_after_epoch": start_epoch - 1 if saved is not None else None,
        "device": str(device),
        "world_size": world.size,
        "precision": resolve_precision(cfg, device),
    }


def write_epoch_files(run_dir: Path, cfg: RunConfig, history: list[dict[str, Any]], best: dict[str, Any] | None,
                      best_changed: bool) -> None:
    """best.pt and metrics.jsonl: derived from the training state, so they can always be rewritten from it."""
    if best is not None and best_changed:
        save_checkpoint(run_dir / CHECKPOINT, cfg, best)
    write_jsonl(run_dir / METRICS, history)


def torch_bytes(obj: Any) -> bytes:
    """torch.save into memory, so that the file itself is written by layout's atomic writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_state(path: Path, cfg: RunConfig, epoch: int, model: torch.nn.Module, method: Method,
               optimizer: torch.optim.Optimizer, scheduler: Any, data_order: np.random.Generator,
               history: list[dict[str, Any]], best: dict[str, Any], seconds: float,
               augment: torch.Generator | None = None, scaler: Any = None) -> None:
    """Everything needed to continue after `epoch` exactly as if the run had never stopped."""
    state = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "epoch": epoch, "model": model.state_dict(),
             "method": method.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": rng_state(data_order, cuda=next(model.parameters()).is_cuda, augment=augment),
             "history": history, "best": best, "seconds": seconds,
             "scaler": scaler.state_dict() if scaler is not None else None}  # fp16: the loss scale reached
    write_bytes(path, torch_bytes(state))


STATE_FIELDS = ("config_hash", "epoch", "model", "method", "optimizer", "scheduler", "rng", "history", "best", "seconds")


def load_state(path: Path, cfg: RunConfig) -> dict[str, Any]:
    state = load_checkpoint(path, STATE_FIELDS)
    if state["config_hash"] != cfg.hash():
        raise PdmpError(f"{path} is the state of another config ({state['config_hash']}, not {cfg.hash()}); "
                        f"pass --force to start the run over")
    return state


def save_checkpoint(path: Path, cfg: RunConfig, best: dict[str, Any]) -> None:
    """Tensors and plain values only, so it loads with torch.load(weights_only=True)."""
    state = {"config": cfg.to_dict(), "epoch": best["epoch"], "model": best["state"], "method": best["method_state"],
             "selection": {"split": cfg.select_split, "metric": cfg.select_metric, "value": best["score"]}}
    write_bytes(path, torch_bytes(state))


def load_checkpoint(path: Path, required: tuple[str, ...] = ("config", "epoch", "model")) -> dict[str, Any]:
    """A checkpoint written by pdmp, loaded with weights_only=True: pickled Python objects are refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PdmpError(f"{path} does not exist") from None
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise PdmpError(f"{path} contains pickled Python objects, which pdmp refuses to load (unpickling can run "
                            f"code); use a checkpoint written by pdmp") from None
        raise PdmpError(f"{path} is not a readable checkpoint ({str(exc).splitlines()[0][:80]}); delete it and "
                        f"re-run") from None
    except Exception as exc:  # torch raises many types on a truncated or foreign file; all mean "unreadable"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise PdmpError(f"{path} is not a readable checkpoint ({first}); delete it and re-run") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise PdmpError(f"{path} is not a pdmp checkpoint (field {missing[0]!r} is missing); delete it and re-run")
    return state
