"""The real datasets: one function per raw layout (as downloaded) -> a clip list, and their recipes.

Each layout is documented in datasets/<name>/README.md. Adapters only list and label clips; decoding,
validation of the list, skipping of bad files and the cache are shared (real.py, cache.py).
"""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Any

from pdmp_cli.data.cache import SPLITS, natural, read_manifest_csv
from pdmp_cli.data.real import COMMON_OPTIONS, Adapter, Listing, NamedRecipe, carve_val, register
from pdmp_cli.errors import PdmpError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def _need(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise PdmpError(f"{what} {path} is missing; expected layout: {layout}")
    return path


def _split(value: str, where: str) -> str:
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise PdmpError(f"{where}: unknown split {value!r}; use train, val (validate) or test")
    return split


def _read_class_list(path: str, raw: Path) -> list[str] | None:
    if not path:
        return None
    file = Path(path) if Path(path).is_absolute() else raw / path
    if not file.is_file():
        raise PdmpError(f"class list {file} does not exist; give --recipe class_list=FILE (one class name a line)")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _finish(rows: list[dict[str, Any]], classes: list[str], options: dict[str, Any], notes: list[str],
            group=None) -> Listing:
    if not any(r["split"] == "val" for r in rows):
        notes.append(carve_val(rows, options["val_fraction"], options["split_seed"], group))
    return Listing(rows, classes, notes)


# ---- Kinetics-Sounds ------------------------------------------------------------------------------------

KS_LAYOUT = ("<root>/{train,val,test}/<class name>/<youtube_id>_<start:06d>_<end:06d>.mp4, or an annotation CSV "
             "(label,youtube_id,time_start,time_end,split) with the clips in <root>/clips/ or <root>/")


def list_kinetics_sounds(raw: Path, options: dict[str, Any]) -> Listing:
    wanted = _read_class_list(options["class_list"], raw)
    split_dirs = {}
    for folder in sorted(p for p in raw.iterdir() if p.is_dir()):
        split = SPLIT_ALIASES.get(folder.name.lower())
        if split and split not in split_dirs:
            split_dirs[split] = folder
    rows, notes, left_out = [], [], 0
    if "train" in split_dirs:  # the Kinetics downloader layout
        if "test" not in split_dirs:
            raise PdmpError(f"kinetics-sounds: {raw}/test/ is missing; expected layout: {KS_LAYOUT}")
        found = set()
        for split, folder in split_dirs.items():
            for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                if wanted is not None and class_dir.name not in wanted:
                    left_out += 1
                    continue
                found.add(class_dir.name)
                for clip in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
                    rows.append({"id": clip.stem, "label": class_dir.name, "split": split,
                                 "audio_path": str(clip), "visual_path": str(clip)})
        classes = wanted or sorted(found)
    else:  # an annotation CSV and a flat folder of clips
        csvs = [raw / options["annotations"]] if options["annotations"] else sorted(raw.glob("*.csv"))
        if len(csvs) != 1 or not csvs[0].is_file():
            raise PdmpError(f"kinetics-sounds: no train/ folder and {'no' if not csvs else 'more than one'} annotation "
                            f"CSV in {raw}; give --recipe annotations=FILE; expected layout: {KS_LAYOUT}")
        clips = raw / options["clips"] if options["clips"] else (raw / "clips" if (raw / "clips").is_dir() else raw)
        with open(csvs[0], newline="") as f:
            reader = csv.DictReader(f)
            need = {"label", "youtube_id", "time_start", "time_end", "split"}
            if not need <= set(reader.fieldnames or []):
                raise PdmpError(f"{csvs[0]} lacks column(s) {', '.join(sorted(need - set(reader.fieldnames or [])))}; "
                                f"expected label,youtube_id,time_start,time_end,split")
            for line, r in enumerate(reader, 2):
                if wanted is not None and r["label"] not in wanted:
                    left_out += 1
                    continue
                clip_id = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
                path = str(clips / f"{clip_id}.mp4")
                rows.append({"id": clip_id, "label": r["label"], "split": _split(r["split"], f"{csvs[0]}:{line}"),
                             "audio_path": path, "visual_path": path})
        classes = wanted or sorted({r["label"] for r in rows})
    if left_out:
        notes.append(f"{left_out} {'class folders' if 'train' in split_dirs else 'clips'} outside the class list left out")
    notes.append(f"{len(classes)} classes ({'from ' + options['class_list'] if wanted else 'as found in the data'})")
    return _finish(rows, classes, options, notes)


# ---- CREMA-D --------------------------------------------------------------------------------------------

CREMAD_EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
CREMAD_LAYOUT = ("<root>/AudioWAV/<actor>_<sentence>_<EMO>_<level>.wav, <root>/VideoFlash/<same>.flv, and "
                 "optionally OGM-GE's split files <root>/train.csv and <root>/test.csv (rows name,EMO)")


def list_cremad(raw: Path, options: dict[str, Any]) -> Listing:
    audio = _need(raw / "AudioWAV", "CREMA-D folder", CREMAD_LAYOUT)
    video = _need(raw / "VideoFlash", "CREMA-D folder", CREMAD_LAYOUT)
    names = sorted({p.stem for p in audio.glob("*.wav")} | {p.stem for p in video.glob("*.flv")})

    def emotion(name: str) -> str:
        parts = name.split("_")
        if len(parts) != 4:
            raise PdmpError(f"cremad: {name} is not named <actor>_<sentence>_<EMO>_<level>; rename or remove it")
        if parts[2] not in CREMAD_EMOTIONS:
            raise PdmpError(f"cremad: {name} has emotion {parts[2]!r}, not one of {', '.join(CREMAD_EMOTIONS)}")
        return parts[2]

    split_files = {s: raw / f"{s}.csv" for s in ("train", "test")}
    present = [s for s, f in split_files.items() if f.is_file()]
    notes, split_of = [], {}
    if len(present) == 1:
        missing = "test" if present == ["train"] else "train"
        raise PdmpError(f"cremad: {split_files[missing]} is missing but {split_files[present[0]]} exists; "
                        f"restore it (OGM-GE's data/CREMAD/{missing}.csv) or remove both to use a seeded split")
    if present:
        for split, file in split_files.items():
            with open(file, newline="") as f:
                for line, row in enumerate(csv.reader(f), 1):
                    if not row:
                        continue
                    if row[0] in split_of:
                        raise PdmpError(f"cremad: clip {row[0]} is listed twice ({file}:{line}); the split files overlap")
                    if len(row) > 1 and row[1] != emotion(row[0]):
                        raise PdmpError(f"cremad: {file}:{line} labels {row[0]} {row[1]!r}, its name says {emotion(row[0])!r}")
                    split_of[row[0]] = split
        notes.append("reference split: train.csv / test.csv (OGM-GE)")
    else:
        import numpy as np

        rng = np.random.default_rng(options["split_seed"])
        for label in CREMAD_EMOTIONS:
            members = [n for n in names if emotion(n) == label]
            n = min(max(int(round(options["test_fraction"] * len(members))), 1), len(members) - 1)
            test = set(rng.permutation(members)[:n].tolist())
            split_of.update({n: "test" if n in test else "train" for n in members})
        notes.append(f"no train.csv/test.csv: test split drawn per emotion, {options['test_fraction']} (seed {options['split_seed']})")
    rows = [{"id": n, "label": emotion(n), "split": s, "audio_path": str(audio / f"{n}.wav"),
             "visual_path": str(video / f"{n}.flv")} for n, s in sorted(split_of.items())]
    return _finish(rows, list(CREMAD_EMOTIONS), options, notes)


# ---- AVE --------------------------------------------------------------------------------------------------

AVE_LAYOUT = ("<root>/AVE/<video_id>.mp4, <root>/Annotations.txt, trainSet.txt, valSet.txt, testSet.txt with lines "
              "Category&VideoID&Quality&StartTime&EndTime (a header line is skipped)")


def _ave_lines(file: Path) -> list[list[str]]:
    out = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = [p.strip() for p in line.split("&")]
        if len(parts) < 5 or parts[0] == "Category":  # the header line
            continue
        out.append(parts)
    return out


def list_ave(raw: Path, options: dict[str, Any]) -> Listing:
    videos = _need(raw / "AVE", "AVE video folder", AVE_LAYOUT)
    annotations = raw / "Annotations.txt"
    split_files = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
    rows = []
    for split, name in split_files.items():
        for category, video_id, _quality, start, end in (p[:5] for p in _ave_lines(_need(raw / name, "AVE split file", AVE_LAYOUT))):
            path = str(videos / f"{video_id}.mp4")
            rows.append({"id": video_id, "label": category, "split": split, "audio_path": path, "visual_path": path,
                         "start": float(start), "end": float(end)})
    source = annotations if annotations.is_file() else None
    classes = sorted({p[0] for p in _ave_lines(annotations)} if source else {r["label"] for r in rows})
    notes = [f"classes from {'Annotations.txt' if source else 'the split files'}; audio and frames from the event segment"]
    return Listing(rows, classes, notes)


# ---- VGGSound ---------------------------------------------------------------------------------------------

VGGSOUND_LAYOUT = ("<root>/vggsound.csv with rows youtube_id,start_seconds,label,split and clips "
                   "<youtube_id>_<start:06d>.mp4 in <root>/video/, <root>/clips/ or <root>/")


def list_vggsound(raw: Path, options: dict[str, Any]) -> Listing:
    table = _need(raw / "vggsound.csv", "VGGSound annotation file", VGGSOUND_LAYOUT)
    if options["clips"]:
        clips = raw / options["clips"]
    else:
        clips = next((d for d in (raw / "video", raw / "clips") if d.is_dir()), raw)
    rows = []
    with open(table, newline="") as f:
        for line, r in enumerate(csv.reader(f), 1):
            if not r or r[0].startswith("#") or (line == 1 and not re.match(r"^-?\d+(\.\d+)?$", r[1].strip())):
                continue  # a header line
            if len(r) < 4:
                raise PdmpError(f"{table}:{line} has {len(r)} fields; expected youtube_id,start_seconds,label,split")
            clip_id = f"{r[0]}_{int(float(r[1])):06d}"
            path = str(clips / f"{clip_id}.mp4")
            rows.append({"id": clip_id, "label": r[2].strip(), "split": _split(r[3], f"{table}:{line}"),
                         "audio_path": path, "visual_path": path})
    return _finish(rows, sorted({r["label"] for r in rows}), options, [f"clips from {clips}"])


# ---- UCF-101 ----------------------------------------------------------------------------------------------

UCF_LAYOUT = ("<root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and <root>/ucfTrainTestlist/classInd.txt, "
              "trainlist0N.txt, testlist0N.txt")


def _ucf_group(row: dict[str, Any]) -> str:
    match = re.search(r"_g(\d+)_c\d+$", row["id"])
    return match.group(1) if match else row["id"]


def list_ucf101(raw: Path, options: dict[str, Any]) -> Listing:
    videos = _need(raw / "UCF-101", "UCF-101 video folder", UCF_LAYOUT)
    lists = _need(raw / "ucfTrainTestlist", "UCF-101 split folder", UCF_LAYOUT)
    classes = []
    for line in _need(lists / "classInd.txt", "UCF-101 class index", UCF_LAYOUT).read_text().splitlines():
        if line.strip():
            index, name = line.split()
            if int(index) != len(classes) + 1:
                raise PdmpError(f"{lists / 'classInd.txt'}: index {index} out of order (expected {len(classes) + 1})")
            classes.append(name)
    flow_dir = Path(options["flow_dir"]) if options["flow_dir"] else None
    rows = []
    fold = options["fold"]
    for split, name in (("train", f"trainlist0{fold}.txt"), ("test", f"testlist0{fold}.txt")):
        file = _need(lists / name, "UCF-101 split file", UCF_LAYOUT)
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            relative, *index = line.split()
            label = relative.split("/")[0]
            if label not in classes:
                raise PdmpError(f"{file}:{number}: class {label!r} is not in classInd.txt")
            if index and classes[int(index[0]) - 1] != label:
                raise PdmpError(f"{file}:{number}: index {index[0]} is {classes[int(index[0]) - 1]!r} in classInd.txt, "
                                f"not {label!r}")
            stem = Path(relative).stem
            flow = str(videos / relative)
            if flow_dir is not None:
                flow = str(flow_dir / label / stem if (flow_dir / label / stem).is_dir() else flow_dir / stem)
            rows.append({"id": stem, "label": label, "split": split, "rgb_path": str(videos / relative),
                         "flow_path": flow})
    notes = [f"fold {fold}; flow " + (f"read from {flow_dir}" if flow_dir else "computed with OpenCV (Farnebäck)")]
    return _finish(rows, classes, options, notes, group=_ucf_group)


# ---- CASIA-SURF CeFA --------------------------------------------------------------------------------------

CEFA_LAYOUT = ("list files <root>/train_list.txt, val_list.txt (or dev_list.txt), test_list.txt (with --recipe "
               "protocol=P: P_train.txt, P_dev.txt, P_test.txt), lines `rgb_path depth_path ir_path label` "
               "(paths relative to <root>: an image or a folder of frames; label 1 live, 0 spoof)")
CEFA_CLASSES = ["spoof", "live"]


def _cefa_list(raw: Path, protocol: str, split: str) -> Path:
    names = {"train": ["train"], "val": ["val", "dev", "dev_res"], "test": ["test", "test_res"]}[split]
    candidates = [f"{protocol}_{n}.txt" for n in names] if protocol else [f"{n}_list.txt" for n in names]
    for name in candidates:
        if (raw / name).is_file():
            return raw / name
    raise PdmpError(f"cefa: split file {raw / candidates[0]} is missing; expected layout: {CEFA_LAYOUT}")


def list_cefa(raw: Path, options: dict[str, Any]) -> Listing:
    rows = []
    for split in SPLITS:
        file = _cefa_list(raw, options["protocol"], split)
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 4:
                raise PdmpError(f"{file}:{number} has {len(parts)} fields; expected rgb_path depth_path ir_path label")
            if parts[3] not in ("0", "1"):
                raise PdmpError(f"{file}:{number}: label {parts[3]!r} is not 0 (spoof) or 1 (live)")
            rows.append({"id": parts[0], "label": CEFA_CLASSES[int(parts[3])], "split": split,
                         **{f"{m}_path": str(raw / p) for m, p in zip(("rgb", "depth", "ir"), parts[:3])}})
    return Listing(rows, list(CEFA_CLASSES), [f"protocol {options['protocol'] or '(plain list files)'}"])


# ---- custom CSV manifests ----------------------------------------------------------------------------------

CUSTOM_LAYOUT = "a CSV manifest id,label,split,<modality>_path... (optional start,end in seconds): --root FILE.csv"


def _manifest(raw: Path) -> Path:
    return raw / "manifest.csv" if raw.is_dir() else raw


def custom_modalities(raw: Path) -> tuple[str, ...]:
    file = _need(_manifest(raw), "manifest", CUSTOM_LAYOUT)
    with open(file, newline="") as f:
        header = next(csv.reader(f), [])
    modalities = tuple(c[:-len("_path")] for c in header if c.endswith("_path"))
    if not modalities:
        raise PdmpError(f"{file} has no <modality>_path column; expected {CUSTOM_LAYOUT}")
    return modalities


def custom_fingerprint(raw: Path) -> str:
    return hashlib.sha256(_need(_manifest(raw), "manifest", CUSTOM_LAYOUT).read_bytes()).hexdigest()[:16]


def list_custom(raw: Path, options: dict[str, Any]) -> Listing:
    file = _manifest(raw)
    rows = read_manifest_csv(file, list(custom_modalities(raw)))
    declared = [c.strip() for c in options["classes"].split(",") if c.strip()]
    classes = declared or sorted({r["label"] for r in rows}, key=natural)
    return _finish(rows, classes, options, [f"manifest {file}"])


# ---- registration ------------------------------------------------------------------------------------------

def frames(num_frames: int, size: int = 224, fps: float = 1.0, color: bool = True) -> dict[str, Any]:
    return {"kind": "frames", "num_frames": num_frames, "size": size, "fps": fps, "color": color}


def OGM_ALPHA(alpha: float) -> dict[str, dict[str, float]]:  # noqa: N802 (reads as a constant)
    return {"ogm": {"alpha": alpha}, "ogm-ge": {"alpha": alpha}}


KS_FBANK = {"kind": "fbank"}
register(Adapter(
    name="kinetics-sounds", modalities=("audio", "visual"), layout=KS_LAYOUT,
    description="Kinetics-Sounds (31 classes in the OGM-GE lineage; the class list comes from the data or a file)",
    recipes={"ogmge-ks": NamedRecipe("ogmge-ks", 1, "Kaldi-style log-mel fbank (128 bins, 10 ms, 1024 frames, "
                                     "normalised); 3 frames at 1 fps, 224", {"audio": KS_FBANK, "visual": frames(3)})},
    default_recipe="ogmge-ks",
    options={**COMMON_OPTIONS, "class_list": "", "annotations": "", "clips": ""},
    list_clips=list_kinetics_sounds,
))
register(Adapter(
    name="cremad", modalities=("audio", "visual"), layout=CREMAD_LAYOUT,
    description="CREMA-D: 6 emotions from speech and face video (reference split 6698/744, val carved from train)",
    recipes={"ogmge-cremad": NamedRecipe("ogmge-cremad", 1, "22,050 Hz, 3 s, log|STFT| 512/353 -> 257x188; "
                                         "1 frame at 1 fps, 224", {"audio": {"kind": "stft"}, "visual": frames(1)})},
    default_recipe="ogmge-cremad",
    options={**COMMON_OPTIONS, "num_classes": 6, "val_fraction": 0.1111, "test_fraction": 0.1},
    list_clips=list_cremad,
    method_defaults=OGM_ALPHA(0.8),  # OGM-GE's CREMA-D setting
))
register(Adapter(
    name="ave", modalities=("audio", "visual"), layout=AVE_LAYOUT,
    description="AVE: 28 audio-visual events, 4143 clips, 3339/402/402, features from the event segment",
    recipes={"pmr-ave": NamedRecipe("pmr-ave", 1, "16 kHz event segment tiled to 10 s, log spectrogram 512/353, "
                                    "z-scored -> 257x1004; 3 frames at 1 fps inside the event, 224",
                                    {"audio": {"kind": "spectrogram"}, "visual": frames(3)})},
    default_recipe="pmr-ave",
    options={**COMMON_OPTIONS, "num_classes": 28},
    list_clips=list_ave,
))
register(Adapter(
    name="vggsound", modalities=("audio", "visual"), layout=VGGSOUND_LAYOUT,
    description="VGGSound: 309 classes of YouTube clips (missing downloads are reported and skipped)",
    recipes={"ogmge-vggsound": NamedRecipe("ogmge-vggsound", 1, "16 kHz, 5 s, log|STFT| 256/128 -> 129x626; "
                                           "3 frames at 1 fps, 224",
                                           {"audio": {"kind": "stft", "sample_rate": 16000, "duration": 5.0,
                                                      "n_fft": 256, "hop_length": 128}, "visual": frames(3)})},
    default_recipe="ogmge-vggsound",
    options={**COMMON_OPTIONS, "num_classes": 309, "val_fraction": 0.05, "clips": ""},
    list_clips=list_vggsound,
    method_defaults=OGM_ALPHA(0.1),  # OGM-GE's VGGSound setting
))
register(Adapter(
    name="ucf101", modalities=("rgb", "flow"), layout=UCF_LAYOUT,
    description="UCF-101: 101 actions, RGB frames and dense optical flow (OpenCV, or precomputed flow frames)",
    recipes={"rgb-flow": NamedRecipe("rgb-flow", 1, "3 RGB frames evenly spaced, 224; Farnebäck flow at 3 "
                                     "positions, ±20 px -> uint8, 224",
                                     {"rgb": frames(3, fps=0.0), "flow": {"kind": "flow"}})},
    default_recipe="rgb-flow",
    options={**COMMON_OPTIONS, "num_classes": 101, "fold": 1, "flow_dir": ""},
    list_clips=list_ucf101,
))
register(Adapter(
    name="cefa", modalities=("rgb", "depth", "ir"), layout=CEFA_LAYOUT,
    description="CASIA-SURF CeFA: face anti-spoofing (live/spoof) from RGB, depth and IR images",
    recipes={"cefa-112": NamedRecipe("cefa-112", 1, "1 frame per modality, 112x112 (RGB colour, depth and IR grey)",
                                     {"rgb": frames(1, 112, 0.0), "depth": frames(1, 112, 0.0, False),
                                      "ir": frames(1, 112, 0.0, False)})},
    default_recipe="cefa-112",
    options={**COMMON_OPTIONS, "num_classes": 2, "protocol": ""},
    list_clips=list_cefa,
))
register(Adapter(
    name="custom", modalities=(), layout=CUSTOM_LAYOUT,
    description="your own data: a CSV manifest id,label,split,<modality>_path... (pass --root FILE.csv)",
    recipes={"default": NamedRecipe("default", 1, "audio: log-mel 16 kHz 1 s 40 bins; flow: Farnebäck; "
                                    "others: 1 frame, 224, colour; override with --recipe MODALITY.KEY=VALUE", {})},
    default_recipe="default",
    options={**COMMON_OPTIONS, "classes": ""},
    list_clips=list_custom,
    modalities_for=custom_modalities,
    fingerprint=custom_fingerprint,
))
