"""Recipe functions against direct librosa / scipy computations on known signals, and frame/flow reading."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import soundfile as sf

from tests.media import write_video
from pdmp_cli.data.recipes import (FbankRecipe, FlowRecipe, FramesRecipe, SpectrogramRecipe, StftRecipe, kaldi_fbank,
                                   kaldi_mel_banks, load_audio, read_flow_frames)

RATE = 16000


def sine(freq: float, seconds: float, rate: int = RATE) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(1000, 1.3), RATE, subtype="FLOAT")
    return path


def test_ogmge_stft_matches_librosa(wav):
    import librosa

    recipe = StftRecipe(sample_rate=RATE, duration=3.0, n_fft=512, hop_length=353)
    features = recipe.load(wav)
    assert features.shape == recipe.shape == (1, 1, 257, 136)
    y, _ = librosa.load(wav, sr=RATE)
    y = np.tile(y, 3)[:3 * RATE]  # tiled to 3 s, as OGM-GE does
    direct = np.log(np.abs(librosa.stft(y, n_fft=512, hop_length=353)) + 1e-7)
    np.testing.assert_allclose(features[0, 0], direct, rtol=1e-5, atol=1e-4)
    assert np.argmax(features[0, 0].mean(axis=1)) == round(1000 / (RATE / 512))  # the tone's bin
    # the lineage's shapes
    assert StftRecipe().shape == (1, 1, 257, 188)
    assert StftRecipe(sample_rate=16000, duration=5.0, n_fft=256, hop_length=128).shape == (1, 1, 129, 626)


def test_pmr_spectrogram_matches_scipy_and_is_z_scored(wav):
    from scipy import signal

    recipe = SpectrogramRecipe(duration=2.0)
    features = recipe.load(wav)
    assert features.shape == recipe.shape == (1, 1, 257, 199)
    y = np.tile(sf.read(wav, dtype="float32")[0], 2)[:2 * RATE]
    log_s = np.log(signal.spectrogram(y, RATE, nperseg=512, noverlap=353)[2] + 1e-7)
    np.testing.assert_allclose(features[0, 0], (log_s - log_s.mean()) / log_s.std(), rtol=1e-4, atol=1e-4)
    assert SpectrogramRecipe().shape == (1, 1, 257, 1004)


def test_kaldi_fbank_power_spectrum_matches_librosa():
    import librosa

    y = sine(1000, 0.5)  # 25 periods per 400-sample frame: zero mean, so DC removal changes nothing
    banks = kaldi_mel_banks(128, 512, RATE, 20.0)
    fb = kaldi_fbank(y, RATE, 128, preemphasis=0.0)
    # librosa frames are 512 long with the 400-point window centred: shift the signal by the padding
    stft = librosa.stft(np.pad(y, (56, 0)), n_fft=512, hop_length=160, win_length=400, window=np.hanning(400),
                        center=False)
    frames = 1 + (len(y) - 400) // 160
    direct = np.log(np.maximum((np.abs(stft[:, :frames]) ** 2).T @ banks.T, np.finfo(np.float32).eps)).T
    assert fb.shape == (128, frames) == (128, 48)
    np.testing.assert_allclose(fb, direct, rtol=1e-4, atol=1e-3)


def test_kaldi_mel_banks_follow_the_htk_mel_scale():
    banks = kaldi_mel_banks(23, 512, RATE, 20.0)
    assert banks.shape == (23, 257) and banks[:, -1].sum() == 0
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    edges = np.linspace(mel(20), mel(8000), 25)
    freqs = RATE / 512 * np.arange(256)
    for b in range(23):  # each filter is zero outside its mel edges and peaks next to its centre
        inside = (mel(freqs) > edges[b]) & (mel(freqs) < edges[b + 2])
        assert np.all(banks[b, :256][~inside] == 0) and banks[b].max() <= 1
        assert abs(mel(freqs[np.argmax(banks[b, :256])]) - edges[b + 1]) <= mel(freqs[1:]).__sub__(mel(freqs[:-1])).max()


def test_fbank_recipe_shape_and_normalisation(wav):
    recipe = FbankRecipe(num_mel_bins=32, target_frames=100)
    features = recipe.load(wav)
    assert features.shape == recipe.shape == (1, 1, 32, 100)
    y = np.tile(sf.read(wav, dtype="float32")[0], 2)[:int(round(recipe.duration * RATE))]
    raw = kaldi_fbank(y, RATE, 32)[:, :100]
    np.testing.assert_allclose(features[0, 0], (raw - recipe.norm_mean) / (2 * recipe.norm_std), rtol=1e-5, atol=1e-5)
    assert FbankRecipe().shape == (1, 1, 128, 1024)


def test_audio_inside_containers_is_read_with_pyav(tmp_path):
    for suffix in (".mp4", ".flv"):
        path = write_video(tmp_path / f"clip{suffix}", label=1, seconds=1.0)
        y = load_audio(path, RATE, 1.0)
        spectrum = np.abs(np.fft.rfft(y))
        assert abs(np.argmax(spectrum) * RATE / len(y) - 500) < 5  # label 1 -> a 500 Hz tone


def test_bad_audio_reasons(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(RATE, np.float32), RATE)
    sf.write(tmp_path / "short.wav", sine(440, 0.05), RATE)
    with pytest.raises(ValueError, match="silent"):
        load_audio(tmp_path / "silent.wav", RATE, 1.0)
    with pytest.raises(ValueError, match="too short"):
        load_audio(tmp_path / "short.wav", RATE, 1.0, min_duration=0.2)
    segment = load_audio(tmp_path / "short.wav", RATE, 0.01, start=0.0, end=0.01)  # a segment of the file
    assert segment.shape == (160,)


def test_frames_at_one_fps_inside_a_segment(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 4, (32, 32))
    for i in range(24):  # 6 s at 4 fps; brightness = 10 * frame index
        writer.write(np.full((32, 32, 3), 10 * i, np.uint8))
    writer.release()
    recipe = FramesRecipe(num_frames=3, size=16, color=False, fps=1.0)
    means = recipe.load(path).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(means, [40, 120, 200], atol=4)  # 1 fps: frames 0,4,..,20; 3 of those 6: seconds 1, 3, 5
    means = recipe.load(path, start=2.0, end=5.0).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(means, [80, 120, 160], atol=4)  # seconds 2, 3, 4 only


def test_flow_from_video_sees_the_motion(tmp_path):
    path = tmp_path / "moving.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 8, (64, 64))
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (64, 200), dtype=np.uint8), (5, 5), 0)
    for i in range(8):  # the texture moves 2 px to the right per frame
        writer.write(cv2.cvtColor(np.ascontiguousarray(texture[:, 100 - 2 * i:164 - 2 * i]), cv2.COLOR_GRAY2BGR))
    writer.release()
    flow = FlowRecipe(num_frames=2, size=64, bound=20.0).load(path)
    assert flow.shape == (2, 2, 64, 64) and flow.dtype == np.uint8
    dx = (flow[:, 0, 8:-8, 8:-8].astype(float) * 40 / 255 - 20).mean()
    dy = (flow[:, 1, 8:-8, 8:-8].astype(float) * 40 / 255 - 20).mean()
    assert 1.5 < dx < 2.5 and abs(dy) < 0.5


def test_precomputed_flow_frames_in_temporal_order(tmp_path):
    for i in range(10):  # unpadded names: flow_x_10 after flow_x_9
        cv2.imwrite(str(tmp_path / f"flow_x_{i}.jpg"), np.full((20, 20), 20 * i, np.uint8))
        cv2.imwrite(str(tmp_path / f"flow_y_{i}.jpg"), np.full((20, 20), 200 - 20 * i, np.uint8))
    flow = read_flow_frames(tmp_path, 2, 8)
    np.testing.assert_allclose(flow[:, 0].mean(axis=(1, 2)), [40, 140], atol=2)  # frames 2 and 7
    np.testing.assert_allclose(flow[:, 1].mean(axis=(1, 2)), [160, 60], atol=2)
    assert FlowRecipe(num_frames=2, size=8).load(tmp_path).shape == (2, 2, 8, 8)
