"""Report figures (matplotlib, Agg backend, PNG), drawn from the DataFrames report.py builds from JSON.

Curves are the mean over seeds with a ±1 std band; every figure names what it shows and on which split.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pdmp_cli.layout import atomic_write  # noqa: E402


def save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def band(ax, curves: pd.DataFrame, column: str, label: str) -> None:
    """Mean over seeds per epoch, with a ±1 std band when there are several seeds."""
    stats = curves.groupby("epoch")[column].agg(["mean", "std", "count"]).dropna(subset=["mean"])
    if stats.empty:
        return
    x = stats.index + 1
    ax.plot(x, 100 * stats["mean"] if column_is_accuracy(column) else stats["mean"], marker="o", ms=3, label=label)
    if (stats["count"] > 1).any():
        scale = 100 if column_is_accuracy(column) else 1
        ax.fill_between(x, scale * (stats["mean"] - stats["std"].fillna(0)), scale * (stats["mean"] + stats["std"].fillna(0)),
                        alpha=0.15)


def column_is_accuracy(column: str) -> bool:
    return "acc" in column


def per_setting(curves: pd.DataFrame):
    return curves.groupby("label", sort=False)


def val_accuracy(curves: pd.DataFrame, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, c in per_setting(curves):
        band(ax, c, "val_accuracy", label)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def modality_panels(curves: pd.DataFrame, prefix: str, path: Path, ylabel: str, title: str, reference: float | None = None) -> Path | None:
    """One panel per modality, one line per setting, for the columns `<prefix><modality>`."""
    columns = [c for c in curves.columns if c.startswith(prefix) and curves[c].notna().any()]
    if not columns:
        return None
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for label, c in per_setting(curves):
            band(ax, c, column, label)
        if reference is not None:
            ax.axhline(reference, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="epoch", ylabel=ylabel, title=column[len(prefix):])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, path)


def coefficients(curves: pd.DataFrame, path: Path, title: str) -> Path | None:
    """The coefficients each method logged (PDMP's γ_m, OGM's k_m), one panel per method variant."""
    columns = [c for c in curves.columns if c.startswith(("log:gamma/", "log:coef/"))]
    settings = [(label, c) for label, c in per_setting(curves) if c[columns].notna().any().any()] if columns else []
    if not settings:
        return None
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), squeeze=False)
    for ax, (label, c) in zip(axes[0], settings):
        for column in columns:
            if c[column].notna().any():
                band(ax, c, column, column.split(":", 1)[1])
        ax.set(xlabel="epoch", ylabel="coefficient", title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, path)


def bars(summary: pd.DataFrame, path: Path, title: str) -> Path:
    """Test accuracy, mean with ±1 std error bars (n seeds under each bar)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(summary) + 1.5), 4))
    x = range(len(summary))
    ax.bar(x, 100 * summary["accuracy_mean"], yerr=100 * summary["accuracy_std"].fillna(0), capsize=4,
           color=["#bbbbbb" if lbl.startswith("unimodal") else "#4477aa" for lbl in summary["label"]])
    ax.set_xticks(list(x), [f"{lbl}\n(n={n})" for lbl, n in zip(summary["label"], summary["seeds"])], rotation=30,
                  ha="right", fontsize=7)
    low = 100 * (summary["accuracy_mean"] - summary["accuracy_std"].fillna(0)).min()
    ax.set_ylim(max(0, low - 5), min(100, 100 * (summary["accuracy_mean"] + summary["accuracy_std"].fillna(0)).max() + 3))
    ax.set(ylabel="test accuracy (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)
