"""The grid of `pdmp compare`: datasets × methods × each method's swept hyperparameters × fusions × seeds.

`--set pdmp.gamma_p=1.5,2,3 --set pdmp.gamma_r=0.25,0.5` sweeps the cartesian product of the values
given for one method (six PDMP variants here); other methods run once per fusion and seed. Every
point is resolved to a RunConfig before anything trains, so a bad name or value fails at once, and
each point has its own run directory (experiments.train_dir_for names it from the options that
differ from the dataset's defaults).
"""
from __future__ import annotations

import itertools
import time
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdmp_cli.config import DataConfig, RunConfig
from pdmp_cli.errors import PdmpError


def parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a plain word, e.g. mode=lr


def parse_values(raw: str) -> list[Any]:
    """`1.5,2,3` → [1.5, 2, 3]; a JSON list (`[a, b]`) is one value, not a sweep."""
    if raw.lstrip().startswith("["):
        return [parse_value(raw)]
    values = [parse_value(v.strip()) for v in raw.split(",")]
    if any(v == "" for v in values):
        raise PdmpError(f"empty value in {raw!r}; give comma-separated values, e.g. 1.5,2,3")
    return values


def parse_sweeps(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, list[Any]]]:
    """`--set pdmp.gamma_p=1.5,2` → {"pdmp": {"gamma_p": [1.5, 2]}}; with one method the prefix may be left out."""
    out: dict[str, dict[str, list[Any]]] = {m: {} for m in methods}
    for item in items or []:
        key, sep, raw = item.partition("=")
        method, dot, name = key.rpartition(".")
        if not dot and len(methods) == 1:
            method = methods[0]
        if not sep or not name or method not in out:
            raise PdmpError(f"--set takes METHOD.KEY=VALUE[,VALUE…] with METHOD one of {', '.join(methods)} (got {item!r})")
        if name in out[method]:
            raise PdmpError(f"--set {method}.{name} is given twice; list all its values in one --set ({method}.{name}=a,b)")
        out[method][name] = parse_values(raw)
    return out


def variants(fixed: dict[str, Any], sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the swept values, each on top of the fixed hyperparameters."""
    keys = list(sweep)
    return [{**fixed, **dict(zip(keys, combo))} for combo in itertools.product(*(sweep[k] for k in keys))]


@dataclass
class GridRun:
    cfg: RunConfig
    run_dir: Path
    key: str  # dataset key (folder under the runs directory)
    finished: dict[str, Any] | None  # result.json of a run that already finished with this config

    @property
    def label(self) -> str:
        return f"{self.key}/{self.run_dir.name}"


def build_grid(session, datas: list[DataConfig], methods: list[str], fusions: list[str], seeds: list[int],
               method_params: dict[str, dict[str, Any]] | None = None,
               sweeps: dict[str, dict[str, list[Any]]] | None = None, force: bool = False,
               ranking: list[str] | None = None, **options: Any) -> list[GridRun]:
    """Resolve every point first: bad names, values and clashing finished runs fail before any training."""
    from pdmp_cli.experiments import finished_result, key_of, resolve_train_config, train_dir_for

    model_options = options.pop("model", {})
    grid: dict[Path, GridRun] = {}
    for data in datas:
        for method in methods:
            for params in variants((method_params or {}).get(method, {}), (sweeps or {}).get(method, {})):
                for fusion in fusions:
                    for seed in seeds:
                        cfg = resolve_train_config(session, data, method, params, ranking,
                                                   model={**model_options, "fusion": fusion}, seed=seed, **options)
                        run_dir = train_dir_for(session, cfg)
                        if run_dir in grid:  # e.g. a swept value equal to the default: the same run twice
                            continue
                        grid[run_dir] = GridRun(cfg, run_dir, key_of(data), None if force else finished_result(run_dir, cfg))
    return list(grid.values())


def job_config(cfg, pinned: bool) -> dict[str, Any]:
    """The run's config as a worker gets it: absolute paths (a Ray worker's directory is not ours) and,
    on a pinned GPU, device `cuda` (its only GPU). Neither path nor device is part of the run's identity."""
    config = cfg.to_dict()
    config["data"]["root"] = str(Path(cfg.data.root).resolve())
    if pinned:
        config["device"] = "cuda"
    return config


def default_threads(workers: int) -> int | None:
    """CPU threads per run: the cores divided between the workers (torch's default for one worker)."""
    from pdmp_cli.backends import cpu_count

    return None if workers == 1 else max(1, cpu_count() // workers)


def run_grid(session, grid: list[GridRun], workers: int = 1, backend: str = "local", address: str | None = None,
             threads: int | None = None, force: bool = False):
    """Train the unfinished points of `grid` on a backend; write each dataset's compare/results.csv.

    Returns the rows (one per point, in grid order). A failed run is recorded with its error and the
    others go on; the summary lists the failures and the command then fails (exit 2).
    """
    import pandas as pd
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pdmp_cli import backends
    from pdmp_cli.config import on_cuda
    from pdmp_cli.experiments import result_row, variant_tag
    from pdmp_cli.layout import write_json, write_text
    from pdmp_cli.ui import console, err_console

    if backend not in backends.BACKENDS:
        raise PdmpError(f"--backend must be one of {', '.join(backends.BACKENDS)} (got {backend!r})")
    if workers < 1:
        raise PdmpError(f"--workers must be >= 1 (got {workers})")
    if threads is not None and threads < 1:
        raise PdmpError(f"--threads-per-run must be >= 1 (got {threads})")
    if backend == "ray" and workers > 1:
        session.say("[yellow]--workers applies to the local backend; Ray runs as many tasks at once as the cluster fits[/yellow]")
    todo = [p for p in grid if p.finished is None]
    use_gpus = any(on_cuda(p.cfg.device) for p in todo)
    gpus = 0
    if backend == "local" and use_gpus and workers > 1:
        gpus = backends.gpu_count()
        if gpus == 0:
            raise PdmpError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        if workers > gpus:
            session.say(f"[yellow]{workers} workers asked for, {gpus} GPU(s) visible: one worker per GPU[/yellow]")
            workers = gpus
    if threads is None:
        threads = 1 if backend == "ray" else default_threads(workers)
    pinned = use_gpus and (gpus > 0 or backend == "ray")  # each run sees exactly one GPU, as cuda:0
    jobs = [backends.Job(i, job_config(p.cfg, pinned), str(p.run_dir.resolve()), str(session.layout.root.resolve()),
                         force, threads, session.argv)
            for i, p in enumerate(grid) if p.finished is None]

    rows: list[dict[str, Any]] = [
        ({"dataset": p.key} | result_row(p.finished, p.run_dir, "skipped")) if p.finished else {
            "dataset": p.key, "method": p.cfg.method.name + variant_tag(p.cfg), "fusion": p.cfg.model.fusion,
            "seed": p.cfg.seed, "status": "pending", "run_dir": str(p.run_dir)}
        for p in grid]
    keys = list(dict.fromkeys(p.key for p in grid))

    def write_csv() -> None:  # the parent alone writes it, after every outcome: a crash keeps the rest
        table = pd.DataFrame(rows)
        for key in keys:
            write_text(session.layout.compare_csv(key), table[table["dataset"] == key].to_csv(index=False))

    where = ("this process" if workers == 1 else f"{workers} worker processes") if backend == "local" else f"Ray ({address or 'default address'})"
    session.say(f"[bold]compare[/bold]: {len(grid)} runs, {len(grid) - len(jobs)} finished earlier (skipped), "
                f"{len(jobs)} to train on {where}" + (f", {threads} CPU threads each" if threads else ""))
    running: set[int] = set()
    tracebacks: dict[str, str] = {}
    counts = {"done": 0, "failed": 0}
    t0 = time.time()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta {task.fields[eta]}"), console=err_console, transient=False,
                        disable=session.quiet or not err_console.is_terminal)
    task = progress.add_task("", total=len(jobs), eta="-")
    active = "running" if backend == "local" else "submitted"

    def refresh() -> None:
        finished = counts["done"] + counts["failed"]
        left = len(jobs) - finished
        eta = "-" if not finished else f"{(time.time() - t0) / finished * left:.0f} s"
        progress.update(task, completed=finished, eta=eta,
                        description=f"runs: {counts['done']} done · {len(running)} {active} · {counts['failed']} failed")

    def started(index: int) -> None:
        running.add(index)
        refresh()

    def finished(outcome: dict[str, Any]) -> None:
        i = outcome["index"]
        running.discard(i)
        p = grid[i]
        if outcome["status"] == "trained":
            counts["done"] += 1
            rows[i] = ({"dataset": p.key} | result_row(outcome["result"], p.run_dir, "trained")
                       | {"seconds": round(outcome["seconds"], 1), "threads": outcome["threads"]})
            acc = outcome["result"]["test"]["accuracy"]
            message = f"[green]done[/green] {escape(p.label)}: test accuracy {acc:.4f} ({outcome['seconds']:.0f} s)"
        else:
            counts["failed"] += 1
            rows[i] |= {"status": "failed", "error": outcome["error"], "seconds": round(outcome["seconds"], 1)}
            tracebacks[p.label] = outcome.get("traceback", outcome["error"])
            message = f"[red]failed[/red] {escape(p.label)}: {escape(outcome['error'])}"
        n = counts["done"] + counts["failed"]
        if not session.quiet:  # one line per run: the log view when stderr is not a terminal
            progress.console.print(f"[{n}/{len(jobs)}] {message}")
        refresh()
        write_csv()

    write_csv()
    with progress:
        refresh()
        if not jobs:
            pass  # everything finished earlier
        elif backend == "ray":
            backends.run_ray(jobs, address, use_gpus, started, finished)
        elif workers == 1:
            backends.run_inline(jobs, started, finished)
        else:
            backends.run_local(jobs, workers, gpus, started, finished)
    elapsed = time.time() - t0
    failed = [(grid[i], r) for i, r in enumerate(rows) if r.get("status") == "failed"]
    session.say(f"{counts['done']} trained, {len(grid) - len(jobs)} skipped, {len(failed)} failed in {elapsed:.0f} s → "
                + ", ".join(str(session.layout.compare_csv(k)) for k in keys))
    for key in keys:  # full tracebacks of this grid's failures, for debugging (the CSV has one-line errors)
        mine = {label: tb for label, tb in tracebacks.items() if label.startswith(f"{key}/")}
        path = session.layout.compare_csv(key).with_name("failures.json")
        if mine:
            write_json(path, {"failures": mine})
        else:
            path.unlink(missing_ok=True)
    if failed:
        if not session.quiet:
            table = Table(title="failed runs", title_justify="left")
            table.add_column("run")
            table.add_column("error")
            for p, r in failed:
                table.add_row(escape(p.label), escape(r["error"]))
            console.print(table)
        summary = "; ".join(f"{p.label}: {r['error']}" for p, r in failed)
        raise PdmpError(f"{len(failed)} of {len(grid)} runs failed ({summary}); see "
                        + ", ".join(str(session.layout.compare_csv(k)) for k in keys))
    return pd.DataFrame(rows)
