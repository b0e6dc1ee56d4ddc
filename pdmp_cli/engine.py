"""The training loop, written once. Methods plug in through the hooks of methods/base.py.

`fit` trains, selects the checkpoint on the configured split (validation by default), evaluates
the test split once with the selected weights and returns the metrics; the run files it writes
(metrics.jsonl, best.pt) are named by layout.py.
"""
from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from pdmp_cli.config import RunConfig
from pdmp_cli.data import FeatureCache, Split
from pdmp_cli.diagnostics import ScoreRatio
from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import CHECKPOINT, METRICS, append_jsonl, atomic_write
from pdmp_cli.methods import Batch, Method, get_method
from pdmp_cli.models import MultimodalClassifier
from pdmp_cli.ui import Progress, progress_bar


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PdmpError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(name)
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


def batches(split: Split, modalities: list[str], batch_size: int, device: torch.device, order: np.ndarray | None = None):
    """Yield Batch objects read straight from the memory-mapped cache (no decoding)."""
    order = np.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = np.sort(order[start : start + batch_size])  # sorted: contiguous memmap reads
        yield Batch(
            inputs={m: torch.from_numpy(np.ascontiguousarray(split.inputs[m][idx])).to(device, non_blocking=True) for m in modalities},
            labels=torch.from_numpy(split.labels[idx].astype(np.int64)).to(device, non_blocking=True),
            index=torch.from_numpy(idx),
        )


def train_step(model: MultimodalClassifier, method: Method, optimizer: torch.optim.Optimizer, batch: Batch):
    features = method.transform_features(model.encode(batch.inputs))
    out = model.head(features)
    losses = method.loss(out, batch)
    optimizer.zero_grad(set_to_none=True)
    loss = method.backward(losses, model)
    method.after_backward(model, out, batch)
    method.before_step(optimizer)
    optimizer.step()
    method.after_step(optimizer)
    return loss, out


@torch.no_grad()
def evaluate(model: MultimodalClassifier, method: Method, split: Split, batch_size: int, device: torch.device, num_classes: int) -> dict[str, Any]:
    model.eval()
    preds, mod_preds, losses, score_ratio = [], {m: [] for m in model.modalities}, [], ScoreRatio()
    for batch in batches(split, model.modalities, batch_size, device):
        out = model(batch.inputs)
        logits = method.predict(out)
        losses.append(F.cross_entropy(logits, batch.labels, reduction="sum").item())
        preds.append(logits.argmax(1).cpu())
        for m, mlogits in out.modality_logits.items():
            mod_preds[m].append(mlogits.argmax(1).cpu())
        score_ratio.add(out.modality_logits, batch.labels)  # imbalance diagnostic, every method
    labels = torch.from_numpy(np.array(split.labels, dtype=np.int64))
    return classification_metrics(labels, torch.cat(preds), {m: torch.cat(p) for m, p in mod_preds.items()}, num_classes) | {
        "loss": sum(losses) / len(split), "score_ratio": score_ratio.ratios()
    }


def classification_metrics(labels: torch.Tensor, preds: torch.Tensor, modality_preds: dict[str, torch.Tensor], num_classes: int) -> dict[str, Any]:
    return {
        "accuracy": (preds == labels).float().mean().item(),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_classes)), zero_division=0)),
        "modality_accuracy": {m: (p == labels).float().mean().item() for m, p in modality_preds.items()},
    }


def fit(cfg: RunConfig, data: FeatureCache, run_dir: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Train `cfg` on `data`; returns selection and test metrics. Writes metrics and checkpoint to run_dir."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(cfg, data).to(device)
    method = get_method(cfg.method.name)(cfg.method.params, cfg)
    method.setup(model, data)
    method.modules.to(device)
    optimizer = build_optimizer(cfg, method.param_groups(model))
    scheduler = build_scheduler(cfg, optimizer)
    shuffle_rng = np.random.default_rng(cfg.seed)
    train, n_classes = data.splits["train"], data.num_classes
    steps = math.ceil(len(train) / cfg.optim.batch_size)

    def evaluate_on(split: str) -> dict[str, Any]:
        return evaluate(model, method, data.splits[split], cfg.eval_batch_size, device, n_classes)

    best: dict[str, Any] | None = None
    progress = progress or progress_bar(quiet=True)
    epoch_task = progress.add_task("epochs", total=cfg.optim.epochs)
    started = time.time()
    for epoch in range(cfg.optim.epochs):
        method.on_epoch_start(epoch)
        model.train()
        batch_task = progress.add_task(f"epoch {epoch + 1}", total=steps)
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for batch in batches(train, model.modalities, cfg.optim.batch_size, device, shuffle_rng.permutation(len(train))):
            if len(batch.labels) < 2:  # BatchNorm cannot train on a single sample
                continue
            loss, out = train_step(model, method, optimizer, batch)
            loss_sum += loss.detach() * len(batch.labels)
            correct += (out.logits.detach().argmax(1) == batch.labels).sum()
            seen += len(batch.labels)
            progress.advance(batch_task)
        progress.remove_task(batch_task)
        train_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(train_loss):
            raise PdmpError(f"the training loss became {train_loss} in epoch {epoch}; lower --lr or the method's coefficients")
        method.on_epoch_end(epoch)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": correct.item() / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "val": evaluate_on("val"),
            "method": method.log(),
        }
        if cfg.select_split == "test":  # the lineage protocol: selects on test, labelled as such
            record["test"] = evaluate_on("test")
        if scheduler:
            scheduler.step()
        score = record[cfg.select_split][cfg.select_metric]
        if best is None or score > best["score"]:
            best = {"score": score, "epoch": epoch, "record": record, "state": copy.deepcopy(model.state_dict()),
                    "method_state": copy.deepcopy(method.state_dict())}
            if run_dir is not None:
                save_checkpoint(run_dir / CHECKPOINT, cfg, best)
        record["best_so_far"] = best["epoch"] == epoch
        if run_dir is not None:
            append_jsonl(run_dir / METRICS, record)
        progress.update(epoch_task, advance=1, description=f"epochs (val acc {record['val']['accuracy']:.3f})")
    progress.remove_task(epoch_task)

    assert best is not None
    model.load_state_dict(best["state"])
    method.load_state_dict(best["method_state"])
    test = best["record"]["test"] if cfg.select_split == "test" else evaluate_on("test")
    return {
        "best_epoch": best["epoch"],
        "selection": {"split": cfg.select_split, "metric": cfg.select_metric, "value": best["score"]},
        "val": best["record"]["val"],
        "test": test,
        "train_seconds": time.time() - started,
        "device": str(device),
    }


def save_checkpoint(path: Path, cfg: RunConfig, best: dict[str, Any]) -> None:
    """Tensors and plain values only, so it loads with torch.load(weights_only=True)."""
    state = {"config": cfg.to_dict(), "epoch": best["epoch"], "model": best["state"], "method": best["method_state"],
             "selection": {"split": cfg.select_split, "metric": cfg.select_metric, "value": best["score"]}}
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
