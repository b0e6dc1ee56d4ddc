"""rank, train, compare: library functions behind the CLI (tests call them directly).

Every run goes through `train_run`, which resolves nothing itself: it receives a RunConfig,
writes config.json, calls engine.fit and writes result.json (layout.py names the files).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pdmp_cli import __version__
from pdmp_cli.config import DataConfig, RunConfig, dataset_key, resolve_config
from pdmp_cli.data import get_dataset, load_dataset, recipe_hash_for
from pdmp_cli.data.base import check_preset
from pdmp_cli.errors import PdmpError, RunInterrupted, TrainingDiverged
from pdmp_cli.faults import kill_point
from pdmp_cli.layout import (CHECKPOINT, CONFIG, FAILED, RESULT, STATE, Layout, RunLock, file_sha256, fs_error,
                             fsync_dir, is_temp_file, read_json, run_name, timestamp, write_json)
from pdmp_cli.methods import get_method
from pdmp_cli.methods.base import PROVIDED_PARAMS
from pdmp_cli.ui import console, progress_bar



@dataclass
class Session:
    """What every command shares: where runs go, how loud to be, the command line to record."""

    layout: Layout
    quiet: bool = False
    argv: list[str] = field(default_factory=lambda: list(sys.argv))

    def say(self, message: str) -> None:
        if not self.quiet:
            console.print(message)


now = timestamp


PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "pandas", "librosa", "soundfile", "opencv-python-headless", "av",
            "typer", "rich", "matplotlib")


def git_state() -> dict[str, Any]:
    """Commit (and whether the tree has uncommitted changes) of the checkout pdmp runs from; None outside git."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != here.parent:  # an installed copy inside some other repository
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}


def environment() -> dict[str, Any]:
    """What produced a run: versions of pdmp, Python and the packages, the code's git commit, the machine."""
    import importlib.metadata

    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"pdmp": __version__, **git_state(), "python": platform.python_version(), "torch": torch.__version__,
            "packages": {name: version(name) for name in PACKAGES}, "platform": platform.platform(),
            "host": platform.node(), "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ---- dataset choice ------------------------------------------------------------------------------

def data_config(session: Session, dataset: str | None, preset: str | None = None, samples: int | None = None,
                root: str = "datasets", raw_root: str | None = None, recipe: dict[str, Any] | None = None) -> DataConfig:
    """The dataset a command works on: the one named, else the one ranked last, else av-digits."""
    if dataset is None and session.layout.last_dataset_file.exists():
        last = read_json(session.layout.last_dataset_file)
        cfg = DataConfig(dataset=last["dataset"], preset=preset or last.get("preset"),
                         samples=samples if samples is not None else last.get("samples"), root=root,
                         raw_root=raw_root or last.get("raw_root"),
                         recipe=recipe if recipe else dict(last.get("recipe") or {}))
        session.say(f"[dim]Using dataset {key_of(cfg)} (ranked last: {last['dataset_key']}; "
                    f"pass --dataset to choose).[/dim]")
        return cfg
    cfg = DataConfig(dataset=dataset or "av-digits", preset=preset, samples=samples, root=root, raw_root=raw_root,
                     recipe=dict(recipe or {}))
    spec = get_dataset(cfg.dataset)  # unknown names fail here, before any work
    if cfg.preset is None:
        cfg.preset = spec.default_preset
    check_preset(spec, cfg.preset)
    if spec.recipe is not None:
        spec.recipe(cfg)  # a bad --recipe option fails here, before any work
    return cfg


def key_of(data: DataConfig) -> str:
    return dataset_key(data, get_dataset(data.dataset).default_preset)


def rank_command(data: DataConfig) -> str:
    spec = get_dataset(data.dataset)
    cmd = f"pdmp rank --dataset {data.dataset}"
    if data.preset and data.preset != spec.default_preset:
        cmd += f" --preset {data.preset}"
    if data.samples is not None:
        cmd += f" --samples {data.samples}"
    if data.raw_root:
        cmd += f" --root {data.raw_root}"
    cmd += "".join(f" --recipe {k}={v}" if k != "name" else f" --recipe {v}" for k, v in sorted(data.recipe.items()))
    return cmd


# ---- one run -------------------------------------------------------------------------------------

def tag(diffs: dict[str, Any]) -> str:
    return "".join(f"+{k}={v:g}" if isinstance(v, float) else f"+{k}={v}" for k, v in sorted(diffs.items()))


def variant_tag(cfg: RunConfig) -> str:
    """`+k=v` for each method hyperparameter that differs from the dataset's defaults ("" if none)."""
    spec, method_cls = get_dataset(cfg.data.dataset), get_method(cfg.method.name)
    given = {k: cfg.method.params[k] for k in PROVIDED_PARAMS if k in cfg.method.params}
    defaults = method_cls.resolve_params({**spec.method_defaults.get(cfg.method.name, {}), **given}, cfg)
    return tag({k: v for k, v in cfg.method.params.items() if k not in given and v != defaults.get(k)})


def setting_tag(cfg: RunConfig) -> str:
    """`+k=v` for each model, optimiser or protocol option that differs from the dataset's defaults."""
    def options(c: RunConfig) -> dict[str, Any]:
        model = {k: v for k, v in dataclasses.asdict(c.model).items() if k != "fusion"}
        augment = {f"augment.{k}": v for k, v in dataclasses.asdict(c.augment).items()}  # changes what is trained
        return {**model, **dataclasses.asdict(c.optim), **augment, "select_split": c.select_split,
                "select_metric": c.select_metric}

    default = resolve_config(dataset=cfg.data.dataset, method=cfg.method.name, data=dataclasses.asdict(cfg.data),
                             method_params=cfg.method.params, model={"fusion": cfg.model.fusion},
                             modalities=cfg.modalities, device=cfg.device)
    mine, base = options(cfg), options(default)
    return tag({k: v for k, v in mine.items() if v != base[k]})


def train_dir_for(session: Session, cfg: RunConfig) -> Path:
    """runs/<dataset>/train/<variant>-<fusion>[+options]-s<seed>: the one place multimodal runs are named."""
    name = run_name(cfg.method.name + variant_tag(cfg), cfg.model.fusion + setting_tag(cfg), cfg.seed)
    return session.layout.train_run(key_of(cfg.data), name)


def finished_result(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The run's result when it finished with this exact config and recipe; None when it has not finished."""
    if not (run_dir / RESULT).exists():
        return None
    result = read_json(run_dir / RESULT)
    if result["config_hash"] != cfg.hash():
        raise PdmpError(f"{run_dir} holds a finished run with a different config; pass --force to replace it "
                        f"or --runs-dir to keep both")
    same_process_count(run_dir, cfg, result.get("world_size", 1))
    if result["recipe_hash"] != recipe_hash_for(cfg.data):
        raise PdmpError(f"{run_dir} was trained on features of another recipe ({result['recipe_hash']}); "
                        f"pass --force to retrain it on the current one or --runs-dir to keep both")
    return result


def same_process_count(run_dir: Path, cfg: RunConfig, recorded: int) -> None:
    """--no-sync-bn normalises by each process's share, so the result depends on how many processes train.
    The config hash leaves the process count out (it stays a function of the config alone, which report and
    compare recompute in one process); instead, such a run is neither reused nor resumed with another count."""
    from pdmp_cli import distributed

    now_size = distributed.world().size
    if not cfg.sync_bn and recorded != now_size:
        raise PdmpError(f"{run_dir.name} was trained by {recorded} process(es) with --no-sync-bn, whose BatchNorm "
                        f"statistics depend on the process count; use --nproc {recorded}, or pass --force to train it "
                        f"again with {now_size}")


def staging_dir(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.partial")


def replaced_dir(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.old")


def train_run(session: Session, cfg: RunConfig, run_dir: Path, force: bool = False, label: str | None = None) -> dict[str, Any]:
    """Train one run into run_dir unless it already finished with the same config.

    The run is built in a staging folder beside run_dir (`.<run>.partial`), under a lock that keeps
    every other process out, and renamed into place when it has finished. The staging folder holds
    the training state of the last finished epoch: after a crash, a kill or Ctrl-C, the same call
    continues from there. --force starts over, and the old finished run goes only when the new one is done.

    With several processes (torchrun, --nproc), rank 0 does all of this and tells the others when to train
    (distributed.lead/release/follow); they read state.pt to resume but never write the run directory.
    """
    from pdmp_cli import distributed

    if not distributed.is_main():
        return follow_main(session, cfg)
    return distributed.lead(lambda: _train_run(session, cfg, run_dir, force, label))


def follow_main(session: Session, cfg: RunConfig) -> dict[str, Any]:
    """A process other than rank 0: train when rank 0 has prepared the run directory, or end as it ended."""
    from pdmp_cli import distributed
    from pdmp_cli.engine import fit

    data = load_dataset(cfg.data, quiet=True)  # before waiting: preparing a cache may outlast a collective's timeout
    told = distributed.follow()
    if "error" in told:  # rank 0 reported it already: this process only ends with it (launch prints it once)
        raise distributed.PeerLost(f"process 0 stopped the run: {told['error']}")
    if "result" in told:
        return told["result"]
    return {"config_hash": cfg.hash(), **fit(cfg, data, Path(told["staging"]))}  # rank 0 writes result.json


def _train_run(session: Session, cfg: RunConfig, run_dir: Path, force: bool, label: str | None) -> dict[str, Any]:
    if not force:
        done = finished_result(run_dir, cfg)
        if done is not None:
            return done
    with RunLock(run_dir) as lock:
        if lock.stale:
            session.say(f"[dim]took over the lock of {run_dir.name} left by pid {lock.stale.get('pid')} on "
                        f"{lock.stale.get('host')} (no longer running)[/dim]")
        restore_interrupted_replacement(run_dir)
        if not force:  # another process may have finished it between our first look and the lock
            done = finished_result(run_dir, cfg)
            if done is not None:
                return done
        return _train_locked(session, cfg, run_dir, force, label)


def restore_interrupted_replacement(run_dir: Path) -> None:
    """A --force replacement killed between its two renames left the old run aside: put it back."""
    old, staging = replaced_dir(run_dir), staging_dir(run_dir)
    if old.exists() and not run_dir.exists() and not (staging / RESULT).exists():
        guard_os(run_dir, lambda: os.replace(old, run_dir))


def guard_os(path: Path, action: Any) -> Any:
    try:
        return action()
    except OSError as exc:
        raise fs_error(path, exc) from exc


def partial_config(staging: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The config record of a partial run of this very config (and recipe); None when there is none."""
    if not (staging / CONFIG).exists():
        return None
    try:
        record = read_json(staging / CONFIG)
    except PdmpError:
        return None
    if record["config_hash"] != cfg.hash() or record["recipe_hash"] != recipe_hash_for(cfg.data):
        if (staging / STATE).exists():
            raise PdmpError(f"{staging} holds an unfinished run of another config or recipe; pass --force to "
                            f"discard it, or --runs-dir to keep both")
        return None
    return record


def _train_locked(session: Session, cfg: RunConfig, run_dir: Path, force: bool, label: str | None) -> dict[str, Any]:
    staging = staging_dir(run_dir)
    record = None if force else partial_config(staging, cfg)
    if record is not None:
        same_process_count(run_dir, cfg, record.get("world_size", 1))
    if record is not None and (staging / RESULT).exists():  # finished, killed before its rename
        publish(staging, run_dir)
        return read_json(run_dir / RESULT)
    if record is not None and (staging / FAILED).exists():
        failed = read_json(staging / FAILED)
        raise PdmpError(f"{run_dir.name} failed earlier in epoch {failed['epoch']} ({failed['error']}); its last good "
                        f"state is kept in {staging}; change the settings, or pass --force to train it again")
    data = load_dataset(cfg.data, quiet=session.quiet)
    from pdmp_cli import distributed
    from pdmp_cli.engine import fit, load_checkpoint, resolve_device  # torch-heavy; imported only when training

    if record is None:
        guard_os(staging, lambda: (shutil.rmtree(staging, ignore_errors=True), staging.mkdir(parents=True)))
        record = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "recipe_hash": data.recipe_hash,
                  "recipe": data.manifest.get("recipe"), "cache": str(data.path), "command": session.argv, "seed": cfg.seed,
                  "deterministic": cfg.deterministic, "device": str(resolve_device(cfg.device)),
                  "world_size": distributed.world().size, "environment": environment(), "started": now(), "resumed": []}
        session.say(f"[bold]train[/bold] {label or run_dir.name} → {run_dir}")
    else:
        for leftover in staging.iterdir():  # temp files of writes that a kill interrupted
            if is_temp_file(leftover):
                leftover.unlink(missing_ok=True)
        record["resumed"] = [*record.get("resumed", []), {"at": now(), "command": session.argv,
                                                         "device": str(resolve_device(cfg.device)),
                                                         "world_size": distributed.world().size,
                                                         "environment": environment()}]
        session.say(f"[bold]train[/bold] {label or run_dir.name} → {run_dir} [dim](resuming the run saved in "
                    f"{staging.name})[/dim]")
    try:
        write_json(staging / CONFIG, record)
        distributed.release(str(staging))
        with progress_bar(session.quiet, transient=True) as progress:
            outcome = fit(cfg, data, staging, progress)
    except TrainingDiverged as exc:
        write_json(staging / FAILED, {"error": str(exc), "epoch": exc.epoch, "failed": now(),
                                      "last_good_epoch": exc.epoch - 1 if (staging / STATE).exists() else None})
        raise PdmpError(f"{run_dir.name}: {exc} (marked failed in {staging / FAILED}; the last good epoch's state is "
                        f"kept there)") from None
    except KeyboardInterrupt:
        if not (staging / STATE).exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise RunInterrupted(f"interrupted before the first epoch of {run_dir.name} finished; nothing to keep") from None
        saved = load_checkpoint(staging / STATE, ("epoch",))["epoch"] + 1
        raise RunInterrupted(f"interrupted: {saved} of {cfg.optim.epochs} epochs of {run_dir.name} are saved in "
                             f"{staging}; re-run the same command to continue") from None
    except BaseException:
        if not (staging / STATE).exists():  # nothing worth resuming: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
        raise
    result = {
        "run": run_dir.name, "dataset": cfg.data.dataset, "dataset_key": key_of(cfg.data), "preset": cfg.data.preset,
        "recipe_hash": data.recipe_hash, "config_hash": cfg.hash(), "setting_hash": cfg.setting_hash(),
        "method": cfg.method.name, "variant": cfg.method.name + variant_tag(cfg), "setting_tag": setting_tag(cfg),
        "fusion": cfg.model.fusion, "uses_fusion": get_method(cfg.method.name).uses_fusion,
        "encoder": cfg.model.encoder, "modalities": cfg.modalities or data.modalities, "seed": cfg.seed, **outcome,
        "command": session.argv, "started": record["started"], "resumed": record["resumed"], "finished": now(),
    }
    write_json(staging / RESULT, result)
    publish(staging, run_dir)
    t = outcome["test"]
    session.say(f"  test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f} "
                f"(checkpoint of epoch {outcome['best_epoch']}, selected on {cfg.select_split})")
    return result


def publish(staging: Path, run_dir: Path) -> None:
    """Move a finished staging folder into place; under --force the old run goes only now."""
    def move() -> None:
        (staging / STATE).unlink(missing_ok=True)  # the resume point is of no use once result.json exists
        old = replaced_dir(run_dir)
        shutil.rmtree(old, ignore_errors=True)  # left by a replacement that was interrupted
        if run_dir.exists():
            os.replace(run_dir, old)
            kill_point("publish")
            os.replace(staging, run_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, run_dir)
        fsync_dir(run_dir.parent)

    guard_os(run_dir, move)


def resolve_train_config(session: Session, data: DataConfig, method: str, method_params: dict[str, Any],
                         ranking: list[str] | None = None, **options: Any) -> RunConfig:
    """RunConfig for a multimodal run; methods that need a ranking get it from rank.json (or by hand)."""
    from pdmp_cli.methods.base import UNUSED_FUSION
    from pdmp_cli.models import FUSIONS

    method_params = dict(method_params)
    if get_method(method).unimodal:
        raise PdmpError(f"method {method!r} trains one modality; `pdmp rank` trains it for every modality")
    if not get_method(method).uses_fusion:  # every fusion gives the same run: built and named with one
        FUSIONS.get(options.get("model", {}).get("fusion", UNUSED_FUSION))  # a wrong name is still an error
        options["model"] = {**options.get("model", {}), "fusion": UNUSED_FUSION}
    if get_method(method).needs_ranking:
        if ranking:
            method_params.update(ranking=list(ranking), ranking_source="manual")
        else:
            method_params.update(read_ranking(session, data, options.get("modalities")))
    if get_method(method).needs_unimodal_models:
        method_params.update(unimodal_checkpoints(session, data, options.get("modalities"), options.get("seed", 0)))
    return resolve_config(dataset=data.dataset, method=method, data=dataclasses.asdict(data), method_params=method_params,
                          **options)


def read_ranking(session: Session, data: DataConfig, modalities: list[str] | None = None) -> dict[str, Any]:
    path = session.layout.rank_json(key_of(data))
    if not path.exists():
        raise PdmpError(f"no ranking for {key_of(data)} at {path}; run `{rank_command(data)}` first "
                        f"(or give one with --ranking)")
    rank = read_json(path)
    expected = recipe_hash_for(data)
    if rank["dataset"] != data.dataset or rank["recipe_hash"] != expected:
        raise PdmpError(f"{path} was made for {rank['dataset_key']} (recipe {rank['recipe_hash']}), not "
                        f"{key_of(data)} (recipe {expected}); run `{rank_command(data)}` again")
    wanted = list(modalities or get_dataset(data.dataset).modalities_of(data))
    if sorted(map(str, rank["ranking"])) != sorted(wanted):
        raise PdmpError(f"{path} ranks the modalities {','.join(map(str, rank['ranking']))}, but the run uses "
                        f"{','.join(wanted)}; run `{rank_command(data)}` again (or give one with --ranking)")
    return {"ranking": rank["ranking"], "ranking_source": f"{path} ({rank['created']})"}


def unimodal_checkpoints(session: Session, data: DataConfig, modalities: list[str] | None, seed: int) -> dict[str, Any]:
    """Rank's unimodal checkpoints of `seed` (same seed as the run) for methods built on them (UME, UMT):
    their SHA-256 (part of the run's identity) and paths (provenance, outside the config hash)."""
    key, expected = key_of(data), recipe_hash_for(data)
    sha, source = {}, {}
    for m in modalities or get_dataset(data.dataset).modalities_of(data):
        run = session.layout.rank_run(key, m, seed)
        if not (run / CHECKPOINT).exists() or not (run / RESULT).exists():
            raise PdmpError(f"no unimodal model of {m} for seed {seed} ({run / CHECKPOINT} is missing); run "
                            f"`{rank_command(data)} --seeds {seed + 1}` first")
        if read_json(run / RESULT)["recipe_hash"] != expected:
            raise PdmpError(f"{run} was trained on features of another recipe; run `{rank_command(data)} "
                            f"--seeds {seed + 1} --force` again")
        sha[m] = file_sha256(run / CHECKPOINT)
        source[m] = str((run / CHECKPOINT).absolute())  # absolute: workers (Ray) may run elsewhere
    return {"unimodal_sha256": sha, "unimodal_source": source}


# ---- rank ------------------------------------------------------------------------------------------

def rank_modalities(scores: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Best first; ties are broken by the order of `scores` (the dataset's modality order) and listed."""
    order = list(scores)
    ranking = sorted(order, key=lambda m: (-scores[m], order.index(m)))
    return ranking, [[a, b] for a, b in zip(ranking, ranking[1:]) if scores[a] == scores[b]]


def rank(session: Session, data: DataConfig, seeds: list[int], metric: str = "accuracy", split: str = "val",
         force: bool = False, **options: Any) -> dict[str, Any]:
    """Train one unimodal model per modality and seed; write rank.json with scores and the ranking."""
    if metric not in ("accuracy", "macro_f1"):
        raise PdmpError(f"--metric must be accuracy or macro-f1 (got {metric!r})")
    if split not in ("val", "test"):
        raise PdmpError(f"--split must be val or test (got {split!r})")
    spec, key = get_dataset(data.dataset), key_of(data)
    modalities = list(options.pop("modalities", None) or spec.modalities_of(data))
    options["model"] = {**options.get("model", {}), "fusion": "concat"}  # a unimodal model is a linear head
    scores, tests, configs = {}, {}, {}
    for m in modalities:
        scores[m], tests[m] = {}, {}
        for seed in seeds:
            cfg = resolve_config(dataset=data.dataset, method="unimodal", data=dataclasses.asdict(data),
                                 modalities=[m], seed=seed, **options)
            result = train_run(session, cfg, session.layout.rank_run(key, m, seed), force, label=f"unimodal {m} s{seed}")
            scores[m][seed] = result[split][metric]
            tests[m][seed] = {"accuracy": result["test"]["accuracy"], "macro_f1": result["test"]["macro_f1"]}
            configs[m] = cfg
    mean = {m: sum(v.values()) / len(v) for m, v in scores.items()}
    ranking, ties = rank_modalities(mean)
    example = configs[modalities[0]].to_dict()
    for k in ("seed", "modalities"):
        example.pop(k)
    out = {
        "dataset": data.dataset, "dataset_key": key, "preset": data.preset, "samples": data.samples,
        "recipe_hash": recipe_hash_for(data), "metric": metric, "split": split,
        "protocol": "validation split" if split == "val" else "test split (paper-lineage protocol)",
        "select_split": configs[modalities[0]].select_split,
        "seeds": seeds,
        "modalities": {m: {"score": mean[m], "per_seed": {str(s): v for s, v in scores[m].items()},
                           "test": {str(s): v for s, v in tests[m].items()}} for m in modalities},
        "ranking": ranking, "dominant": ranking[0], "ties": ties, "unimodal_config": example,
        "code_version": __version__, "environment": environment(), "command": session.argv, "created": now(),
    }
    write_json(session.layout.rank_json(key), out)
    write_json(session.layout.last_dataset_file, {"dataset": data.dataset, "preset": data.preset,
                                                  "samples": data.samples, "dataset_key": key,
                                                  "recipe": data.recipe, "raw_root": data.raw_root})
    return out


# ---- compare ---------------------------------------------------------------------------------------

def compare(session: Session, data: DataConfig | list[DataConfig], methods: list[str], fusions: list[str],
            seeds: list[int], method_params: dict[str, dict[str, Any]] | None = None, force: bool = False,
            ranking: list[str] | None = None, sweeps: dict[str, dict[str, list[Any]]] | None = None,
            workers: int = 1, backend: str = "local", address: str | None = None, threads: int | None = None,
            **options: Any) -> pd.DataFrame:
    """Run datasets × methods × swept hyperparameters × fusions × seeds, skipping finished runs.

    `workers` local processes or Ray tasks (`backend="ray"`) train the runs; each dataset's
    compare/results.csv gets one row per run. A run that fails is recorded with its error and the
    grid goes on; the command then fails, listing the failures (see grid.py, backends.py).
    """
    from pdmp_cli.grid import build_grid, run_grid

    datas = data if isinstance(data, list) else [data]
    grid = build_grid(session, datas, methods, fusions, seeds, method_params, sweeps, force, ranking, **options)
    return run_grid(session, grid, workers, backend, address, threads, force)


def result_row(result: dict[str, Any], run_dir: Path, status: str) -> dict[str, Any]:
    row = {"method": result["variant"], "fusion": result["fusion"], "seed": result["seed"], "status": status,
           "selected_on": result["selection"]["split"], "best_epoch": result["best_epoch"],
           "test_accuracy": result["test"]["accuracy"], "test_macro_f1": result["test"]["macro_f1"],
           "train_seconds": result.get("train_seconds")}
    row |= {f"test_acc_{m}": v for m, v in result["test"]["modality_accuracy"].items()}
    return row | {"run_dir": str(run_dir)}
