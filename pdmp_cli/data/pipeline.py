"""The training data pipeline: memory-mapped cache → batched tensors → device → batched augmentation.

Nothing is decoded while training: a batch is one fancy-indexed read of each modality's memory map
(sorted indices, so reads are contiguous runs), wrapped as tensors. On CUDA the tensors are pinned
and copied with non_blocking=True: the host does not wait for the copy, but it is queued on the compute
stream, so it runs after the kernels queued before it and does not overlap them on the GPU (a separate
copy stream would). A single background
thread reads `prefetch` batches ahead: a batch read is a memory copy from the page cache, many
times faster than a training step (`pdmp bench` measures both), so one reader keeps up and more
threads would only compete with torch's own threads for the cores.

Augmentation (random resized crop, horizontal flip) runs on the whole batch at once, on the device
where training runs, from its own seeded generator (saved with the run's RNG state for resume).
Only frame modalities are augmented; spectrograms and optical flow never are (a flipped spectrogram
is another sound; flipped flow would need its x channel negated). Normalisation stays in the model.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pdmp_cli.data.base import FeatureCache, Split

AUGMENT_SEED_OFFSET = 0x5EED  # the augmentation stream differs from the model-init and data-order streams


def batch_indices(n: int, batch_size: int, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Index arrays of consecutive batches of `order` (default 0..n-1), each sorted for contiguous reads."""
    order = np.arange(n) if order is None else order
    for start in range(0, len(order), batch_size):
        yield np.sort(order[start : start + batch_size])


def read_batch(split: Split, modalities: list[str], idx: np.ndarray, pin: bool = False) -> dict[str, Any]:
    """One batch as CPU tensors, straight from the memory maps (pinned for an asynchronous copy to CUDA)."""
    inputs = {m: torch.from_numpy(np.ascontiguousarray(split.inputs[m][idx])) for m in modalities}
    labels = torch.from_numpy(split.labels[idx].astype(np.int64))
    if pin:
        inputs = {m: x.pin_memory() for m, x in inputs.items()}
        labels = labels.pin_memory()
    return {"inputs": inputs, "labels": labels, "index": torch.from_numpy(idx)}


def batches(split: Split, modalities: list[str], batch_size: int, device: torch.device,
            order: np.ndarray | None = None, prefetch: int = 0) -> Iterator[Any]:
    """Yield Batch objects on `device`, `prefetch` of them read ahead by a background thread."""
    from pdmp_cli.methods.base import Batch  # methods import data; import here to keep data free of them

    pin = device.type == "cuda"
    reads = (read_batch(split, modalities, idx, pin) for idx in batch_indices(len(split), batch_size, order))
    for b in prefetched(reads, prefetch):
        yield Batch(inputs={m: x.to(device, non_blocking=True) for m, x in b["inputs"].items()},
                    labels=b["labels"].to(device, non_blocking=True), index=b["index"])


def prefetched(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """`items`, produced by a background thread up to `depth` ahead (in order; errors re-raised here)."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            put(exc)

    worker = threading.Thread(target=produce, name="pdmp-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped (finished, broke off or raised): release the producer
        stop.set()
        worker.join()


def global_rows(global_batch: np.ndarray | None, index: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(size of the global batch, this process's rows of it) for a share whose split positions are `index`.

    Per-sample random numbers (augmentation, OPM's dropping) are drawn for the whole global batch, in the
    order one process reads it (sorted, as batch_indices), and each process keeps its samples' rows: every
    process draws the same numbers, so N processes draw what one does. Rows are None when the share is the
    whole batch (one process): the draws are then used as they come, exactly as before this existed."""
    if global_batch is None or len(global_batch) == len(index):
        return len(index), None
    ordered = np.sort(global_batch)
    return len(global_batch), torch.from_numpy(np.searchsorted(ordered, index.numpy()))


def frame_modalities(data: FeatureCache, modalities: list[str]) -> list[str]:
    """The modalities stored as frames (images), the only ones augmentation touches."""
    recipe = data.manifest.get("recipe")
    specs = recipe.get("modalities", {}) if isinstance(recipe, dict) else {}
    kinds = {m: (specs[m].get("kind") if isinstance(specs.get(m), dict) else None) for m in modalities}
    # av-digits' recipe has no kinds: its `visual` modality is frames, `audio` a log-mel spectrogram
    return [m for m in modalities if kinds[m] == "frames" or (kinds[m] is None and m == "visual")]


class Augmenter:
    """Random resized crop and horizontal flip of [B, T, C, H, W] batches, one set of parameters per
    sample (shared by its T frames), as one affine_grid + grid_sample call on the batch's device."""

    def __init__(self, cfg: Any, modalities: list[str], device: torch.device, seed: int) -> None:
        self.cfg, self.modalities = cfg, list(modalities)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed + AUGMENT_SEED_OFFSET)

    @property
    def active(self) -> bool:
        return bool(self.cfg.active and self.modalities)

    @property
    def stream(self) -> torch.Generator | None:
        """The generator state.pt saves and restores: None when not augmenting (nothing is drawn from it)."""
        return self.generator if self.active else None

    def __call__(self, batch: Any, share: tuple[int, torch.Tensor | None] | None = None) -> Any:
        """Augment `batch`. With several processes, `share` is `global_rows` of the step (the global batch's
        size and this share's rows of it): parameters are drawn for the whole global batch (every process draws
        the same numbers) and each sample gets its row, so N processes augment exactly as one would."""
        if not self.active:
            return batch
        n, rows = share if share is not None else (len(batch.labels), None)
        inputs = dict(batch.inputs)
        for m in self.modalities:
            inputs[m] = self.apply(inputs[m], n, rows)
        return type(batch)(inputs=inputs, labels=batch.labels, index=batch.index)

    def params(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample crop (width, height as fractions of the image; centre in [-1, 1] coordinates) and flip."""
        u = torch.rand(n, 5, generator=self.generator, device=device)
        if self.cfg.crop:
            lo, hi = self.cfg.crop_scale
            area = lo + (hi - lo) * u[:, 0]
            log_lo, log_hi = math.log(self.cfg.crop_ratio[0]), math.log(self.cfg.crop_ratio[1])
            ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
            width = torch.sqrt(area * ratio).clamp(max=1.0)  # clamped: the crop never leaves the image
            height = torch.sqrt(area / ratio).clamp(max=1.0)
        else:
            width = height = torch.ones(n, device=device)
        centre_x = (1 - width) * (2 * u[:, 2] - 1)
        centre_y = (1 - height) * (2 * u[:, 3] - 1)
        flip = (u[:, 4] < 0.5) if self.cfg.flip else torch.zeros(n, dtype=torch.bool, device=device)
        return {"width": width, "height": height, "centre_x": centre_x, "centre_y": centre_y, "flip": flip}

    def apply(self, x: torch.Tensor, n: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        b, t = x.shape[:2]
        p = self.params(n or b, x.device)
        if rows is not None:
            p = {k: v[rows.to(x.device)] for k, v in p.items()}
        if not self.cfg.crop:  # flip alone: an exact reindexing, no resampling
            return torch.where(p["flip"].view(b, 1, 1, 1, 1), x.flip(-1), x)
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = p["width"] * (1 - 2 * p["flip"].float())  # a negative x scale mirrors the crop
        theta[:, 0, 2] = p["centre_x"]
        theta[:, 1, 1] = p["height"]
        theta[:, 1, 2] = p["centre_y"]
        frames = x.flatten(0, 1).float()
        grid = F.affine_grid(theta.repeat_interleave(t, 0), list(frames.shape), align_corners=False)
        out = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.view(x.shape)
