"""Preprocessing recipes: raw media file -> one sample's array, shaped [T, C, H, W].

A recipe is a frozen dataclass; every field is hashed into the cache name, so changing any
parameter makes a new cache instead of silently reusing features computed another way.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class AudioRecipe:
    sample_rate: int = 16000
    duration: float = 1.0  # seconds; shorter clips are tiled, longer ones cut
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 40
    log_offset: float = 1e-6

    @property
    def shape(self) -> tuple[int, int, int, int]:
        frames = 1 + int(round(self.sample_rate * self.duration)) // self.hop_length  # librosa center=True
        return (1, 1, self.n_mels, frames)

    dtype = np.dtype(np.float32)

    def load(self, path: str | Path) -> np.ndarray:
        y = load_audio(path, self.sample_rate, self.duration)
        mel = log_mel(y, self.sample_rate, self.n_fft, self.hop_length, self.n_mels, self.log_offset)
        return mel[None, None].astype(np.float32)


@dataclass(frozen=True)
class VisualRecipe:
    num_frames: int = 1
    size: int = 28
    color: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, 3 if self.color else 1, self.size, self.size)

    dtype = np.dtype(np.uint8)

    def load(self, path: str | Path) -> np.ndarray:
        return read_frames(path, self.num_frames, self.size, self.color)


def load_audio(path: str | Path, sample_rate: int, duration: float) -> np.ndarray:
    """Mono float32 at `sample_rate`, tiled to at least `duration` and cut to exactly it."""
    import librosa

    with warnings.catch_warnings():  # librosa warns before its audioread fallback; the error is what matters
        warnings.simplefilter("ignore")
        y, _ = librosa.load(str(path), sr=sample_rate, mono=True)
    if y.size == 0:
        raise ValueError("no audio samples")
    target = int(round(sample_rate * duration))
    return np.tile(y, -(-target // y.size))[:target]


def log_mel(y: np.ndarray, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
            log_offset: float = 1e-6) -> np.ndarray:
    """log(mel power spectrogram + offset), shape [n_mels, frames]."""
    import librosa

    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
    return np.log(mel + log_offset)


def _natural_key(path: Path) -> list:
    # frame_2 before frame_10: lineage code sorted (or did not sort) names lexicographically
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _frame_indices(available: int, wanted: int) -> list[int]:
    """Centres of `wanted` equal segments: 1 of 3 -> the middle one, 3 of 3 -> all."""
    return [int((i + 0.5) * available / wanted) for i in range(wanted)]


def read_frames(path: str | Path, num_frames: int, size: int, color: bool = False) -> np.ndarray:
    """`num_frames` evenly spaced frames of a video file or a folder of images, uint8 [T, C, size, size].

    Videos are read sequentially (seeking is unreliable in flv and some mp4 files).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not files:
            raise ValueError(f"no image files in {path}")
        frames = []
        for i in _frame_indices(len(files), num_frames):
            image = cv2.imread(str(files[i]), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError(f"cannot decode image {files[i]}")
            frames.append(image)
    else:
        capture = cv2.VideoCapture(str(path))
        decoded = []
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                # keep only small copies: the frame count is unknown until the end
                decoded.append(cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
        finally:
            capture.release()
        if not decoded:
            raise ValueError(f"no decodable video frames in {path}")
        frames = [decoded[i] for i in _frame_indices(len(decoded), num_frames)]
        if not color:
            frames = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    out = []
    for frame in frames:
        if frame.shape[:2] != (size, size):
            frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).transpose(2, 0, 1) if color else frame[None])
    return np.stack(out).astype(np.uint8)
