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

from tests.media import corrupt, tone, write_image, write_video, write_wav
from pdmp_cli.cli import app
from pdmp_cli.config import DataConfig, stable_hash
from pdmp_cli.data import get_dataset, recipe_hash_for
from pdmp_cli.data.cache import open_cache

TRAIN = ["--epochs", "1", "--width", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]
SMALL_STFT = ["audio.sample_rate=8000", "audio.duration=0.5", "audio.n_fft=64", "audio.hop_length=32"]


def recipe_args(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--recipe", item)]


# ---- raw layouts -----------------------------------------------------------------------------------
# Each builder returns (recipe options, expected {split: number of usable clips}, expected skipped paths,
# expected feature shapes, {clip id: label}).

def build_kinetics_sounds(raw: Path):
    classes = ["playing drums", "dog barking", "singing"]
    per_split = {"train": 3, "val": 1, "test": 1}
    labels = {}
    for k, name in enumerate(classes):
        for split, n in per_split.items():
            for i in range(n):
                clip = write_video(raw / split / name / f"yt{k}{split[:2]}{i}_{i:06d}_{i + 10:06d}.mp4", k, seed=i)
                labels[clip.stem] = name
    bad = corrupt(raw / "train" / "singing" / "broken_000000_000010.mp4")
    truncated = write_video(raw / "train" / "singing" / "cut_000000_000010.mp4", 2)
    truncated.write_bytes(truncated.read_bytes()[:len(truncated.read_bytes()) // 2])  # a download cut half-way
    recipe = ["audio.sample_rate=8000", "audio.num_mel_bins=16", "audio.target_frames=32", "visual.size=16"]
    return (recipe, {"train": 9, "val": 3, "test": 3}, {str(bad), str(truncated)},
            {"audio": (1, 1, 16, 32), "visual": (3, 3, 16, 16)}, labels)


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
    labels = {name: emotion for rows in names.values() for name, emotion in rows}
    return (SMALL_STFT + ["visual.size=16"], {"train+val": 20, "test": 6}, bad,
            {"audio": (1, 1, 33, 126), "visual": (1, 3, 16, 16)}, labels)


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
    labels = {line.split("&")[1]: line.split("&")[0] for rows in lines.values() for line in rows}
    return (recipe, {"train": 5, "val": 3, "test": 3}, {str(bad)}, {"audio": (1, 1, 33, 249), "visual": (3, 3, 16, 16)},
            labels)


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
    labels = {f"{r[0]}_{int(r[1]):06d}": r[2] for r in rows}
    return (SMALL_STFT + ["visual.size=16", "num_classes=3", "val_fraction=0.25"], {"train+val": 10, "test": 6},
            bad, {"audio": (1, 1, 33, 126), "visual": (3, 3, 16, 16)}, labels)


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
    labels = {Path(line.split()[0]).stem: line.split("/")[0] for line in train + test}
    return recipe, {"train+val": 11, "test": 3}, {str(bad)}, {"rgb": (3, 3, 16, 16), "flow": (2, 2, 16, 16)}, labels


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
    labels = {line.split()[0]: ("spoof", "live")[int(line.split()[3])] for rows in lines.values() for line in rows}
    return (recipe, {"train": 7, "val": 2, "test": 2}, {str(bad)},
            {"rgb": (1, 3, 16, 16), "depth": (1, 1, 16, 16), "ir": (1, 1, 16, 16)}, labels)


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
    labels = {r["id"]: r["label"] for r in rows}
    return recipe, {"train+val": 9, "test": 2}, {str(bad)}, {"audio": (1, 1, 16, 63), "visual": (1, 3, 16, 16)}, labels


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
    recipe, expected, bad, shapes, labels = BUILDERS[name](raw)
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
    for split in fc.splits.values():  # every clip carries the label of its raw layout
        assert [fc.classes[label] for label in split.labels] == [labels[clip] for clip in split.ids]
    assert sorted(fc.classes) == sorted(set(labels.values()))
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
        # M modalities: PDMP gives γp to the top-ranked one and γr to every other; OGM-GE modulates each
        rank = json.loads(next((tmp_path / "runs").glob("*/rank.json")).read_text())
        (pdmp_run,) = (tmp_path / "runs").glob("*/train/pdmp-concat*")
        gammas = json.loads((pdmp_run / "metrics.jsonl").read_text().splitlines()[0])["method"]
        assert gammas == {f"gamma/{m}": (3.0 if m == rank["ranking"][0] else 0.25) for m in rank["ranking"]}
        (ogm_run,) = (tmp_path / "runs").glob("*/train/ogm-ge-sum*")
        logged = json.loads((ogm_run / "metrics.jsonl").read_text().splitlines()[0])["method"]
        assert {k.split("/")[1] for k in logged} == set(rank["ranking"]) and len(logged) == 2 * len(rank["ranking"])
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


# ---- validation: clear one-line errors -----------------------------------------------------------------

def check(name: str, raw: Path, tmp_path: Path, *recipe: str):
    return CliRunner().invoke(app, ["prepare", "--dataset", name, "--root", str(raw), "--check",
                                    "--data-dir", str(tmp_path / "data"), *recipe_args(list(recipe))])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and result.output.strip().count("\n") <= 3  # one message, wrapped at most
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Raw layouts built once; each validation test copies the one it breaks."""
    base = tmp_path_factory.mktemp("layouts")
    for name in ("ave", "ucf101", "cremad", "cefa", "vggsound", "kinetics-sounds"):
        (base / name).mkdir()
        BUILDERS[name](base / name)
    return base


def copy_layout(layouts: Path, name: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(layouts / name, tmp_path / name))


def test_check_prints_counts_and_missing_files_without_decoding(layouts, tmp_path):
    result = check("vggsound", layouts / "vggsound", tmp_path, "num_classes=3", "val_fraction=0.25")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "not prepared yet" in text and "3 classes" in text and "rain, falling" in text
    assert "missing files (prepare will skip them): 1" in text and "y0_1-Q_000010" in text
    assert not (tmp_path / "data").exists()  # nothing decoded, nothing written


def test_a_cache_prepared_from_another_root_is_not_silently_reused(layouts, tmp_path):
    import shutil

    first = copy_layout(layouts, "cefa", tmp_path)
    second = Path(shutil.copytree(first, tmp_path / "cefa-copy"))

    def prepare(raw: Path):
        return CliRunner().invoke(app, ["prepare", "--dataset", "cefa", "--root", str(raw), "--recipe", "cpu",
                                        "--data-dir", str(tmp_path / "data")])
    assert prepare(first).exit_code == 0
    assert prepare(first).exit_code == 0  # the same root: the cache is reused
    one_line_error(prepare(second), f"prepared from {first}", f"not --root {second}", "--data-dir")


def test_missing_split_file(layouts, tmp_path):
    raw = copy_layout(layouts, "ave", tmp_path)
    (raw / "valSet.txt").unlink()
    one_line_error(check("ave", raw, tmp_path, "num_classes=3"), "valSet.txt is missing", "Category&VideoID")


def test_unknown_label(layouts, tmp_path):
    raw = copy_layout(layouts, "ucf101", tmp_path)
    with open(raw / "ucfTrainTestlist" / "trainlist01.txt", "a") as f:
        f.write("Surfing/v_Surfing_g02_c01.avi 4\n")
    one_line_error(check("ucf101", raw, tmp_path, "num_classes=3"), "'Surfing' is not in classInd.txt")


def test_split_overlap(layouts, tmp_path):
    raw = copy_layout(layouts, "cremad", tmp_path)
    with open(raw / "test.csv", "a") as f:
        f.write("1000_IEO_ANG_XX,ANG\n")
    one_line_error(check("cremad", raw, tmp_path), "1000_IEO_ANG_XX", "split files overlap")


def test_duplicate_id(layouts, tmp_path):
    raw = copy_layout(layouts, "cefa", tmp_path)
    first = (raw / "train_list.txt").read_text().splitlines()[0]
    with open(raw / "train_list.txt", "a") as f:
        f.write(first + "\n")
    one_line_error(check("cefa", raw, tmp_path), "appears twice in the train split")


def test_declared_class_count(layouts, tmp_path):
    one_line_error(check("vggsound", layouts / "vggsound", tmp_path), "3 classes but 309 are declared",
                   "--recipe num_classes=3")


def test_empty_class(layouts, tmp_path):
    (tmp_path / "classes.txt").write_text("playing drums\ndog barking\nsinging\nplaying harp\n")
    message = one_line_error(check("kinetics-sounds", layouts / "kinetics-sounds", tmp_path,
                                   f"class_list={tmp_path / 'classes.txt'}"), "'playing harp' has no training clips")
    assert "class list" in message


def test_bad_recipe_options_are_refused(layouts, tmp_path):
    one_line_error(check("cremad", layouts / "cremad", tmp_path, "audio.nfft=3"), "no parameter 'nfft'", "n_fft")
    one_line_error(check("cremad", layouts / "cremad", tmp_path, "visual.size=big"), "expected a int")
    one_line_error(check("cremad", layouts / "cremad", tmp_path, "depth.size=3"), "no modality 'depth'")
    one_line_error(check("cremad", layouts / "cremad", tmp_path, "pmr-ave"), "no recipe 'pmr-ave'", "ogmge-cremad")
    one_line_error(check("cremad", tmp_path / "nowhere", tmp_path), "no raw data for cremad", "AudioWAV")


def test_strict_fails_then_resume_decodes_nothing_again(layouts, tmp_path):
    data = ["--data-dir", str(tmp_path / "data"), "--root", str(layouts / "cremad"),
            *recipe_args(SMALL_STFT + ["visual.size=16"]), "--workers", "1", "--quiet"]
    runner = CliRunner()
    one_line_error(runner.invoke(app, ["prepare", "--dataset", "cremad", *data, "--strict"]), "--strict: 4 clip(s)")
    assert not list((tmp_path / "data" / "cremad" / "cache").glob("[0-9a-f]*"))  # nothing published
    ok(runner.invoke(app, ["prepare", "--dataset", "cremad", *data, "--json", str(tmp_path / "s.json")]))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["preparation"]["decoded_now"] == 0  # every clip was finished by the strict run
    assert len(summary["skipped"]) == 4
    one_line_error(runner.invoke(app, ["prepare", "--dataset", "cremad", *data, "--strict"]),
                   "--strict: the existing cache", "left out 4 clip(s)")
    ok(runner.invoke(app, ["datasets", "--data-dir", str(tmp_path / "data"), "--json", str(tmp_path / "d.json")]))
    (listed,) = json.loads((tmp_path / "d.json").read_text())["caches"]
    assert listed["recipe_name"] == "ogmge-cremad" and listed["recipe_hash"] == summary["recipe_hash"]
    assert sum(listed["class_counts"]["test"].values()) == 6
    out = ok(runner.invoke(app, ["datasets", "--dataset", "cremad", "--data-dir", str(tmp_path / "data")]))
    assert "1000_IEO_ANG_XX" in out.output and "NEU" in out.output


class Interrupting:
    """A recipe that counts its decodes and raises KeyboardInterrupt at decode number `stop_at`."""

    shape, dtype = (1, 2), np.dtype(np.float32)

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = [], stop_at

    def load(self, path, start=None, end=None):
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append(path)
        return np.full((1, 2), float(Path(path).stem), np.float32)


def test_interrupted_prepare_resumes_without_redoing_finished_clips(tmp_path, monkeypatch):
    from pdmp_cli.data import cache

    monkeypatch.setattr(cache, "FLUSH_SECONDS", 0.0)  # make every clip durable at once
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.x").write_text("")
        rows.append({"id": f"c{i}", "label": str(i % 2), "split": ("train", "val", "test")[i % 3],
                     "x_path": str(tmp_path / f"{i}.x")})
    first = Interrupting(stop_at=5)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare_cache(tmp_path / "c", rows, {"x": first}, {"r": 1}, dataset="t", quiet=True, workers=1)
    assert len(first.calls) == 5 and not (tmp_path / "c" / stable_hash({"r": 1})).exists()
    second = Interrupting()
    fc = cache.prepare_cache(tmp_path / "c", rows, {"x": second}, {"r": 1}, dataset="t", quiet=True, workers=1)
    assert len(second.calls) == 7 and not set(first.calls) & set(second.calls)
    for split in fc.splits.values():  # every clip's features in its own row, in the split's order
        assert [float(v) for v in split.inputs["x"][:, 0, 0]] == [float(i[1:]) for i in split.ids]
    assert fc.manifest["preparation"]["decoded_now"] == 7
    assert not list((tmp_path / "c").glob(".partial-*"))


def test_kinetics_annotation_csv_layout_and_class_list(tmp_path):
    raw = tmp_path / "ks"
    rows = []
    for k, label in enumerate(["playing drums", "singing", "welding"]):  # welding: outside the class list
        for i, split in enumerate(["train", "train", "validate", "test"]):
            rows.append({"label": label, "youtube_id": f"id{k}{i}", "time_start": 10 * i, "time_end": 10 * i + 10,
                         "split": split, "is_cc": 0})
    (raw / "clips").mkdir(parents=True)
    with open(raw / "kinetics_700.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_video(raw / "clips" / "id00_000000_000010.mp4", 0)
    (tmp_path / "ks31.txt").write_text("playing drums\nsinging\n")
    spec = get_dataset("kinetics-sounds")
    cfg = DataConfig(dataset="kinetics-sounds", root=str(tmp_path / "data"), raw_root=str(raw),
                     recipe={"class_list": str(tmp_path / "ks31.txt"), "num_classes": "2"})
    out = spec.check(cfg)
    assert out["classes"] == ["playing drums", "singing"]
    assert out["class_counts"] == {"train": {"playing drums": 2, "singing": 2}, "val": {"playing drums": 1, "singing": 1},
                                   "test": {"playing drums": 1, "singing": 1}}
    assert any("4 clips outside the class list left out" in n for n in out["notes"])
    assert {Path(m["path"]).name for m in out["missing"]} == {f"id{k}{i}_{10 * i:06d}_{10 * i + 10:06d}.mp4"
                                                             for k in (0, 1) for i in range(4)} - {"id00_000000_000010.mp4"}
    with pytest.raises(Exception, match="2 classes but 31 are declared"):
        spec.check(DataConfig(**{**cfg.__dict__, "recipe": {"class_list": str(tmp_path / "ks31.txt"), "num_classes": "31"}}))


def test_ucf101_reads_precomputed_flow_frames(layouts, tmp_path):
    import cv2

    flow = tmp_path / "flow"
    for relative in (layouts / "ucf101" / "UCF-101").glob("*/*.avi"):
        folder = flow / relative.parent.name / relative.stem
        folder.mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(folder / f"x_{i:05d}.jpg"), np.full((24, 24), 128 + 10 * i, np.uint8))
            cv2.imwrite(str(folder / f"y_{i:05d}.jpg"), np.full((24, 24), 100, np.uint8))
    cfg = DataConfig(dataset="ucf101", root=str(tmp_path / "data"), raw_root=str(layouts / "ucf101"),
                     recipe={"num_classes": "3", "flow_dir": str(flow), "rgb.size": "8", "flow.size": "8",
                             "flow.num_frames": "2", "val_fraction": "0.25"})
    from pdmp_cli.data import load_dataset

    fc = load_dataset(cfg, quiet=True, workers=1)
    test = fc.splits["test"]
    assert len(test) == 3 and test.inputs["flow"].shape == (3, 2, 2, 8, 8)
    np.testing.assert_allclose(np.asarray(test.inputs["flow"][:, :, 0]).mean(axis=(2, 3)),
                               np.tile([[138, 158]], (3, 1)), atol=2)  # frames 1 and 3 of 4, in order
    assert [s["path"].endswith("v_YoYo_g03_c01.avi") for s in fc.manifest["skipped"]] == [True]  # the rgb file
    assert fc.manifest["recipe"]["options"]["flow_dir"] == str(flow)
    val_groups = {clip.split("_g")[1][:2] for clip in fc.splits["val"].ids}
    train_groups = {clip.split("_g")[1][:2] for clip in fc.splits["train"].ids}
    assert val_groups and not val_groups & train_groups  # whole groups carved: no leak between train and val


def test_a_class_left_without_training_clips_is_flagged(tmp_path):
    from pdmp_cli.data import cache

    rows = [{"id": f"c{i}", "label": str(i % 2), "split": "train" if i < 6 else "test",
             "x_path": str(tmp_path / (f"{i}.x" if i % 2 == 0 or i >= 6 else "gone"))} for i in range(8)]
    for i in range(8):
        (tmp_path / f"{i}.x").write_text("")
    fc = cache.prepare_cache(tmp_path / "c", rows, {"x": Interrupting()}, {"r": 2}, dataset="t", quiet=True, workers=1)
    assert len(fc.manifest["skipped"]) == 3 and fc.manifest["class_counts"]["train"] == {"0": 3, "1": 0}
    (warning,) = fc.manifest["warnings"]
    assert "class '1' has no usable training clip" in warning


def test_av_digits_refuses_recipe_options():
    from pdmp_cli.errors import PdmpError

    with pytest.raises(PdmpError, match="one fixed recipe"):
        recipe_hash_for(DataConfig(recipe={"visual.size": "64"}))


def test_concurrent_prepares_of_one_cache_decode_each_clip_once(tmp_path):
    import threading

    from pdmp_cli.data import cache

    rows = []
    for i in range(9):
        (tmp_path / f"{i}.x").write_text("")
        rows.append({"id": f"c{i}", "label": str(i % 3), "split": ("train", "val", "test")[i % 3],
                     "x_path": str(tmp_path / f"{i}.x")})
    recipes = [Interrupting(), Interrupting()]
    results = [None, None]

    def run(k):
        results[k] = cache.prepare_cache(tmp_path / "c", rows, {"x": recipes[k]}, {"r": 3}, dataset="t", quiet=True,
                                         workers=1)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].path == results[1].path
    assert sorted(len(r.calls) for r in recipes) == [0, 9]  # the second waited and reused the first's cache


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "custom"])
def test_presets_reproduce_the_lineage_protocol(name):
    from pdmp_cli.config import resolve_config

    cfg = resolve_config(dataset=name, method="joint", device="cuda")  # what a GPU machine resolves without flags
    o = cfg.optim
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay, o.batch_size, o.epochs, o.scheduler, o.step_epoch,
            o.step_gamma) == ("sgd", 1e-3, 0.9, 1e-4, 64, 100, "step", 70, 0.1)
    assert cfg.model.encoder == "resnet18" and cfg.select_split == "val"
    # the `cpu` recipe: the same features with frames at 64×64
    paper = get_dataset(name).recipe(DataConfig(dataset=name))
    cpu = get_dataset(name).recipe(DataConfig(dataset=name, recipe={"name": "cpu"}))
    for m, spec in paper["modalities"].items():
        assert cpu["modalities"][m] == ({**spec, "size": 64} if spec["kind"] in ("frames", "flow") else spec)
    assert any(spec["size"] == 64 for spec in cpu["modalities"].values() if "size" in spec)
    alpha = resolve_config(dataset=name, method="ogm-ge", device="cpu").method.params["alpha"]
    assert alpha == {"cremad": 0.8, "vggsound": 0.1}.get(name, alpha)


# Per-modality quantities each method logs (metrics.jsonl "method"): on three modalities each must cover all three.
PER_MODALITY_LOG = {"agm": "coef", "gblending": "weight", "mla": "loss", "mmpareto": "w_fused", "ogm": "coef",
                    "ogm-ge": "coef", "opm": "q", "pdmp": "gamma", "pmr": "ratio", "umt": "mse"}


def test_every_method_trains_on_three_modalities(tmp_path):
    """cefa (rgb, depth, ir) through `compare --methods all`, each method's rule active from the first epoch:
    every run finishes with three per-modality test accuracies, and every per-modality rule acts on all three."""
    import math

    from pdmp_cli.methods import METHODS

    raw = tmp_path / "raw"
    recipe, *_ = build_cefa(raw)
    data = ["--data-dir", str(tmp_path / "data"), "--root", str(raw), *recipe_args(recipe)]
    runs = ["--runs-dir", str(tmp_path / "runs")]
    train = ["--epochs", "2", *TRAIN[2:]]
    runner = CliRunner()
    ok(runner.invoke(app, ["prepare", "--dataset", "cefa", *data]))
    ok(runner.invoke(app, ["rank", "--dataset", "cefa", *data, *runs, *train, "--seeds", "1"]))  # ume's and umt's models
    ok(runner.invoke(app, ["compare", "--dataset", "cefa", *data, *runs, *train, "--methods", "all", "--seeds", "0",
                           "--set", "opm.warmup_epochs=0", "--set", "opm.p_exe=1", "--set", "gblending.every=1"]))
    modalities = {"rgb", "depth", "ir"}
    trained = {}
    for path in (tmp_path / "runs").glob("*/train/*/result.json"):
        result = json.loads(path.read_text())
        assert set(result["test"]["modality_accuracy"]) == modalities, result["method"]
        assert all(0 <= v <= 1 for v in result["test"]["modality_accuracy"].values())
        trained[result["method"]] = [json.loads(line)["method"] for line in (path.parent / "metrics.jsonl").open()]
    assert sorted(trained) == sorted(n for n in METHODS.names() if not METHODS.get(n).unimodal)
    for method, key in PER_MODALITY_LOG.items():
        for logged in trained[method]:
            values = {name.split("/")[1]: v for name, v in logged.items() if name.startswith(key + "/")}
            assert set(values) - {"fused"} == modalities and all(math.isfinite(v) for v in values.values()), (method, logged)
    for logged in trained["gblending"]:  # one weight per branch (fused + 3), a convex combination
        assert math.isclose(sum(v for k, v in logged.items() if k.startswith("weight/")), 1.0, rel_tol=1e-6)
    assert all(logged["executed"] == 1.0 for logged in trained["opm"])  # p_exe = 1: every batch
    # and each rule acted (a value off its neutral one) somewhere in the two epochs
    acted = {"agm": ("coef", 1.0), "ogm": ("coef", 1.0), "ogm-ge": ("coef", 1.0), "opm": ("q", 0.0), "pmr": ("beta", 0.0)}
    for method, (key, neutral) in acted.items():
        assert any(v != neutral for logged in trained[method] for k, v in logged.items() if k.startswith(key + "/")), method
