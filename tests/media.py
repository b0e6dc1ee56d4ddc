"""Generated media for the adapter tests: real files in each dataset's raw layout, tiny and fast.

A clip of class k carries a tone of 300 + 200 k Hz and frames of brightness 40 + 50 k, so the tiny
datasets are learnable; `corrupt` writes bytes no decoder accepts, under the right name.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

AUDIO_RATE = 16000


def tone(label: int, seconds: float = 1.0, rate: int = AUDIO_RATE, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.02, t.size)
    return (0.4 * np.sin(2 * np.pi * (300 + 200 * label) * t) + noise).astype(np.float32)


def frame_images(label: int, n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = 40 + 50 * label
    return [np.clip(base + rng.normal(0, 8, (size, size, 3)) + 3 * i, 0, 255).astype(np.uint8) for i in range(n)]


def write_wav(path: Path, y: np.ndarray, rate: int = AUDIO_RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, rate, subtype="PCM_16")
    return path


def write_video(path: Path, label: int, seconds: float = 2.0, fps: int = 8, audio: bool = True, seed: int = 0,
                size: int = 32) -> Path:
    """A video (mp4: mpeg4 + aac, flv: flv + aac, avi: mpeg4 [+ pcm]) written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    codecs = {".mp4": ("mpeg4", "aac"), ".flv": ("flv", "aac"), ".avi": ("mpeg4", "pcm_s16le")}[path.suffix]
    with av.open(str(path), "w") as container:
        video = container.add_stream(codecs[0], rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        stream = container.add_stream(codecs[1], rate=AUDIO_RATE) if audio else None
        for image in frame_images(label, int(seconds * fps), size, seed):
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if stream is not None:
            y = tone(label, seconds, seed=seed)
            if codecs[1] == "pcm_s16le":
                frame = av.AudioFrame.from_ndarray((y * 32767).astype(np.int16)[None], format="s16", layout="mono")
            else:
                frame = av.AudioFrame.from_ndarray(y[None], format="flt", layout="mono")
            frame.sample_rate = AUDIO_RATE
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    return path


def write_image(path: Path, label: int, seed: int = 0, gray: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = frame_images(label, 1, 32, seed)[0]
    cv2.imwrite(str(path), image[..., 0] if gray else image)
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x01 this is not a media file " * 8)
    return path
