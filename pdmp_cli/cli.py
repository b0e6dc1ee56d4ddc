"""The `pdmp` command line: a thin Typer layer over experiments.py and report.py.

Each command turns its options into library calls; errors become one line on stderr and exit 2
(Ctrl-C or SIGTERM: a line saying what was saved, and exit 130).
"""
from __future__ import annotations

import os
import re
import signal
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from pdmp_cli import __version__
from pdmp_cli.errors import PdmpError, RunInterrupted
from pdmp_cli.ui import console, err_console

try:  # typer vendors click (its own copy raises these); older typers use click itself
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

class PdmpGroup(typer.core.TyperGroup):
    """Turns PdmpError, a bad option value and a failed file operation into one line on stderr and exit
    code 2, and Ctrl-C into a line saying what was saved and exit code 130 (also under typer's CliRunner)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (PdmpError, UsageError, OSError) as exc:
            if os.environ.get("PDMP_DEBUG"):
                raise
            if isinstance(exc, UsageError):
                name = exc.ctx.command_path if exc.ctx else "pdmp"
                message = f"{exc.format_message()} (see `{name} --help`)"
            elif isinstance(exc, OSError):
                message = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            else:
                message = str(exc)
            err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            if os.environ.get("PDMP_DEBUG"):
                raise
            message = str(exc) if isinstance(exc, RunInterrupted) else "interrupted"
            err_console.print(f"[bold yellow]{escape(message)}[/bold yellow]", highlight=False, soft_wrap=True)
            ctx.exit(130)


app = typer.Typer(
    cls=PdmpGroup,
    help="pdmp: rank modalities, train PDMP / OGM-GE / joint models, compare them over seeds, report.\n\n"
    "Typical flow: `pdmp rank` → `pdmp compare` → `pdmp report` (runs go to ./runs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Metric(str, Enum):
    accuracy = "accuracy"
    macro_f1 = "macro-f1"


class SplitName(str, Enum):
    val = "val"
    test = "test"


# ---- options shared by several commands -----------------------------------------------------------
Dataset = Annotated[Optional[str], typer.Option(help="Dataset name (`pdmp list datasets`). Default: the one ranked last, else av-digits.")]
Preset = Annotated[Optional[str], typer.Option(help="Data preset (av-digits: audio-dominant, visual-dominant, balanced).")]
Samples = Annotated[Optional[int], typer.Option(help="Generated datasets: number of clips (a smaller dataset for quick runs).")]
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="PDMP_DATA", help="Where feature caches (and generated or default raw data) live: <data-dir>/<dataset>/.")]
Root = Annotated[Optional[Path], typer.Option("--root", help="Real datasets: the folder of the downloaded raw files (default <data-dir>/<dataset>/raw); custom: the manifest CSV.")]
RecipeOpts = Annotated[Optional[list[str]], typer.Option("--recipe", help="Recipe NAME, or KEY=VALUE overriding a dataset option or a feature parameter; repeatable (--recipe visual.size=112 --recipe audio.n_fft=1024 --recipe num_classes=31). See datasets/<name>/README.md.")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", envvar="PDMP_RUNS", help="Where runs are written.")]
Encoder = Annotated[Optional[str], typer.Option(help="Encoder (`pdmp list encoders`); default: resnet18 on CUDA, small on CPU.")]
Width = Annotated[Optional[int], typer.Option(help="Width of the `small` encoder's first conv.")]
Epochs = Annotated[Optional[int], typer.Option(help="Training epochs (default: dataset preset).")]
BatchSize = Annotated[Optional[int], typer.Option(help="Batch size (default: dataset preset).")]
LR = Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default: dataset preset).")]
Optimizer = Annotated[Optional[str], typer.Option(help="sgd (default), adam or adamw.")]
WeightDecay = Annotated[Optional[float], typer.Option(help="Weight decay (default 1e-4).")]
Scheduler = Annotated[Optional[str], typer.Option(help="step (default: ×0.1 every --step-epoch epochs), cosine or none.")]
StepEpoch = Annotated[Optional[int], typer.Option(help="StepLR period in epochs (default: dataset preset).")]
SelectMetric = Annotated[Metric, typer.Option(help="Metric that selects the checkpoint on --select-split.")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Any method hyperparameter, METHOD.KEY=VALUE (e.g. pdmp.start_epoch=5, pdmp.schedule=graded, ogm-ge.end_epoch=10); repeatable. See `pdmp list methods`.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N.")]
SelectSplit = Annotated[SplitName, typer.Option(help="Split that selects the checkpoint. `test` is the paper-lineage protocol and is labelled in every table.")]
Force = Annotated[bool, typer.Option("--force", help="Retrain runs that already finished, or start interrupted ones over (the old files go only when the new run is done).")]
Deterministic = Annotated[bool, typer.Option("--deterministic", help="torch's deterministic algorithms (identical numbers on CUDA too; slower). CPU runs are deterministic anyway.")]
Precision = Annotated[Optional[str], typer.Option(help="auto (bf16 autocast on CUDA, fp16 + gradient scaler where the GPU lacks bf16; fp32 on CPU), fp32, bf16 or fp16.")]
ChannelsLast = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Channels-last (NHWC) conv weights; default on CUDA.", show_default=False)]
CudnnBenchmark = Annotated[Optional[bool], typer.Option("--cudnn-benchmark/--no-cudnn-benchmark", help="cuDNN picks the fastest kernels for the run's shapes; default on CUDA, off under --deterministic.", show_default=False)]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the encoders (first steps slower while compiling).")]
Augment = Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random resized crop + horizontal flip of training frames (never spectrograms), batched on the training device; default: on for real datasets, off for av-digits.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")]
GammaP = Annotated[Optional[float], typer.Option(help="PDMP: coefficient of the performance-dominant modality (γp).")]
GammaR = Annotated[Optional[float], typer.Option(help="PDMP: coefficient of the other modalities (γr).")]
Alpha = Annotated[Optional[float], typer.Option(help="OGM / OGM-GE: modulation strength α.")]
Ranking = Annotated[Optional[str], typer.Option(help="PDMP: a ranking by hand, best first (e.g. audio,visual), instead of rank.json.")]


def session(runs_dir: Path, quiet: bool):
    from pdmp_cli.experiments import Session
    from pdmp_cli.layout import Layout

    return Session(Layout(runs_dir), quiet=quiet)


def run_options(encoder, width, epochs, batch_size, lr, optimizer, weight_decay, scheduler, step_epoch, device,
                select_split, select_metric, deterministic: bool = False) -> dict[str, Any]:
    """Only what the user gave, so dataset presets fill the rest."""
    def given(**kw: Any) -> dict[str, Any]:
        return {k: v for k, v in kw.items() if v is not None}

    return {"model": given(encoder=encoder, width=width),
            "optim": given(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                           scheduler=scheduler, step_epoch=step_epoch),
            "device": device, "select_split": select_split.value, "select_metric": select_metric.value.replace("-", "_"),
            "deterministic": deterministic}


def fast_options(precision: str | None, channels_last: bool | None, cudnn_benchmark: bool | None, compile_: bool,
                 augment: bool | None) -> dict[str, Any]:
    """The speed group (how a run goes) and the augmentation switch, only as far as the user gave them."""
    speed = {k: v for k, v in {"precision": precision, "channels_last": channels_last,
                               "cudnn_benchmark": cudnn_benchmark, "compile": compile_ or None}.items() if v is not None}
    return {"speed": speed, "augment": {} if augment is None else {"crop": augment, "flip": augment}}


def method_list(methods: str) -> list[str]:
    """Comma-separated method names; `all` is every multimodal method (all but `unimodal`), in registry order."""
    from pdmp_cli.methods import METHODS

    if methods.strip() == "all":
        return [n for n in METHODS.names() if not METHODS.get(n).unimodal]
    return csv_list(methods, "methods")


def ranking_option(ranking: str | None, methods: list[str]) -> list[str] | None:
    from pdmp_cli.methods import METHODS, get_method

    if ranking is None:
        return None
    if not any(get_method(m).needs_ranking for m in methods):
        users = ", ".join(n for n in METHODS.names() if METHODS.get(n).needs_ranking)
        raise PdmpError(f"--ranking applies to {users}, not to {', '.join(repr(m) for m in methods)}")
    return csv_list(ranking, "ranking")


def parse_sets(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """`--set pdmp.start_epoch=5` → {"pdmp": {"start_epoch": 5}}: one value each (sweeps are for compare)."""
    from pdmp_cli.grid import parse_sweeps

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for method, sweep in parse_sweeps(items, methods).items():
        for name, values in sweep.items():
            if len(values) != 1:
                raise PdmpError(f"--set {method}.{name} has {len(values)} values; `pdmp train` takes one "
                                f"(`pdmp compare` sweeps several)")
            out[method][name] = values[0]
    return out


METHOD_OPTIONS = {"gamma_p": ("pdmp",), "gamma_r": ("pdmp",), "alpha": ("ogm", "ogm-ge")}


def method_options(methods: list[str], **given: float | None) -> dict[str, dict[str, float]]:
    """Per-method hyperparameters from the shared options; an option no listed method takes is an error."""
    per_method: dict[str, dict[str, float]] = {m: {} for m in methods}
    for option, value in given.items():
        if value is None:
            continue
        takers = [m for m in METHOD_OPTIONS[option] if m in methods]
        if not takers:
            raise PdmpError(f"--{option.replace('_', '-')} applies to {' or '.join(METHOD_OPTIONS[option])}, "
                            f"not to {', '.join(repr(m) for m in methods)}")
        for m in takers:
            per_method[m][option] = value
    return per_method


def recipe_options(items: list[str] | None) -> dict[str, str]:
    """`--recipe pmr-ave --recipe visual.size=64` -> {"name": "pmr-ave", "visual.size": "64"}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            key, value = "name", key
        if not key or not value:
            raise PdmpError(f"--recipe takes NAME or KEY=VALUE (got {item!r})")
        out[key] = value
    return out


def data_options(data_dir: Path, root: Path | None, recipe: list[str] | None) -> dict[str, Any]:
    return {"root": str(data_dir), "raw_root": str(root.expanduser().resolve()) if root else None,
            "recipe": recipe_options(recipe)}


def dataset_variant(item: str | None, preset: str | None, samples: int | None) -> tuple[str | None, str | None, int | None]:
    """`av-digits@visual-dominant@n200` (a dataset key, as under runs/) → name, preset, samples."""
    if item is None:
        return None, preset, samples
    name, *parts = item.split("@")
    for part in parts:
        if part[:1] == "n" and part[1:].isdigit():
            samples = int(part[1:])
        elif re.fullmatch(r"r[0-9a-f]{8}", part):  # a hash cannot be turned back into its recipe
            raise PdmpError(f"{item} names a recipe by its hash; pass --dataset {name} with the --recipe options "
                            f"that made it (they are in its runs' config.json)")
        elif part:
            preset = part
    return name, preset, samples


def csv_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise PdmpError(f"--{what} needs at least one value, e.g. --{what} a,b")
    return items


def int_list(value: str, what: str) -> list[int]:
    try:
        return [int(v) for v in csv_list(value, what)]
    except ValueError:
        raise PdmpError(f"--{what} takes comma-separated integers (got {value!r})") from None


# ---- commands ------------------------------------------------------------------------------------

@app.command()
def rank(
    dataset: Dataset = None, preset: Preset = None, samples: Samples = None,
    seeds: Annotated[int, typer.Option(help="Seeds per modality (0..N-1); the score is their mean.")] = 1,
    metric: Annotated[Metric, typer.Option(help="Score that ranks the modalities.")] = Metric.accuracy,
    split: Annotated[SplitName, typer.Option(help="Split the score is measured on; `test` is the paper-lineage protocol.")] = SplitName.val,
    encoder: Encoder = None, width: Width = None, epochs: Epochs = None, batch_size: BatchSize = None, lr: LR = None,
    optimizer: Optimizer = None, weight_decay: WeightDecay = None, scheduler: Scheduler = None, step_epoch: StepEpoch = None,
    deterministic: Deterministic = False, precision: Precision = None, channels_last: ChannelsLast = None,
    cudnn_benchmark: CudnnBenchmark = None, compile_: Compile = False, augment: Augment = None,
    device: Device = "auto", select_split: SelectSplit = SplitName.val, select_metric: SelectMetric = Metric.accuracy,
    force: Force = False, data_dir: DataDir = Path("datasets"), root: Root = None, recipe: RecipeOpts = None,
    runs_dir: RunsDir = Path("runs"), quiet: Quiet = False,
) -> None:
    """Train one unimodal model per modality and write the ranking to runs/<dataset>/rank.json."""
    from pdmp_cli.experiments import data_config, rank as do_rank

    if seeds < 1:
        raise PdmpError(f"--seeds must be >= 1 (got {seeds})")
    s = session(runs_dir, quiet)
    data = data_config(s, dataset, preset, samples, **data_options(data_dir, root, recipe))
    out = do_rank(s, data, list(range(seeds)), metric.value.replace("-", "_"), split.value, force,
                  **run_options(encoder, width, epochs, batch_size, lr, optimizer, weight_decay, scheduler, step_epoch, device,
                            select_split, select_metric, deterministic),
               **fast_options(precision, channels_last, cudnn_benchmark, compile_, augment))
    scores = ", ".join(f"{m} {100 * out['modalities'][m]['score']:.2f}" for m in out["ranking"])
    console.print(f"ranking on {out['dataset_key']} ({out['metric']}, {out['protocol']}): {scores}")
    console.print(f"dominant modality: [bold]{out['dominant']}[/bold] → {s.layout.rank_json(out['dataset_key'])}")


@app.command()
def train(
    dataset: Dataset = None, preset: Preset = None, samples: Samples = None,
    method: Annotated[str, typer.Option(help="Method (`pdmp list methods`).")] = "pdmp",
    fusion: Annotated[str, typer.Option(help="Fusion (`pdmp list fusions`).")] = "concat",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    gamma_p: GammaP = None, gamma_r: GammaR = None, alpha: Alpha = None, sets: Sets = None,
    ranking: Ranking = None,
    encoder: Encoder = None, width: Width = None, epochs: Epochs = None, batch_size: BatchSize = None, lr: LR = None,
    optimizer: Optimizer = None, weight_decay: WeightDecay = None, scheduler: Scheduler = None, step_epoch: StepEpoch = None,
    deterministic: Deterministic = False, precision: Precision = None, channels_last: ChannelsLast = None,
    cudnn_benchmark: CudnnBenchmark = None, compile_: Compile = False, augment: Augment = None,
    device: Device = "auto", select_split: SelectSplit = SplitName.val, select_metric: SelectMetric = Metric.accuracy,
    force: Force = False, data_dir: DataDir = Path("datasets"), root: Root = None, recipe: RecipeOpts = None,
    nproc: Annotated[int, typer.Option(help="Processes training this one run together, as `torchrun --nproc-per-node N -m pdmp_cli train …` (one GPU each on CUDA, gloo on CPU); each trains on its share of every --batch-size global batch.")] = 1,
    sync_bn: Annotated[bool, typer.Option("--sync-bn/--no-sync-bn", help="With several processes: BatchNorm statistics of the global batch (as one process); --no-sync-bn: of each process's share.")] = True,
    runs_dir: RunsDir = Path("runs"), quiet: Quiet = False,
) -> None:
    """Train one multimodal model; PDMP reads its ranking from rank.json (run `pdmp rank` first)."""
    from pdmp_cli import distributed
    from pdmp_cli.config import on_cuda
    from pdmp_cli.experiments import data_config, resolve_train_config, train_dir_for, train_run

    launched = distributed.env_world_size()  # > 1 under torchrun (or in a process `--nproc` started)
    if nproc < 1 or (launched > 1 and nproc not in (1, launched)):
        raise PdmpError(f"--nproc must be >= 1 and, under torchrun, 1 or WORLD_SIZE ({launched}) (got {nproc})")
    launching = nproc > 1 and launched == 1
    with distributed.process_group(on_cuda(device)):
        s = session(runs_dir, quiet or launching or not distributed.is_main())  # one process speaks
        data = data_config(s, dataset, preset, samples, **data_options(data_dir, root, recipe))
        params = method_options([method], gamma_p=gamma_p, gamma_r=gamma_r, alpha=alpha)[method]
        params |= parse_sets(sets, [method])[method]
        options = run_options(encoder, width, epochs, batch_size, lr, optimizer, weight_decay, scheduler, step_epoch,
                              device, select_split, select_metric, deterministic)
        options |= fast_options(precision, channels_last, cudnn_benchmark, compile_, augment)
        options["model"]["fusion"] = fusion
        cfg = resolve_train_config(s, data, method, params, ranking_option(ranking, [method]), seed=seed,
                                   sync_bn=sync_bn, **options)
        if cfg.model.fusion != fusion:
            s.say(f"[dim]{method} does not use a fusion; the run is built and recorded with {cfg.model.fusion}.[/dim]")
        distributed.check_batch_size(cfg.optim.batch_size, nproc if launching else launched)
        distributed.check_device(cfg.device, nproc if launching else launched)
        if launching:  # bad options failed above, once, before any process started
            raise typer.Exit(distributed.launch(nproc))
        run_dir = train_dir_for(s, cfg)
        train_run(s, cfg, run_dir, force)
        s.say(f"result: {run_dir / 'result.json'}")


class Backend(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def compare(
    dataset: Annotated[Optional[str], typer.Option(help="Dataset(s), comma-separated: names (`pdmp list datasets`) or keys as under runs/ (av-digits@visual-dominant, av-digits@n200). Default: the one ranked last, else av-digits.")] = None,
    preset: Preset = None, samples: Samples = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods, or `all`: every multimodal method of `pdmp list methods`, in its order (ume and umt need `pdmp rank` with the grid's seeds).")] = "joint,ogm-ge,pdmp",
    fusions: Annotated[str, typer.Option(help="Comma-separated fusions.")] = "concat",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    gamma_p: GammaP = None, gamma_r: GammaR = None, alpha: Alpha = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Method hyperparameter METHOD.KEY=VALUE[,VALUE…]; several values sweep them (cartesian product per method), e.g. --set pdmp.gamma_p=1.5,2,3 --set ogm-ge.alpha=0.1,0.5. Repeatable; `pdmp list methods` shows the keys.")] = None,
    ranking: Ranking = None,
    encoder: Encoder = None, width: Width = None, epochs: Epochs = None, batch_size: BatchSize = None, lr: LR = None,
    optimizer: Optimizer = None, weight_decay: WeightDecay = None, scheduler: Scheduler = None, step_epoch: StepEpoch = None,
    deterministic: Deterministic = False, precision: Precision = None, channels_last: ChannelsLast = None,
    cudnn_benchmark: CudnnBenchmark = None, compile_: Compile = False, augment: Augment = None,
    device: Device = "auto", select_split: SelectSplit = SplitName.val, select_metric: SelectMetric = Metric.accuracy,
    force: Force = False, data_dir: DataDir = Path("datasets"), root: Root = None, recipe: RecipeOpts = None,
    workers: Annotated[int, typer.Option(help="Runs trained at once, each in its own process; CPU threads are divided between them, and with GPUs each worker gets one (CUDA_VISIBLE_DEVICES).")] = 1,
    backend: Annotated[Backend, typer.Option(help="local (this machine, --workers processes) or ray (each run a Ray task; the runs directory must be shared by the nodes).")] = Backend.local,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (HOST:PORT or auto); default: $RAY_ADDRESS, else a local Ray instance.")] = None,
    threads_per_run: Annotated[Optional[int], typer.Option(help="CPU threads of each run (default: cores / workers locally, 1 per Ray task).")] = None,
    runs_dir: RunsDir = Path("runs"), quiet: Quiet = False,
) -> None:
    """Run the grid datasets × methods × swept hyperparameters × fusions × seeds (finished runs are skipped).

    Each run gets its own directory; a failing run is recorded with its error and the others go on;
    each dataset's compare/results.csv lists every run of the grid.
    """
    from pdmp_cli.experiments import compare as do_compare, data_config
    from pdmp_cli.grid import parse_sweeps

    s = session(runs_dir, quiet)
    datas = [data_config(s, *dataset_variant(item, preset, samples), **data_options(data_dir, root, recipe))
             for item in (csv_list(dataset, "dataset") if dataset else [None])]
    methods_ = method_list(methods)
    params = method_options(methods_, gamma_p=gamma_p, gamma_r=gamma_r, alpha=alpha)
    do_compare(s, datas, methods_, csv_list(fusions, "fusions"), int_list(seeds, "seeds"), params, force,
               ranking=ranking_option(ranking, methods_), sweeps=parse_sweeps(sets, methods_), workers=workers,
               backend=backend.value, address=address, threads=threads_per_run,
               **run_options(encoder, width, epochs, batch_size, lr, optimizer, weight_decay, scheduler, step_epoch, device,
                            select_split, select_metric, deterministic),
               **fast_options(precision, channels_last, cudnn_benchmark, compile_, augment))


@app.command()
def report(
    dataset: Dataset = None, preset: Preset = None, samples: Samples = None, recipe: RecipeOpts = None,
    all_: Annotated[bool, typer.Option("--all", help="One table across every dataset under --runs-dir (datasets as column groups) → <runs>/report/.")] = False,
    data_dir: DataDir = Path("datasets"), root: Root = None, runs_dir: RunsDir = Path("runs"), quiet: Quiet = False,
) -> None:
    """Tables, paired statistics, imbalance diagnostics and figures from every finished run and rank.json.

    Writes runs/<dataset>/report/: report.md, report.html (self-contained), results.csv, paired.csv,
    diagnostics.csv, results.tex (booktabs) and figures/*.png.
    """
    from pdmp_cli.experiments import data_config, key_of
    from pdmp_cli.report import build_report, build_report_all

    s = session(runs_dir, quiet)
    if all_:
        if dataset or preset or samples is not None or recipe:
            raise PdmpError("--all reports every dataset under --runs-dir; leave out --dataset, --preset, --samples and --recipe")
        build_report_all(s.layout, quiet)
        return
    data = data_config(s, *dataset_variant(dataset, preset, samples), **data_options(data_dir, root, recipe))
    build_report(s.layout, key_of(data), quiet)


@app.command()
def prepare(
    dataset: Dataset = None, preset: Preset = None, samples: Samples = None,
    root: Root = None, recipe: RecipeOpts = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes decoding clips (default: one per core, at most 8).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on any corrupt, truncated, silent, too short or missing file instead of skipping it.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only read and validate the raw layout: per-split, per-class counts and missing files; decode nothing.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary (counts, skipped files, recipe) to this JSON file.")] = None,
    data_dir: DataDir = Path("datasets"), runs_dir: RunsDir = Path("runs"), quiet: Quiet = False,
) -> None:
    """Prepare a dataset's feature cache from its raw files (rank and train do this when it is missing).

    Clips are decoded in parallel; an interrupted run resumes where it stopped; bad files are listed with the reason and skipped (--strict: an error). Raw layouts and recipes: datasets/<name>/README.md.
    """
    from pdmp_cli.data import get_dataset, load_dataset
    from pdmp_cli.data.summary import cache_summary, print_summary
    from pdmp_cli.experiments import data_config

    if workers is not None and workers < 1:
        raise PdmpError(f"--workers must be >= 1 (got {workers})")
    cfg = data_config(session(runs_dir, quiet), dataset, preset, samples, **data_options(data_dir, root, recipe))
    if check:
        spec = get_dataset(cfg.dataset)
        if spec.check is None:
            raise PdmpError(f"--check reads the raw layout of real datasets; {cfg.dataset} is generated (prepare it instead)")
        summary = spec.check(cfg)
    else:
        summary = cache_summary(load_dataset(cfg, quiet, workers=workers, strict=strict))
    print_summary(summary)
    if json_out:
        from pdmp_cli.layout import write_json

        write_json(json_out, summary)


@app.command()
def datasets(
    dataset: Annotated[Optional[str], typer.Option(help="Only this dataset's caches, with per-class counts and skipped files.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summaries to this JSON file.")] = None,
    data_dir: DataDir = Path("datasets"),
) -> None:
    """The prepared feature caches under --data-dir: recipe, counts per split (and per class), skipped files."""
    from pdmp_cli.data.summary import list_caches

    summaries = list_caches(data_dir, dataset)
    if json_out:
        from pdmp_cli.layout import write_json

        write_json(json_out, {"caches": summaries})


@app.command()
def bench(
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods; the first is the reference of the ratios. Default: every registered multimodal method, joint first.")] = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="A method hyperparameter, METHOD.KEY=VALUE (repeatable); ranking-based methods get the ranking audio,visual.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder of the model the methods are timed on (default small; --gpu-check: resnet18).")] = None,
    encoders: Annotated[str, typer.Option(help="Comma-separated encoders whose joint step is timed (samples/s; TFLOP/s on CUDA).")] = "small,resnet18",
    fusion: Annotated[str, typer.Option(help="Fusion of the benchmarked model.")] = "concat",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds of the methods (the median is reported).")] = 7,
    steps: Annotated[int, typer.Option(help="Training steps per round.")] = 10,
    encoder_rounds: Annotated[int, typer.Option(help="Timing rounds per encoder.")] = 3,
    encoder_steps: Annotated[int, typer.Option(help="Training steps per encoder round.")] = 3,
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="Time the data pipeline against decoding every sample (needs the av-digits cache; built when missing).")] = True,
    decode_samples: Annotated[int, typer.Option(help="Samples the decode-every-sample pipeline decodes.")] = 128,
    data_dir: DataDir = Path("datasets"), samples: Samples = None,
    precision: Precision = None, channels_last: ChannelsLast = None, cudnn_benchmark: CudnnBenchmark = None,
    compile_: Compile = False,
    gpu_check: Annotated[bool, typer.Option("--gpu-check", help="Instead: a pair of --encoder encoders (resnet18 in scripts/gpu_check.sh) at --size, --frames, --batch-size, with and without the fast path.")] = False,
    size: Annotated[int, typer.Option(help="--gpu-check: frame size (224: the audio input is a 257×188 spectrogram; else size×size).")] = 224,
    frames: Annotated[int, typer.Option(help="--gpu-check: frames per clip.")] = 3,
    device: Device = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Where the time goes, as ratios: data pipeline vs decoding every sample vs the training step; each
    method's step vs joint; samples/s per encoder; on CUDA, achieved TFLOP/s against the GPU's bf16 peak."""
    from rich.table import Table

    from pdmp_cli import bench as b
    from pdmp_cli.config import DataConfig

    if rounds < 1 or steps < 1 or encoder_rounds < 1 or encoder_steps < 1:
        raise PdmpError("--rounds, --steps, --encoder-rounds and --encoder-steps must be >= 1")
    if gpu_check:
        encoder = encoder or "resnet18"
        out = b.gpu_check(size, frames, batch_size, steps, rounds, device, json_out, encoder)
        table = Table(title=f"GPU check: {encoder} pair {out['setup']['shapes']}, batch {batch_size}, {out['setup']['device']}"
                            f" ({out['setup']['gpu'] or 'CPU smoke run'})", title_justify="left")
        for col in ("path", "precision", "channels-last", "cudnn.benchmark", "ms/step", "samples/s", "TFLOP/s", "of bf16 peak"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for label in ("plain", "fast"):
            r = out[label]
            table.add_row(label, r["precision"], str(r["channels_last"]), str(r["cudnn_benchmark"]), f"{r['median_ms']:.1f}",
                          f"{r['samples_per_s']:.1f}", f"{r['tflops']:.2f}",
                          f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] else "—")
        console.print(table)
        console.print(f"fast path speed-up: [bold]{out['speedup']:.2f}×[/bold]")
        return
    names = csv_list(methods, "methods") if methods else None
    speed = fast_options(precision, channels_last, cudnn_benchmark, compile_, None)["speed"]
    out = b.run(names, encoder or "small", fusion, batch_size, steps, rounds, device, json_out, parse_sets(sets, names or b.default_methods()),
                csv_list(encoders, "encoders"), encoder_steps, encoder_rounds, speed,
                DataConfig(root=str(data_dir), samples=samples) if pipeline else None, decode_samples)
    s = out["setup"]
    where = f"{s['device']} ({s['threads']} threads), {s['precision']}"
    if "pipeline" in out:
        p, step = out["pipeline"], out.get("step", {})
        table = Table(title=f"data pipeline vs training step ({p['dataset']}, batch {s['batch_size']}, {where})", title_justify="left")
        for col in ("stage", "samples/s", "ratio"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        table.add_row(f"cache → batch → crop/flip {','.join(p['augmented_modalities']) or '(none)'} (prefetch {p['prefetch']})",
                      f"{p['cache_samples_per_s']:.0f}", f"{p['cache_vs_decode']:.1f}× decode")
        table.add_row(f"decode every sample (recipes, {p['decoded_samples']} samples; one process, per core)",
                      f"{p['decode_samples_per_s']:.0f}", "1")
        if step:
            table.add_row(f"training step alone ({step['method']}, {s['encoder']})", f"{step['samples_per_s']:.0f}",
                          f"pipeline {step['pipeline_vs_step']:.1f}× step; decode {step['decode_vs_step']:.2f}× step")
        console.print(table)
    ref = next(iter(out["methods"]))
    table = Table(title=f"step time: {s['encoder']} encoders, {s['fusion']}, batch {s['batch_size']}, {where}, "
                        f"median of {s['rounds']} rounds × {s['steps_per_round']} steps", title_justify="left")
    for col in ("method", "median ms/step", "min", "max", f"ratio to {ref}"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, r in out["methods"].items():
        if "error" in r:
            table.add_row(name, "—", "—", "—", f"skipped: {escape(r['error'])}")
            continue
        ratio = r["ratio_to_" + ref]
        table.add_row(name, f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['max_ms']:.2f}",
                      f"{ratio:.3f}" if ratio is not None else "—")
    console.print(table)
    table = Table(title=f"encoders: joint step, batch {s['batch_size']}, {where}", title_justify="left")
    cuda = s["device"].startswith("cuda")
    for col in ("encoder", "ms/step", "samples/s", "ratio to small") + (("TFLOP/s", "of bf16 peak") if cuda else ()):
        table.add_column(col, justify="left" if col == "encoder" else "right")
    for name, r in out["encoders"].items():
        row = [name, f"{r['median_ms']:.1f}", f"{r['samples_per_s']:.0f}", f"{r['ratio_to_small']:.3f}" if "ratio_to_small" in r else "—"]
        if cuda:
            row += [f"{r['tflops']:.2f}", f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] else escape(r["gpu"])]
        table.add_row(*row)
    console.print(table)
    if "flops_note" in out:
        console.print(f"[dim]{out['flops_note']}[/dim]")


class What(str, Enum):
    all = "all"
    datasets = "datasets"
    encoders = "encoders"
    fusions = "fusions"
    methods = "methods"


@app.command("list")
def list_(
    what: Annotated[What, typer.Argument(help="What to list.")] = What.all,
    pattern: Annotated[str, typer.Option(help="Wildcard filter, e.g. 'ogm*'.")] = "*",
) -> None:
    """Show the registered datasets, encoders, fusions and methods."""
    from rich.markup import escape
    from rich.table import Table

    from pdmp_cli.data import DATASETS
    from pdmp_cli.methods import METHODS
    from pdmp_cli.models import ENCODERS, FUSIONS

    def describe(registry, text) -> None:
        table = Table(title=registry.kind + "s", title_justify="left")
        table.add_column("name")
        table.add_column("description")
        for name in registry.names(pattern):
            table.add_row(name, escape(text(registry.get(name))))
        console.print(table)

    if what in (What.all, What.datasets):
        describe(DATASETS, lambda d: f"{d.description} [modalities: {', '.join(d.modalities) or 'from the manifest'}"
                 + (f"; presets: {', '.join(d.presets)}" if d.presets else "") + "]")
    if what in (What.all, What.encoders):
        describe(ENCODERS, lambda e: e.description)
    if what in (What.all, What.fusions):
        describe(FUSIONS, lambda f: f.description)
    if what in (What.all, What.methods):
        def method_text(m) -> str:
            import dataclasses

            from pdmp_cli.methods.base import PROVIDED_PARAMS

            params = [f"{f.name}={f.default}" for f in dataclasses.fields(m.Params) if f.name not in PROVIDED_PARAMS]
            return m.description + (f" [{', '.join(params)}]" if params else "")

        describe(METHODS, method_text)


def print_version(value: bool) -> None:
    if value:
        console.print(f"pdmp {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    if debug:
        os.environ["PDMP_DEBUG"] = "1"
    if ctx.invoked_subcommand not in (None, "train") and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise PdmpError(f"only `pdmp train` runs as several processes (WORLD_SIZE={os.environ['WORLD_SIZE']}); run "
                        f"`pdmp {ctx.invoked_subcommand}` as one process (compare: --workers)")


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # a pre-empted job (SIGTERM) stops like Ctrl-C: the epoch being saved is saved


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    app()
