"""`pdmp report`: result tables built from the runs' JSON files only (never from logs).

One row per experimental setting (method variant × fusion × selection split × everything else in
the config but the seed): test accuracy and macro-F1 as mean ± std over seeds (sample std, n−1), the
number of seeds, and per-modality accuracies of the multimodal model; plus one row per modality for
the unimodal models that `rank` trained. Runs of different settings are never averaged together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import RESULT, Layout, read_json, write_text
from pdmp_cli.ui import console


def collect_runs(layout: Layout, key: str) -> pd.DataFrame:
    rows = []
    for path in sorted(layout.train_dir(key).glob(f"*/{RESULT}")):
        if path.parent.name.startswith("."):  # staging or replaced runs, never results
            continue
        r = read_json(path, ("variant", "setting_tag", "fusion", "seed", "test", "selection", "setting_hash"))
        row = {"method": r["variant"], "options": r["setting_tag"].lstrip("+").replace("+", ", "),
               "fusion": r["fusion"], "selected_on": r["selection"]["split"],
               "setting": r["setting_hash"], "seed": r["seed"],
               "accuracy": r["test"]["accuracy"], "macro_f1": r["test"]["macro_f1"]}
        rows.append(row | {f"acc_{m}": v for m, v in r["test"]["modality_accuracy"].items()})
    return pd.DataFrame(rows)


def unimodal_runs(rank: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for m, entry in rank["modalities"].items():
        for seed, t in entry["test"].items():
            rows.append({"method": f"unimodal ({m})", "options": "", "fusion": "-", "selected_on": rank["select_split"],
                         "setting": "rank", "seed": int(seed),
                         "accuracy": t["accuracy"], "macro_f1": t["macro_f1"], f"acc_{m}": t["accuracy"]})
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (n−1) and seed count per setting."""
    keys = ["method", "options", "fusion", "selected_on", "setting"]
    values = [c for c in runs.columns if c not in keys + ["seed"]]
    grouped = runs.groupby(keys, sort=False)
    table = grouped[values].mean().add_suffix("_mean").join(grouped[values].std(ddof=1).add_suffix("_std"))
    table.insert(0, "seeds", grouped.size())
    ordered = ["seeds"] + [f"{v}_{s}" for v in values for s in ("mean", "std")]
    return table[ordered].reset_index()


def fmt(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if not pd.isna(std) else f"{100 * mean:.2f}"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Human view: percentages as mean ± std; test-selected rows labelled."""
    modality_cols = [c[: -len("_mean")] for c in summary.columns if c.startswith("acc_") and c.endswith("_mean")]
    # Settings that still share a label (runs trained under other dataset defaults) get their hash.
    several = summary.groupby(["method", "options", "fusion", "selected_on"])["setting"].transform("nunique") > 1
    labels = [", ".join(filter(None, [o, h[:6] if many else ""]))
              for o, h, many in zip(summary["options"], summary["setting"], several)]
    out = pd.DataFrame({
        "method": [f"{m} [{label}]" if label else m for m, label in zip(summary["method"], labels)],
        "fusion": summary["fusion"],
        "selected on": summary["selected_on"].map(lambda s: "test (lineage protocol)" if s == "test" else s),
        "seeds": summary["seeds"].astype(int),
        "test acc %": [fmt(m, s) for m, s in zip(summary["accuracy_mean"], summary["accuracy_std"])],
        "test macro-F1 %": [fmt(m, s) for m, s in zip(summary["macro_f1_mean"], summary["macro_f1_std"])],
    })
    for c in modality_cols:
        out[f"{c[4:]} acc %"] = [fmt(m, s) for m, s in zip(summary[f"{c}_mean"], summary[f"{c}_std"])]
    return out


def markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def build_report(layout: Layout, key: str, quiet: bool = False) -> dict[str, Path]:
    runs = collect_runs(layout, key)
    rank_path = layout.rank_json(key)
    rank = read_json(rank_path) if rank_path.exists() else None
    parts = ([unimodal_runs(rank)] if rank else []) + ([runs] if len(runs) else [])
    if not parts:
        raise PdmpError(f"no results under {layout.dataset_dir(key)}; run `pdmp rank` and `pdmp compare` first")
    summary = summarise(pd.concat(parts, ignore_index=True))
    shown = display_table(summary)

    lines = [f"# pdmp report: {key}", ""]
    if rank:
        scores = ", ".join(f"{m} {100 * rank['modalities'][m]['score']:.2f}" for m in rank["ranking"])
        lines += [f"Ranking ({rank['metric']} on the {rank['protocol']}): {' > '.join(rank['ranking'])} "
                  f"({scores}); dominant modality: **{rank['dominant']}**. Recipe {rank['recipe_hash']}.", ""]
    lines += ["Test-split metrics of the checkpoint selected on the split named in 'selected on'; "
              "mean ± sample std over seeds.", "", markdown(shown), ""]
    out_dir = layout.report_dir(key)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "results.csv"}
    write_text(paths["markdown"], "\n".join(lines))
    write_text(paths["csv"], summary.to_csv(index=False))
    if not quiet:
        table = Table(title=f"pdmp report: {key}", title_justify="left", box=box.SIMPLE_HEAD)
        for col in shown.columns:
            numeric = "%" in col or col == "seeds"
            table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
        for row in shown.itertuples(index=False):
            table.add_row(*(escape(str(v)) for v in row))  # "[epochs=2]" is text, not rich markup
        # Never truncate a number: on a narrow terminal the table is printed wider (the terminal wraps lines).
        needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
        Console(width=max(console.width, needed)).print(table)
        if rank:
            console.print(f"dominant modality: [bold]{rank['dominant']}[/bold] (ranking {' > '.join(rank['ranking'])})")
        console.print(f"wrote {paths['markdown']} and {paths['csv']}")
    return paths
