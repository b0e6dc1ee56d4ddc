"""Data layer: recipe hashing, deterministic av-digits generation, the feature cache, decoding."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from pdmp_cli.config import DataConfig
from pdmp_cli.data import avdigits, cache, get_dataset, load_dataset, recipe_hash_for
from pdmp_cli.data.recipes import AudioRecipe, VisualRecipe, log_mel, read_frames
from pdmp_cli.errors import PdmpError

SAMPLES = 100


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def built(root):
    cfg = DataConfig(samples=SAMPLES, root=str(root))
    return cfg, load_dataset(cfg, quiet=True)


def raw_rows(root: Path, cfg: DataConfig) -> tuple[Path, list[dict]]:
    from pdmp_cli.config import stable_hash

    raw = root / "av-digits" / "raw" / stable_hash(avdigits.generation_params(cfg))
    with open(raw / "manifest.csv", newline="") as f:
        return raw, list(csv.DictReader(f))


def test_spec_is_registered():
    spec = get_dataset("av-digits")
    assert spec.modalities == ("audio", "visual")
    assert spec.default_preset == "audio-dominant"
    assert set(spec.presets) == {"audio-dominant", "balanced", "visual-dominant"}


def test_recipe_hash_changes_with_every_parameter(monkeypatch):
    cfg = DataConfig(samples=SAMPLES)
    base = recipe_hash_for(cfg)
    assert recipe_hash_for(DataConfig(samples=SAMPLES)) == base
    assert recipe_hash_for(DataConfig(samples=SAMPLES, preset="audio-dominant")) == base
    assert recipe_hash_for(DataConfig(samples=SAMPLES, root="elsewhere")) == base  # where, not what
    assert recipe_hash_for(DataConfig(samples=SAMPLES + 1)) != base
    assert recipe_hash_for(DataConfig(samples=SAMPLES, preset="visual-dominant")) != base
    changes = [
        ("AUDIO_RECIPE", dataclasses.replace(avdigits.AUDIO_RECIPE, n_mels=64)),
        ("AUDIO_RECIPE", dataclasses.replace(avdigits.AUDIO_RECIPE, hop_length=128)),
        ("VISUAL_RECIPE", dataclasses.replace(avdigits.VISUAL_RECIPE, num_frames=3)),
        ("VISUAL_RECIPE", dataclasses.replace(avdigits.VISUAL_RECIPE, size=32)),
        ("RECIPE_VERSION", avdigits.RECIPE_VERSION + 1),
        ("GENERATION_DEFAULTS", {**avdigits.GENERATION_DEFAULTS, "seed": 1}),
        ("GENERATION_DEFAULTS", {**avdigits.GENERATION_DEFAULTS, "jitter_px": 1}),
        ("PRESETS", {**avdigits.PRESETS, "audio-dominant": {**avdigits.PRESETS["audio-dominant"], "snr_db": -9.0}}),
    ]
    for name, value in changes:
        with monkeypatch.context() as m:
            m.setattr(avdigits, name, value)
            assert recipe_hash_for(cfg) != base, name
    assert recipe_hash_for(cfg) == base


def test_unknown_preset_is_a_user_error():
    with pytest.raises(PdmpError, match="audio-dominant"):
        recipe_hash_for(DataConfig(preset="loud"))


def test_generation_is_deterministic(tmp_path):
    params = avdigits.generation_params(DataConfig(samples=30))
    for name in ("a", "b"):  # separate speech caches: espeak-ng itself must be deterministic too
        avdigits.generate(params, tmp_path / name / "raw", tmp_path / name / "speech", quiet=True)
    files = sorted(p.relative_to(tmp_path / "a" / "raw") for p in (tmp_path / "a" / "raw").rglob("*") if p.is_file())
    assert len(files) == 30 * (1 + params["frames"]) + 2
    for rel in files:
        assert (tmp_path / "a" / "raw" / rel).read_bytes() == (tmp_path / "b" / "raw" / rel).read_bytes(), rel
    audio, rate = sf.read(tmp_path / "a" / "raw" / "audio" / "00000.wav")
    assert rate == 22050 and len(audio) == 22050


def test_cache_shapes_dtypes_and_labels(built, root):
    cfg, fc = built
    assert fc.modalities == ["audio", "visual"]
    assert fc.classes == [str(d) for d in range(10)] and fc.num_classes == 10
    assert fc.path == root / "av-digits" / "cache" / fc.recipe_hash
    assert fc.recipe_hash == recipe_hash_for(cfg)
    _, rows = raw_rows(root, cfg)
    label_of = {r["id"]: int(r["label"]) for r in rows}
    expected = {"train": 60, "val": 20, "test": 20}
    for name, split in fc.splits.items():
        n = expected[name]
        assert len(split) == n and len(split.ids) == n
        assert split.inputs["audio"].shape == (n, 1, 1, 40, 63) and split.inputs["audio"].dtype == np.float32
        assert split.inputs["visual"].shape == (n, 1, 1, 28, 28) and split.inputs["visual"].dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert not split.inputs["audio"].flags.writeable
        assert np.isfinite(split.inputs["audio"]).all()
        assert [label_of[i] for i in split.ids] == split.labels.tolist()
        assert np.bincount(split.labels, minlength=10).tolist() == [n // 10] * 10  # balanced
    m = fc.manifest
    assert m["counts"] == expected and m["skipped"] == [] and m["preset"] == "audio-dominant"
    assert m["modalities"]["visual"] == {"shape": [1, 1, 28, 28], "dtype": "uint8"}
    train_visual = np.asarray(fc.splits["train"].inputs["visual"], dtype=np.float64)
    assert fc.norm_stats("visual") == pytest.approx((train_visual.mean(), train_visual.std()))
    assert json.loads((fc.path / "manifest.json").read_text())["recipe"]["generation"]["samples"] == SAMPLES


def test_splits_have_disjoint_voices_and_images(built, root):
    cfg, _ = built
    _, rows = raw_rows(root, cfg)
    for row in rows:
        row["timbre"] = row["voice"].split("+")[1]  # the speaker; accents are shared across splits
    for key in ("voice", "timbre", "image_index"):
        groups = {s: {r[key] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"], key


def test_cache_is_reused_and_a_new_recipe_makes_a_new_cache(built, root, monkeypatch):
    cfg, fc = built
    stamp = (fc.path / "manifest.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt an existing cache")

    monkeypatch.setattr(avdigits, "prepare_cache", fail)
    monkeypatch.setattr(avdigits, "generate", fail)
    again = load_dataset(cfg, quiet=True)
    assert again.path == fc.path and (fc.path / "manifest.json").stat().st_mtime_ns == stamp

    monkeypatch.setattr(avdigits, "prepare_cache", cache.prepare_cache)  # generate stays forbidden: raw is reused
    monkeypatch.setattr(avdigits, "VISUAL_RECIPE", VisualRecipe(num_frames=3, size=28))
    new = load_dataset(cfg, quiet=True)
    assert new.path != fc.path and new.path.parent == fc.path.parent
    assert new.splits["train"].inputs["visual"].shape == (60, 3, 1, 28, 28)
    assert not list(fc.path.parent.glob(".tmp-*"))


def test_log_mel_matches_librosa(tmp_path):
    import librosa

    recipe = AudioRecipe()
    t = np.arange(int(0.3 * 22050)) / 22050  # shorter than the recipe's 1 s: must be tiled
    sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "sine.wav", sine, 22050, subtype="FLOAT")
    features = recipe.load(tmp_path / "sine.wav")
    assert features.shape == recipe.shape == (1, 1, 40, 63) and features.dtype == np.float32

    y, _ = librosa.load(tmp_path / "sine.wav", sr=16000)
    y = np.tile(y, 4)[:16000]
    direct = np.log(librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=256, n_mels=40) + 1e-6)
    np.testing.assert_allclose(features[0, 0], direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_mel(y, 16000, 512, 256, 40), direct, rtol=1e-6)
    # Independent of librosa's feature code: the loudest mel band is the one centred nearest 440 Hz.
    centres = librosa.mel_frequencies(n_mels=40 + 2, fmin=0.0, fmax=8000.0)[1:-1]
    assert np.argmax(features[0, 0].mean(axis=1)) == np.argmin(np.abs(centres - 440.0))
    # Tiled, not zero-padded: every frame of the 1 s window carries the tone, none is silence (log 1e-6).
    assert features[0, 0].max(axis=0).min() > np.log(1e-6) + 5


BRIGHTNESS = [20 * i + 10 for i in range(12)]


def test_read_frames_from_image_folder_in_temporal_order(tmp_path):
    for i, value in enumerate(BRIGHTNESS):  # unpadded names: frame_10 must come after frame_9
        cv2.imwrite(str(tmp_path / f"frame_{i}.png"), np.full((40, 50), value, np.uint8))
    frames = read_frames(tmp_path, 12, 28)
    assert frames.shape == (12, 1, 28, 28) and frames.dtype == np.uint8
    assert frames.mean(axis=(1, 2, 3)).tolist() == BRIGHTNESS
    assert read_frames(tmp_path, 3, 28).mean(axis=(1, 2, 3)).tolist() == [BRIGHTNESS[i] for i in (2, 6, 10)]
    assert read_frames(tmp_path, 1, 16, color=True).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "mp4v"), (".avi", "MJPG")])
def test_read_frames_from_video_in_temporal_order(tmp_path, suffix, codec):
    path = tmp_path / f"clip{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 10, (64, 48))
    if not writer.isOpened():
        pytest.skip(f"OpenCV cannot write {codec}")
    for value in BRIGHTNESS:
        writer.write(np.full((48, 64, 3), value, np.uint8))
    writer.release()
    means = read_frames(path, 12, 28).mean(axis=(1, 2, 3))
    assert np.all(np.diff(means) > 10)  # lossy codecs shift values a little, never the order
    np.testing.assert_allclose(means, BRIGHTNESS, atol=6)
    assert read_frames(path, 3, 28, color=True).shape == (3, 3, 28, 28)


def small_manifest(built, root, tmp_path) -> Path:
    """A CSV of a few generated samples with absolute paths, as a user's own dataset would be."""
    cfg, _ = built
    raw, rows = raw_rows(root, cfg)
    picked = [r for r in rows if r["split"] == "train"][:4] + [r for r in rows if r["split"] != "train"][:2]
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "label", "split", "audio_path", "visual_path"])
        writer.writeheader()
        for r in picked:
            writer.writerow({"id": r["id"], "label": r["label"], "split": r["split"],
                             "audio_path": str(raw / r["audio_path"]), "visual_path": str(raw / r["visual_path"])})
    return path


RECIPES = {"audio": AudioRecipe(), "visual": VisualRecipe()}


def test_corrupt_file_is_recorded_and_skipped(built, root, tmp_path):
    path = small_manifest(built, root, tmp_path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00not a wav file at all")
    rows[1]["audio_path"] = str(corrupt)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fc = cache.prepare_cache(tmp_path / "cache", path, RECIPES, {"test": "corrupt"}, dataset="custom",
                             classes=[str(d) for d in range(10)], quiet=True)
    skipped = fc.manifest["skipped"]
    assert len(skipped) == 1 and skipped[0]["id"] == rows[1]["id"] and skipped[0]["path"] == str(corrupt)
    assert skipped[0]["reason"]
    train = fc.splits["train"]
    assert len(train) == 3 and rows[1]["id"] not in train.ids
    assert train.inputs["audio"].shape == (3, 1, 1, 40, 63) and train.inputs["visual"].shape[0] == 3
    assert fc.manifest["counts"]["train"] == 3


def test_missing_file_names_the_file(built, root, tmp_path):
    path = small_manifest(built, root, tmp_path)
    text = path.read_text()
    first_wav = text.splitlines()[1].split(",")[3]
    path.write_text(text.replace(first_wav, first_wav + ".gone"))
    with pytest.raises(PdmpError, match=r"\.wav\.gone"):
        cache.prepare_cache(tmp_path / "cache", path, RECIPES, {"test": "missing"}, dataset="custom", quiet=True)


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(avdigits.shutil, "which", lambda name: None)
    with pytest.raises(PdmpError, match="apt-get install espeak-ng"):
        avdigits.espeak_version()
