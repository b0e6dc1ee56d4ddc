"""The built-in dataset av-digits: spoken digits (espeak-ng) paired with handwritten digits (sklearn).

Generation writes real media files (wav, png frames) and a CSV manifest, which then go through the
same `prepare_cache` as real datasets. Everything is drawn from seeded numpy Generators, so the same
parameters give byte-identical files (for a given espeak-ng version, recorded in generation.json).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from pdmp_cli.config import DataConfig, stable_hash
from pdmp_cli.data.base import DATASETS, DatasetSpec, FeatureCache
from pdmp_cli.data.cache import SPLITS, open_cache, prepare_cache, publish_dir
from pdmp_cli.data.recipes import AudioRecipe, VisualRecipe
from pdmp_cli.errors import PdmpError
from pdmp_cli.ui import progress_bar

NAME = "av-digits"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ESPEAK_RATE = 22050  # espeak-ng's native output rate; wavs are written at it
# Voice *files*, not language names: espeak-ng 1.51 ignores the +variant of `-v en-gb+m3` (same output
# as plain en-gb), but honours `-v gmw/en+m3`. en-US-nyc is left out: most digits come out
# byte-identical to en-US, which would put one voice in two splits.
LANGUAGE_VOICES = ("gmw/en", "gmw/en-US", "gmw/en-GB-scotland", "gmw/en-GB-x-gbclan", "gmw/en-GB-x-rp",
                   "gmw/en-GB-x-gbcwmd", "gmw/en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt", "klatt2",
            "klatt3", "klatt4", "Annie", "Andy", "belinda", "benjamin", "david", "linda", "steph", "quincy", "john",
            "rob", "max", "paul")  # checked: pairwise distinct output

# Parameters shared by every preset. Bump "version" when the generator's code changes its output.
GENERATION_DEFAULTS = {
    "version": 1,
    "seed": 0,
    "samples": 3000,
    "split_fractions": [0.6, 0.2, 0.2],
    # A speaker is a variant (timbre); the accents are shared. Splits get disjoint variants, so no
    # timbre heard in training is heard in validation or test.
    "accents": list(LANGUAGE_VOICES),
    "variants": list(VARIANTS),
    "speed_wpm": [130, 200],  # uniform integer ranges, inclusive
    "pitch": [30, 70],
    "clip_seconds": 1.0,
    "frames": 3,
    "image_size": 28,
    "jitter_px": 2,
}
# The data presets: which modality is stronger. Edit here; every value is hashed into the data.
PRESETS = {
    "audio-dominant": {"snr_db": -10.0, "image_noise": 0.6, "occlusion": 0.5},
    "balanced": {"snr_db": -12.5, "image_noise": 0.45, "occlusion": 0.4},
    "visual-dominant": {"snr_db": -17.0, "image_noise": 0.3, "occlusion": 0.3},
}
DEFAULT_PRESET = "audio-dominant"
# Preprocessing of the generated files; bump RECIPE_VERSION when feature code changes its output.
AUDIO_RECIPE = AudioRecipe(sample_rate=16000, duration=1.0, n_fft=512, hop_length=256, n_mels=40)
VISUAL_RECIPE = VisualRecipe(num_frames=1, size=28, color=False)
RECIPE_VERSION = 1


def generation_params(cfg: DataConfig) -> dict:
    preset = cfg.preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise PdmpError(f"unknown preset {preset!r} for {NAME}; choose one of {', '.join(PRESETS)}")
    params = {**GENERATION_DEFAULTS, **PRESETS[preset]}
    if cfg.samples is not None:
        params["samples"] = cfg.samples
    return params


def recipe(cfg: DataConfig) -> dict:
    if cfg.recipe:
        raise PdmpError(f"{NAME} has one fixed recipe (its presets choose the data); --recipe applies to the real "
                        f"datasets and custom manifests")
    return {
        "dataset": NAME,
        "generation": generation_params(cfg),
        "audio": dataclasses.asdict(AUDIO_RECIPE),
        "visual": dataclasses.asdict(VISUAL_RECIPE),
        "version": RECIPE_VERSION,
    }


# ---------------------------------------------------------------------------------------------- plan

def _split_counts(n: int, fractions: list[float]) -> list[int]:
    train, val = round(n * fractions[0]), round(n * fractions[1])
    return [train, val, n - train - val]


def make_plan(params: dict, targets: np.ndarray) -> list[dict]:
    """Who says which digit next to which image: disjoint voices and images per split, balanced labels."""
    rng = np.random.default_rng(params["seed"])
    variants = [params["variants"][i] for i in rng.permutation(len(params["variants"]))]
    v_train, v_val, _ = _split_counts(len(variants), params["split_fractions"])
    split_variants = (variants[:v_train], variants[v_train:v_train + v_val], variants[v_train + v_val:])
    split_voices = {split: [f"{accent}+{v}" for v in chosen for accent in params["accents"]]
                    for split, chosen in zip(SPLITS, split_variants)}
    split_images: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    for digit in range(10):  # stratified, so every split has images of every digit
        idx = rng.permutation(np.flatnonzero(targets == digit))
        a, b, _ = _split_counts(len(idx), params["split_fractions"])
        for split, part in zip(SPLITS, (idx[:a], idx[a:a + b], idx[a + b:])):
            split_images[split][digit] = part
    plan = []
    for split, n in zip(SPLITS, _split_counts(params["samples"], params["split_fractions"])):
        used = [0] * 10
        for digit in rng.permutation(np.arange(n) % 10):
            pool = split_images[split][digit]
            image = int(pool[used[digit] % len(pool)])  # cycle the pool: every image used before any repeats
            used[digit] += 1
            plan.append({
                "id": f"{len(plan):05d}",
                "label": int(digit),
                "split": split,
                "voice": split_voices[split][rng.integers(len(split_voices[split]))],
                "speed": int(rng.integers(params["speed_wpm"][0], params["speed_wpm"][1] + 1)),
                "pitch": int(rng.integers(params["pitch"][0], params["pitch"][1] + 1)),
                "image_index": image,
            })
    return plan


# -------------------------------------------------------------------------------------------- speech

def espeak_version() -> str:
    if shutil.which("espeak-ng") is None:
        raise PdmpError("espeak-ng not found (it speaks the av-digits audio); install it with "
                        "`apt-get install espeak-ng` or `make setup`")
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False).stdout
    return out.split("Data at")[0].strip()


def _utterance_name(sample: dict) -> str:
    return f"{sample['voice'].replace('/', '_')}_s{sample['speed']}_p{sample['pitch']}_{WORDS[sample['label']]}.wav"


def _speak(sample: dict, path: Path) -> None:
    if path.exists():
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}.wav")
    cmd = ["espeak-ng", "-v", sample["voice"], "-s", str(sample["speed"]), "-p", str(sample["pitch"]),
           "-w", str(tmp), WORDS[sample["label"]]]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not tmp.exists():
        raise PdmpError(f"espeak-ng failed ({' '.join(cmd)}): {result.stderr.strip() or result.returncode}; "
                        "check the espeak-ng installation (`apt-get install espeak-ng`)")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- samples

def _audio_clip(speech: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    loud = np.flatnonzero(np.abs(speech) > 0.02 * np.abs(speech).max())
    clip_len = int(round(ESPEAK_RATE * params["clip_seconds"]))
    speech = speech[loud[0]:loud[-1] + 1][:clip_len]  # espeak pads with silence; keep the word
    offset = int(rng.integers(0, clip_len - len(speech) + 1))
    clip = np.zeros(clip_len)
    clip[offset:offset + len(speech)] = speech
    noise_power = np.mean(np.square(speech)) / 10 ** (params["snr_db"] / 10)
    clip += rng.standard_normal(clip_len) * np.sqrt(noise_power)
    return clip * (0.9 / np.abs(clip).max())  # fixed peak: no clipping in 16-bit PCM


def _frames(image8: np.ndarray, params: dict, rng: np.random.Generator) -> list[np.ndarray]:
    size, jitter = params["image_size"], params["jitter_px"]
    image = cv2.resize(image8.astype(np.float32) / 16.0, (size, size), interpolation=cv2.INTER_LINEAR)
    side = int(round(params["occlusion"] * size))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))  # one occluder per clip, fixed in the scene
    frames = []
    for _ in range(params["frames"]):
        dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, 2))
        frame = cv2.warpAffine(image, np.float32([[1, 0, dx], [0, 1, dy]]), (size, size), borderValue=0)
        frame[top:top + side, left:left + side] = 0.0
        frame = frame + rng.normal(0.0, params["image_noise"], frame.shape)
        frames.append(np.round(np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8))
    return frames


def _write_sample(sample: dict, index: int, params: dict, speech_path: Path, image8: np.ndarray, out: Path) -> None:
    import soundfile as sf

    rng = np.random.default_rng([params["seed"], index])  # per sample: same bytes whatever the thread order
    speech, rate = sf.read(speech_path, dtype="float64")
    if rate != ESPEAK_RATE or speech.ndim != 1 or not np.any(speech):
        raise PdmpError(f"unexpected espeak-ng output {speech_path} ({rate} Hz); delete it and re-run")
    sf.write(out / "audio" / f"{sample['id']}.wav", _audio_clip(speech, params, rng), ESPEAK_RATE, subtype="PCM_16")
    folder = out / "visual" / sample["id"]
    folder.mkdir(parents=True)
    for t, frame in enumerate(_frames(image8, params, rng)):
        cv2.imwrite(str(folder / f"frame_{t:03d}.png"), frame)


def generate(params: dict, raw: Path, speech_root: Path, quiet: bool = False, workers: int = 2) -> None:
    """Write the raw layout of `params` into `raw` (built aside, renamed into place when complete)."""
    from sklearn.datasets import load_digits

    version = espeak_version()
    digits = load_digits()
    plan = make_plan(params, digits.target)
    speech_dir = speech_root / stable_hash({"espeak": version, "rate": ESPEAK_RATE})
    speech_dir.mkdir(parents=True, exist_ok=True)
    utterances = {_utterance_name(s): s for s in plan}
    tmp = raw.parent / f".tmp-{raw.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "audio").mkdir(parents=True)
    try:
        with progress_bar(quiet) as bar, ThreadPoolExecutor(workers) as pool:
            task = bar.add_task(f"speaking {NAME} (espeak-ng)", total=len(utterances))
            for _ in pool.map(lambda item: _speak(item[1], speech_dir / item[0]), utterances.items()):
                bar.advance(task)
            task = bar.add_task(f"writing {NAME}", total=len(plan))
            jobs = [(s, i, params, speech_dir / _utterance_name(s), digits.images[s["image_index"]], tmp)
                    for i, s in enumerate(plan)]
            for _ in pool.map(lambda job: _write_sample(*job), jobs):
                bar.advance(task)
        with open(tmp / "manifest.csv", "w", newline="") as f:
            fields = ["id", "label", "split", "audio_path", "visual_path", "voice", "speed", "pitch", "image_index"]
            writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            for s in plan:
                writer.writerow({**s, "audio_path": f"audio/{s['id']}.wav", "visual_path": f"visual/{s['id']}"})
        (tmp / "generation.json").write_text(json.dumps({**params, "espeak_version": version}, indent=2))
        publish_dir(tmp, raw, "generation.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(cfg: DataConfig, quiet: bool = False, workers: int | None = None, strict: bool = False) -> FeatureCache:
    base = Path(cfg.root) / NAME
    full_recipe = recipe(cfg)
    cache_parent = base / "cache"
    existing = cache_parent / stable_hash(full_recipe)
    if (existing / "manifest.json").is_file():  # ready: needs neither the raw files nor espeak-ng
        return open_cache(existing)
    params = full_recipe["generation"]
    raw = base / "raw" / stable_hash(params)
    if not (raw / "generation.json").is_file():
        raw.parent.mkdir(parents=True, exist_ok=True)
        generate(params, raw, base / "speech", quiet)
    return prepare_cache(cache_parent, raw / "manifest.csv", {"audio": AUDIO_RECIPE, "visual": VISUAL_RECIPE},
                         full_recipe, dataset=NAME, preset=cfg.preset or DEFAULT_PRESET,
                         classes=[str(d) for d in range(10)], quiet=quiet, workers=workers, strict=strict)


DATASETS.register(NAME)(DatasetSpec(
    name=NAME,
    description="spoken digits (espeak-ng, many voices, noise) paired with handwritten digit clips (sklearn); "
                "generated offline, deterministic",
    modalities=("audio", "visual"),
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    train_defaults={"epochs": 15, "batch_size": 64, "lr": 0.05, "scheduler": "step", "step_epoch": 10},
    model_defaults={},
    method_defaults={"pdmp": {"gamma_p": 3.0, "gamma_r": 0.25}, "ogm-ge": {"alpha": 0.1}, "ogm": {"alpha": 0.1}},
    build=build,
    recipe=recipe,
))
