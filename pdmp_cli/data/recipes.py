"""Preprocessing recipes: raw media file -> one sample's array, shaped [T, C, H, W].

A recipe is a frozen dataclass; every field is hashed into the cache name, so changing any
parameter makes a new cache instead of silently reusing features computed another way.
`FEATURES` maps each feature kind (the `kind` of a recipe's modality) to its class; each class
has a `version`, bumped whenever its code changes its output, and hashed with its fields.

Every `load(path, start=None, end=None)` reads only the [start, end) seconds of the file when
given (AVE's event segments), and raises ValueError with a short reason for a file that must be
skipped: undecodable, truncated, silent, too short.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# librosa cannot read these without an ffmpeg binary: their audio is decoded with PyAV.
CONTAINER_SUFFIXES = {".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov", ".m4a", ".3gp"}
SILENCE_PEAK = 1e-4  # a peak below this (full scale 1.0) is a silent file: recorded and skipped


@dataclass(frozen=True)
class AudioRecipe:
    """log-mel power spectrogram (librosa, centred frames); the av-digits recipe."""

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

    def load(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        y = load_audio(path, self.sample_rate, self.duration, start, end, getattr(self, "min_duration", 0.0))
        mel = log_mel(y, self.sample_rate, self.n_fft, self.hop_length, self.n_mels, self.log_offset)
        return mel[None, None].astype(np.float32)


@dataclass(frozen=True)
class VisualRecipe:
    """`num_frames` evenly spaced frames, resized to size×size, uint8; the av-digits recipe."""

    num_frames: int = 1
    size: int = 28
    color: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, 3 if self.color else 1, self.size, self.size)

    dtype = np.dtype(np.uint8)

    def load(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        return read_frames(path, self.num_frames, self.size, self.color, getattr(self, "fps", 0.0), start, end)


# ---- the named feature kinds of real datasets -------------------------------------------------------

@dataclass(frozen=True)
class LogMelRecipe(AudioRecipe):
    """log-mel (librosa) with a minimum clip length: shorter files are skipped as too short."""

    min_duration: float = 0.2
    version = 1


@dataclass(frozen=True)
class StftRecipe:
    """OGM-GE's spectrogram: log(|STFT| + offset), librosa.stft(center=True, hann window).

    CREMA-D: 22,050 Hz, 3 s, n_fft 512, hop 353 -> 257×188; VGGSound: 16 kHz, 5 s, 256/128 -> 129×626.
    """

    sample_rate: int = 22050
    duration: float = 3.0
    n_fft: int = 512
    hop_length: int = 353
    log_offset: float = 1e-7
    min_duration: float = 0.2
    version = 1
    dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 1, self.n_fft // 2 + 1, 1 + int(round(self.sample_rate * self.duration)) // self.hop_length)

    def load(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        y = load_audio(path, self.sample_rate, self.duration, start, end, self.min_duration)
        return log_stft(y, self.n_fft, self.hop_length, self.log_offset)[None, None].astype(np.float32)


@dataclass(frozen=True)
class SpectrogramRecipe:
    """PMR / ARL on AVE: scipy.signal.spectrogram(nperseg, noverlap), log(S + offset), z-score per clip.

    16 kHz, event segment tiled to 10 s, 512/353 -> 257×1004.
    """

    sample_rate: int = 16000
    duration: float = 10.0
    nperseg: int = 512
    noverlap: int = 353
    log_offset: float = 1e-7
    zscore: bool = True
    min_duration: float = 0.2
    version = 1
    dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n = int(round(self.sample_rate * self.duration))
        return (1, 1, self.nperseg // 2 + 1, (n - self.nperseg) // (self.nperseg - self.noverlap) + 1)

    def load(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        y = load_audio(path, self.sample_rate, self.duration, start, end, self.min_duration)
        s = log_spectrogram(y, self.sample_rate, self.nperseg, self.noverlap, self.log_offset)
        if self.zscore:
            s = (s - s.mean()) / (s.std() + 1e-9)
        return s[None, None].astype(np.float32)


@dataclass(frozen=True)
class FbankRecipe:
    """Kaldi-style log-mel filterbank (the AST / OGM-GE Kinetics-Sounds recipe), in numpy.

    Frames of `frame_length_ms` every `frame_shift_ms` (snip edges), per-frame DC removal,
    pre-emphasis 0.97, Hanning window, power spectrum on the next power of two, `num_mel_bins`
    triangular filters on the HTK mel scale from `low_freq` Hz, log(max(x, eps)); the audio is
    tiled so that `target_frames` frames exist, then normalised as (fbank - norm_mean) / (2 norm_std)
    (AST's constants for AudioSet by default; set norm_std 0.5 and norm_mean 0 to keep raw values).
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    target_frames: int = 1024
    low_freq: float = 20.0
    preemphasis: float = 0.97
    norm_mean: float = -4.2677393
    norm_std: float = 4.5689974
    min_duration: float = 0.2
    version = 1
    dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 1, self.num_mel_bins, self.target_frames)

    @property
    def duration(self) -> float:
        length = int(self.sample_rate * self.frame_length_ms / 1000)
        shift = int(self.sample_rate * self.frame_shift_ms / 1000)
        return (length + (self.target_frames - 1) * shift) / self.sample_rate

    def load(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        y = load_audio(path, self.sample_rate, self.duration, start, end, self.min_duration)
        fb = kaldi_fbank(y, self.sample_rate, self.num_mel_bins, self.frame_length_ms, self.frame_shift_ms,
                         self.low_freq, self.preemphasis)[:, :self.target_frames]
        return ((fb - self.norm_mean) / (2 * self.norm_std))[None, None].astype(np.float32)


@dataclass(frozen=True)
class FramesRecipe(VisualRecipe):
    """Frames of a video (or an image folder, or one image), in temporal order.

    fps > 0 first keeps one frame per 1/fps seconds (the lineage extracts frames at 1 fps), inside
    the clip's [start, end) when it has one; then `num_frames` evenly spaced ones are taken.
    """

    size: int = 224
    color: bool = True
    fps: float = 1.0
    version = 1


@dataclass(frozen=True)
class FlowRecipe:
    """Dense optical flow, 2 channels (x, y), uint8 [T, 2, size, size].

    From a video: OpenCV Farnebäck flow between consecutive frames (at the recipe's frame size) at
    `num_frames` evenly spaced positions. From a folder of precomputed flow frames (denseflow/TSN
    layout: `flow_x_00001.jpg` + `flow_y_00001.jpg`, `x_00001.jpg` + `y_00001.jpg`, or `x/` + `y/`,
    `u/` + `v/` subfolders): the images at those positions. Values are clipped to ±bound pixels and
    mapped linearly to 0..255 (128 = no motion), the convention of precomputed flow frames.
    """

    num_frames: int = 3
    size: int = 224
    bound: float = 20.0
    version = 1
    dtype = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, 2, self.size, self.size)

    def load(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        path = Path(path)
        if path.is_dir():
            return read_flow_frames(path, self.num_frames, self.size)
        return video_flow(path, self.num_frames, self.size, self.bound)


FEATURES: dict[str, type] = {"logmel": LogMelRecipe, "stft": StftRecipe, "spectrogram": SpectrogramRecipe,
                             "fbank": FbankRecipe, "frames": FramesRecipe, "flow": FlowRecipe}


def feature_fields(kind: str) -> dict[str, Any]:
    """The parameters of a feature kind with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(feature_class(kind))}


def feature_class(kind: str) -> type:
    from pdmp_cli.errors import PdmpError

    if kind not in FEATURES:
        raise PdmpError(f"unknown feature kind {kind!r}; choose one of {', '.join(FEATURES)}")
    return FEATURES[kind]


def make_feature(spec: dict[str, Any]):
    """{"kind": "stft", "version": 1, **params} (as stored in a recipe) -> the recipe object."""
    params = {k: v for k, v in spec.items() if k not in ("kind", "version")}
    return feature_class(spec["kind"])(**params)


# ---- audio -----------------------------------------------------------------------------------------

def decode_container_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Mono float32 audio of a video container (mp4, flv, ...) with PyAV, resampled to `sample_rate`."""
    import av

    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(container.streams.audio[0]):
            chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
        chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def load_audio(path: str | Path, sample_rate: int, duration: float, start: float | None = None,
               end: float | None = None, min_duration: float = 0.0) -> np.ndarray:
    """Mono float32 at `sample_rate` ([start, end) s when given), tiled to at least `duration`, cut to it.

    Raises ValueError for no samples, a silent file, or one shorter than `min_duration` seconds.
    """
    if Path(path).suffix.lower() in CONTAINER_SUFFIXES:
        y = decode_container_audio(path, sample_rate)
    else:
        import librosa

        with warnings.catch_warnings():  # librosa warns before its audioread fallback; the error is what matters
            warnings.simplefilter("ignore")
            y, _ = librosa.load(str(path), sr=sample_rate, mono=True)
    if start is not None or end is not None:
        y = y[int(round((start or 0.0) * sample_rate)):None if end is None else int(round(end * sample_rate))]
    if y.size == 0:
        raise ValueError("no audio samples")
    if y.size < min_duration * sample_rate:
        raise ValueError(f"too short: {y.size / sample_rate:.3f} s of audio, the recipe needs >= {min_duration} s")
    if np.abs(y).max() < SILENCE_PEAK:
        raise ValueError("silent audio (peak below 1e-4)")
    target = int(round(sample_rate * duration))
    return np.tile(y, -(-target // y.size))[:target]


def log_mel(y: np.ndarray, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
            log_offset: float = 1e-6) -> np.ndarray:
    """log(mel power spectrogram + offset), shape [n_mels, frames]."""
    import librosa

    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
    return np.log(mel + log_offset)


def log_stft(y: np.ndarray, n_fft: int, hop_length: int, log_offset: float = 1e-7) -> np.ndarray:
    """log(|STFT| + offset), shape [n_fft/2 + 1, frames] (OGM-GE's CREMA-D and VGGSound audio)."""
    import librosa

    return np.log(np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop_length)) + log_offset)


def log_spectrogram(y: np.ndarray, sample_rate: int, nperseg: int, noverlap: int,
                    log_offset: float = 1e-7) -> np.ndarray:
    """log(scipy.signal.spectrogram + offset), shape [nperseg/2 + 1, frames] (PMR's AVE audio)."""
    from scipy import signal

    _, _, spectrogram = signal.spectrogram(y, sample_rate, nperseg=nperseg, noverlap=noverlap)
    return np.log(spectrogram + log_offset)


def _hz_to_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: int, low_freq: float, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular filters, linear on the HTK mel scale, shape [num_bins, n_fft/2 + 1] (last bin 0)."""
    high = sample_rate / 2 + high_freq if high_freq <= 0 else high_freq
    mel_low, mel_high = _hz_to_mel(low_freq), _hz_to_mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * np.arange(num_bins)[:, None]
    centre, right = left + delta, left + 2 * delta
    mel = _hz_to_mel(sample_rate / n_fft * np.arange(n_fft // 2))[None, :]
    up, down = (mel - left) / (centre - left), (right - mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))  # Kaldi leaves the Nyquist bin out


def kaldi_fbank(y: np.ndarray, sample_rate: int, num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, low_freq: float = 20.0, preemphasis: float = 0.97) -> np.ndarray:
    """Kaldi `compute-fbank-feats` (dither 0, hanning window, no energy), shape [num_mel_bins, frames]."""
    length = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if y.size < length:
        raise ValueError(f"too short for one {frame_length_ms} ms frame")
    n_frames = 1 + (y.size - length) // shift
    frames = np.lib.stride_tricks.sliding_window_view(y.astype(np.float64), length)[::shift][:n_frames].copy()
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= preemphasis * frames[:, :-1].copy()
    frames[:, 0] -= preemphasis * frames[:, 0]
    frames *= np.hanning(length)  # Kaldi's "hanning": 0.5 - 0.5 cos(2 pi n / (N - 1))
    n_fft = 1 << (length - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=n_fft)) ** 2
    mel = power @ kaldi_mel_banks(num_mel_bins, n_fft, sample_rate, low_freq).T
    return np.log(np.maximum(mel, np.finfo(np.float32).eps)).T


# ---- frames ----------------------------------------------------------------------------------------

def _natural_key(path: Path) -> list:
    # frame_2 before frame_10: lineage code sorted (or did not sort) names lexicographically
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _frame_indices(available: int, wanted: int) -> list[int]:
    """Centres of `wanted` equal segments: 1 of 3 -> the middle one, 3 of 3 -> all."""
    return [int((i + 0.5) * available / wanted) for i in range(wanted)]


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)


def decode_video(path: Path, size: int, fps: float = 0.0, start: float | None = None,
                 end: float | None = None) -> list[np.ndarray]:
    """Frames of a video, read sequentially (seeking is unreliable in flv and some mp4), resized to size×size.

    With fps > 0, one frame per 1/fps seconds is kept; with start/end, only frames in [start, end).
    """
    capture = cv2.VideoCapture(str(path))
    native = capture.get(cv2.CAP_PROP_FPS) or 0.0
    if (fps > 0 or start is not None or end is not None) and not native > 0:
        capture.release()
        raise ValueError("the video reports no frame rate; cannot place frames in time")
    decoded, last_slot, index = [], None, -1
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            index += 1
            t = index / native if native > 0 else 0.0
            if (start is not None and t < start) or (end is not None and t >= end):
                continue
            if fps > 0:
                slot = int(np.floor(t * fps + 1e-9))
                if slot == last_slot:
                    continue
                last_slot = slot
            # keep only small copies: the frame count is unknown until the end
            decoded.append(cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
    finally:
        capture.release()
    if not decoded:
        raise ValueError("no decodable video frames" + (" in the clip's segment" if start or end else ""))
    return decoded


def read_frames(path: str | Path, num_frames: int, size: int, color: bool = False, fps: float = 0.0,
                start: float | None = None, end: float | None = None) -> np.ndarray:
    """`num_frames` evenly spaced frames of a video file, a folder of images or one image: uint8 [T, C, size, size]."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        files = _image_files(path) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"no image files in {path}")
        frames = []
        for i in _frame_indices(len(files), num_frames):
            image = cv2.imread(str(files[i]), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError(f"cannot decode image {files[i]}")
            frames.append(image)
    else:
        decoded = decode_video(path, size, fps, start, end)
        frames = [decoded[i] for i in _frame_indices(len(decoded), num_frames)]
        if not color:
            frames = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    out = []
    for frame in frames:
        if frame.shape[:2] != (size, size):
            frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).transpose(2, 0, 1) if color else frame[None])
    return np.stack(out).astype(np.uint8)


def quantize_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """[H, W, 2] flow in pixels -> uint8 [2, H, W], ±bound mapped to 0..255."""
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2 * bound))
    return np.round(scaled).astype(np.uint8).transpose(2, 0, 1)


def video_flow(path: Path, num_frames: int, size: int, bound: float) -> np.ndarray:
    """Farnebäck flow between frames i and i+1 at `num_frames` evenly spaced i, uint8 [T, 2, size, size]."""
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in decode_video(path, size)]
    if len(gray) < 2:
        raise ValueError("too short: optical flow needs at least 2 frames")
    out = []
    for i in _frame_indices(len(gray) - 1, num_frames):
        flow = cv2.calcOpticalFlowFarneback(gray[i], gray[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        out.append(quantize_flow(flow, bound))
    return np.stack(out)


def _flow_pairs(folder: Path) -> tuple[list[Path], list[Path]]:
    for a, b in (("x", "y"), ("u", "v"), ("flow_x", "flow_y")):
        if (folder / a).is_dir() and (folder / b).is_dir():
            return _image_files(folder / a), _image_files(folder / b)
    files = _image_files(folder)
    for a, b in (("flow_x", "flow_y"), ("x_", "y_"), ("u_", "v_")):
        xs, ys = [f for f in files if f.name.startswith(a)], [f for f in files if f.name.startswith(b)]
        if xs:
            return xs, ys
    raise ValueError("no flow frames (expected flow_x_*/flow_y_*, x_*/y_*, or x/ y/ or u/ v/ folders)")


def read_flow_frames(folder: Path, num_frames: int, size: int) -> np.ndarray:
    """Precomputed flow images (x and y as 8-bit grey), uint8 [T, 2, size, size]."""
    xs, ys = _flow_pairs(folder)
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"{len(xs)} x and {len(ys)} y flow frames; they must pair up")
    out = []
    for i in _frame_indices(len(xs), num_frames):
        pair = []
        for file in (xs[i], ys[i]):
            image = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError(f"cannot decode flow image {file}")
            pair.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
        out.append(np.stack(pair))
    return np.stack(out).astype(np.uint8)
