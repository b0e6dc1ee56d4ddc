"""Every real-dataset adapter on a tiny dataset in its real raw layout, generated as media files.

Each test builds the layout (with bad files), runs `pdmp prepare`, checks shapes, labels, splits,
the skipped-file report and the recipe hash, then trains through rank and train (compare for the
2- and 3-modality non-audio datasets ucf101 and cefa). Sizes are CPU-tiny through --recipe options.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from media import corrupt, tone, write_image, write_video, write_wav
from pdmp_cli.cli import app
from pdmp_cli.config import DataConfig, stable_hash
from pdmp_cli.data import get_dataset, recipe_hash_for
from pdmp_cli.data.cache import open_cache

TRAIN = ["--epochs", "1", "--width", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]
SMALL_STFT = ["audio.sample_rate=8000", "audio.duration=0.5", "audio.n_fft=64", "audio.hop_length=32"]


def recipe_args(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--recipe", item)]


# ---- raw layouts -----------------------------------------------------------------------------------
# Each builder returns (recipe options, expected {split: number of usable clips}, expected skipped paths).

def build_kinetics_sounds(raw: Path):
    classes = ["playing drums", "dog barking", "singing"]
    per_split = {"train": 3, "val": 1, "test": 1}
    for k, name in enumerate(classes):
        for split, n in per_split.items():
            for i in range(n):
                write_video(raw / split / name / f"yt{k}{split[:2]}{i}_{i:06d}_{i + 10:06d}.mp4", k, seed=i)
    bad = corrupt(raw / "train" / "singing" / "broken_000000_000010.mp4")
    recipe = ["audio.sample_rate=8000", "audio.num_mel_bins=16", "audio.target_frames=32", "visual.size=16"]
    return recipe, {"train": 9, "val": 3, "test": 3}, {str(bad)}, {"audio": (1, 1, 16, 32), "visual": (3, 3, 16, 16)}


EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]


def build_cremad(raw: Path):
    names = {split: [] for split in ("train", "test")}
    for k, emotion in enumerate(EMOTIONS):
        for i in range(5):
            name = f"10{i:02d}_IEO_{emotion}_XX"
            write_wav(raw / "AudioWAV" / f"{name}.wav", tone(k, 0.8, seed=i))
            write_video(raw / "VideoFlash" / f"{name}.flv", k, seconds=1.0, seed=i)
            names["test" if i == 4 else "train"].append((name, emotion))
    for split, rows in names.items():
        with open(raw / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    bad = {str(corrupt(raw / "AudioWAV" / "1000_IEO_ANG_XX.wav")),
           str(write_wav(raw / "AudioWAV" / "1001_IEO_DIS_XX.wav", np.zeros(8000, np.float32))),  # silent
           str(write_wav(raw / "AudioWAV" / "1002_IEO_FEA_XX.wav", tone(2, 0.05)))}  # too short
    (raw / "VideoFlash" / "1003_IEO_HAP_XX.flv").unlink()
    bad.add(str(raw / "VideoFlash" / "1003_IEO_HAP_XX.flv"))  # missing
    return (SMALL_STFT + ["visual.size=16"], {"train+val": 20, "test": 6}, bad,
            {"audio": (1, 1, 33, 126), "visual": (1, 3, 16, 16)})


def build_ave(raw: Path):
    categories = ["Church bell", "Dog", "Rodents"]
    lines = {"train": [], "val": [], "test": []}
    for k, category in enumerate(categories):
        for i, split in enumerate(["train", "train", "val", "test"]):
            vid = f"v{k}{i}AbC-d"
            write_video(raw / "AVE" / f"{vid}.mp4", k, seconds=2.0, seed=i)
            lines[split].append(f"{category}&{vid}&good&{i % 2}&{i % 2 + 1}")
    header = "Category&VideoID&Quality&StartTime&EndTime"
    (raw / "Annotations.txt").write_text("\n".join([header] + sum(lines.values(), [])) + "\n")
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        (raw / name).write_text("\n".join([header] + lines[split]) + "\n")
    bad = corrupt(raw / "AVE" / "v20AbC-d.mp4")
    recipe = ["audio.sample_rate=8000", "audio.duration=1.0", "audio.nperseg=64", "audio.noverlap=32",
              "visual.size=16", "num_classes=3"]
    return recipe, {"train": 5, "val": 3, "test": 3}, {str(bad)}, {"audio": (1, 1, 33, 249), "visual": (3, 3, 16, 16)}


def build_vggsound(raw: Path):
    labels = ["dog barking", "playing piano", "rain, falling"]  # a comma inside a label, as in the real csv
    rows = []
    for k, label in enumerate(labels):
        for i in range(6):
            yid = f"y{k}_{i}-Q"
            rows.append([yid, str(10 * i), label, "test" if i >= 4 else "train"])
            if (k, i) != (0, 1):  # a clip that failed to download
                write_video(raw / "video" / f"{yid}_{10 * i:06d}.mp4", k, seconds=1.0, seed=i)
    with open(raw / "vggsound.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    bad = {str(raw / "video" / "y0_1-Q_000010.mp4"), str(corrupt(raw / "video" / "y1_0-Q_000000.mp4"))}
    return (SMALL_STFT + ["visual.size=16", "num_classes=3", "val_fraction=0.25"], {"train+val": 10, "test": 6},
            bad, {"audio": (1, 1, 33, 126), "visual": (3, 3, 16, 16)})


def build_ucf101(raw: Path):
    classes = ["ApplyEyeMakeup", "Basketball", "YoYo"]
    lists = raw / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    train, test = [], []
    for k, name in enumerate(classes):
        for group in range(1, 6):
            relative = f"{name}/v_{name}_g{group:02d}_c01.avi"
            write_video(raw / "UCF-101" / relative, k, seconds=1.0, audio=False, seed=group)
            (test.append(relative) if group == 1 else train.append(f"{relative} {k + 1}"))
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    bad = corrupt(raw / "UCF-101" / "YoYo" / "v_YoYo_g03_c01.avi")
    recipe = ["rgb.size=16", "flow.size=16", "flow.num_frames=2", "num_classes=3", "val_fraction=0.25"]
    return recipe, {"train+val": 11, "test": 3}, {str(bad)}, {"rgb": (3, 3, 16, 16), "flow": (2, 2, 16, 16)}


def build_cefa(raw: Path):
    lines = {"train": [], "dev": [], "test": []}
    for label in (0, 1):
        for i, split in enumerate(["train"] * 4 + ["dev", "test"]):
            person = f"{split}/{label}_{i:03d}"
            paths = [write_image(raw / person / "profile" / "0001.jpg", label, seed=i),
                     write_image(raw / person / "depth" / "0001.jpg", label, seed=i, gray=True),
                     write_image(raw / person / "ir" / "0001.jpg", label, seed=i, gray=True)]
            lines[split].append(" ".join(str(p.relative_to(raw)) for p in paths) + f" {label}")
    for split, rows in lines.items():
        (raw / f"{split}_list.txt").write_text("\n".join(rows) + "\n")
    bad = corrupt(raw / "train" / "1_002" / "ir" / "0001.jpg")
    recipe = ["rgb.size=16", "depth.size=16", "ir.size=16"]
    return recipe, {"train": 7, "val": 2, "test": 2}, {str(bad)}, {"rgb": (1, 3, 16, 16), "depth": (1, 1, 16, 16), "ir": (1, 1, 16, 16)}


def build_custom(raw: Path):
    rows = []
    for k, label in enumerate(["cat", "dog"]):
        for i in range(6):
            split = "test" if i == 5 else "train"
            wav = write_wav(raw / "sounds" / f"{label}{i}.wav", tone(k, 0.6, seed=i))
            video = write_video(raw / "clips" / f"{label}{i}.mp4", k, seconds=1.0, audio=False, seed=i)
            rows.append({"id": f"{label}{i}", "label": label, "split": split,
                         "audio_path": str(wav.relative_to(raw)), "visual_path": str(video.relative_to(raw))})
    bad = corrupt(raw / "sounds" / "dog3.wav")
    with open(raw / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    recipe = ["audio.sample_rate=8000", "audio.duration=0.5", "audio.n_mels=16", "audio.n_fft=128",
              "audio.hop_length=64", "visual.size=16", "val_fraction=0.25"]
    return recipe, {"train+val": 9, "test": 2}, {str(bad)}, {"audio": (1, 1, 16, 63), "visual": (1, 3, 16, 16)}


BUILDERS = {"kinetics-sounds": build_kinetics_sounds, "cremad": build_cremad, "ave": build_ave,
            "vggsound": build_vggsound, "ucf101": build_ucf101, "cefa": build_cefa, "custom": build_custom}
COMPARED = {"ucf101", "cefa"}  # non-audio 2- and 3-modality datasets: the whole method × fusion grid


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("name", list(BUILDERS))
def test_adapter_prepares_its_raw_layout_and_trains(name, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    recipe, expected, bad, shapes = BUILDERS[name](raw)
    root = raw / "manifest.csv" if name == "custom" else raw
    data = ["--data-dir", str(tmp_path / "data"), "--root", str(root), *recipe_args(recipe)]
    runner = CliRunner()
    workers = "2" if name == "cremad" else "1"  # one adapter through the process pool
    out = ok(runner.invoke(app, ["prepare", "--dataset", name, *data, "--workers", workers,
                                 "--json", str(tmp_path / "summary.json")]))
    summary = json.loads((tmp_path / "summary.json").read_text())

    # the recipe: stored in full, hashed into the cache name, the same hash the runs will check
    cfg = DataConfig(dataset=name, root=str(tmp_path / "data"), raw_root=str(root),
                     recipe=dict(item.split("=", 1) for item in recipe))
    fc = open_cache(Path(summary["cache"]))
    assert fc.recipe_hash == stable_hash(fc.manifest["recipe"]) == fc.path.name == recipe_hash_for(cfg)
    assert fc.manifest["recipe"]["dataset"] == name and fc.manifest["recipe"]["recipe"] == get_dataset(name).recipe(cfg)["recipe"]

    # shapes, splits, labels, skipped files
    assert {m: tuple(fc.splits["train"].inputs[m].shape[1:]) for m in fc.modalities} == shapes
    for split, n in expected.items():
        if n is not None:
            assert sum(len(fc.splits[s]) for s in split.split("+")) == n, split
    ids = {split: set(fc.splits[split].ids) for split in fc.splits}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert all(len(s) > 0 for s in fc.splits.values())
    assert {s["path"] for s in summary["skipped"]} == bad
    assert all(s["reason"] for s in summary["skipped"])
    skipped_ids = {s["id"] for s in summary["skipped"]}
    assert not skipped_ids & set().union(*ids.values())
    for split in fc.splits.values():
        assert split.labels.min() >= 0 and split.labels.max() < fc.num_classes
    counts = summary["class_counts"]
    assert sum(counts["train"].values()) == len(fc.splits["train"]) and all(v > 0 for v in counts["train"].values())
    assert "skipped files: " + str(len(bad)) in " ".join(out.output.split())
    if name == "cremad":  # label = the EMO field of the file name, in the fixed emotion order
        train = fc.splits["train"]
        assert fc.classes == EMOTIONS
        assert all(EMOTIONS[label] == clip.split("_")[2] for label, clip in zip(train.labels, train.ids))
        reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
        assert "silent" in reasons["1001_IEO_DIS_XX.wav"] and "too short" in reasons["1002_IEO_FEA_XX.wav"]
        assert reasons["1003_IEO_HAP_XX.flv"] == "missing file"

    # rank and train (compare) pick the prepared cache up; the runs record its recipe hash
    runs = ["--runs-dir", str(tmp_path / "runs")]
    ok(runner.invoke(app, ["rank", "--dataset", name, *data, *runs, *TRAIN]))
    if name in COMPARED:
        ok(runner.invoke(app, ["compare", "--dataset", name, *data, *runs, *TRAIN, "--methods", "joint,ogm-ge,pdmp",
                               "--fusions", "concat,sum", "--seeds", "0"]))
        expected_runs = 6
    else:
        ok(runner.invoke(app, ["train", "--dataset", name, *data, *runs, *TRAIN, "--method", "pdmp"]))
        expected_runs = 1
    results = list((tmp_path / "runs").glob("*/train/*/result.json"))
    assert len(results) == expected_runs
    for path in results:
        result = json.loads(path.read_text())
        assert result["recipe_hash"] == fc.recipe_hash
        assert sorted(result["modalities"]) == sorted(fc.modalities)
        config = json.loads((path.parent / "config.json").read_text())
        assert config["recipe"] == fc.manifest["recipe"]
    rank = json.loads(next((tmp_path / "runs").glob("*/rank.json")).read_text())
    assert sorted(rank["ranking"]) == sorted(fc.modalities) and rank["recipe_hash"] == fc.recipe_hash
