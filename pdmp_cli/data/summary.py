"""What `pdmp prepare` and `pdmp datasets` print: per-split, per-class counts and the skipped files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from pdmp_cli.data.base import FeatureCache
from pdmp_cli.data.cache import SPLITS, iter_caches, open_cache
from pdmp_cli.ui import console

MAX_LISTED = 50  # skipped / missing files printed in the terminal; --json has them all


def cache_summary(fc: FeatureCache) -> dict[str, Any]:
    m = fc.manifest
    class_counts = {split: dict(zip(fc.classes, np.bincount(np.asarray(fc.splits[split].labels, dtype=np.int64),
                                                             minlength=len(fc.classes)).tolist()))
                    for split in SPLITS}
    recipe = m.get("recipe", {})
    return {"dataset": m["dataset"], "cache": str(fc.path), "recipe_hash": fc.recipe_hash,
            "recipe_name": recipe.get("recipe") if isinstance(recipe, dict) else None, "recipe": recipe,
            "raw_root": m.get("raw_root"), "classes": fc.classes, "class_counts": class_counts,
            "shapes": {k: v["shape"] for k, v in m["modalities"].items()},
            "skipped": m.get("skipped", []), "notes": m.get("notes", []), "warnings": m.get("warnings", []), "preparation": m.get("preparation"),
            "created": m.get("created")}


def _totals(class_counts: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{split} {sum(class_counts[split].values())}" for split in SPLITS)


def _files_table(title: str, records: list[dict[str, Any]]) -> None:
    table = Table(title=f"{title}: {len(records)}", title_justify="left")
    for column in ("split", "id", "file", "reason"):
        table.add_column(column, overflow="fold")
    for r in records[:MAX_LISTED]:
        table.add_row(r["split"], escape(str(r["id"])), escape(str(r["path"])), escape(str(r["reason"])))
    console.print(table)
    if len(records) > MAX_LISTED:
        console.print(f"... and {len(records) - MAX_LISTED} more (--json FILE lists them all)")


def print_summary(summary: dict[str, Any]) -> None:
    """A prepared cache (`cache_summary`) or a checked raw layout (a dataset's `check`)."""
    counts = summary["class_counts"]
    if summary.get("shapes"):
        console.print(f"cache {summary['cache']} (recipe {summary['recipe_hash']}): {_totals(counts)}", soft_wrap=True)
        console.print("shapes: " + ", ".join(f"{m} {tuple(s)}" for m, s in summary["shapes"].items()))
    else:
        console.print(f"{summary['dataset']} at {summary['raw_root']} (recipe {summary['recipe_hash']}): "
                      f"{_totals(counts)} clips listed; "
                      + (f"prepared in {summary['cache']}" if summary.get("cache") else "not prepared yet"), soft_wrap=True)
    for note in summary.get("notes", []):
        console.print(f"  {escape(note)}", highlight=False)
    table = Table(title=f"{len(summary['classes'])} classes", title_justify="left")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for c in summary["classes"]:
        table.add_row(escape(c), *(str(counts[split][c]) for split in SPLITS))
    console.print(table)
    if "skipped" in summary:
        if summary["skipped"]:
            _files_table("skipped files", summary["skipped"])
        else:
            console.print("skipped files: none")
    for warning in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    if summary.get("missing"):
        _files_table("missing files (prepare will skip them)", summary["missing"])


def list_caches(root: Path, dataset: str | None = None) -> list[dict[str, Any]]:
    """Print the caches under `root` (all: one table; one dataset: each in full); returns their summaries."""
    summaries = [cache_summary(open_cache(path)) for path in iter_caches(root)
                 if dataset is None or path.parent.parent.name == dataset]
    if not summaries:
        console.print(f"no prepared caches under {root}" + (f" for {dataset}" if dataset else "")
                      + "; run `pdmp prepare --dataset NAME --root PATH`")
        return []
    if dataset:
        for summary in summaries:
            print_summary(summary)
        return summaries
    table = Table(title=f"prepared caches under {root}", title_justify="left")
    for column in ("dataset", "recipe", "hash", *SPLITS, "classes", "skipped"):
        table.add_column(column, justify="right" if column in SPLITS + ("classes", "skipped") else "left",
                         overflow="fold")
    for s in summaries:
        table.add_row(s["dataset"], str(s["recipe_name"] or "-"), s["recipe_hash"],
                      *(str(sum(s["class_counts"][split].values())) for split in SPLITS),
                      str(len(s["classes"])), str(len(s["skipped"])))
    console.print(table)
    return summaries
