"""`pdmp report`: tables, statistics and figures built from the runs' JSON files only (never from logs).

One row per experimental setting (method variant × fusion × selection split × everything else in
the config but the seed): test accuracy and macro-F1 as mean ± sample std (n−1) over seeds with a
95% t interval, the number of seeds, per-modality accuracies of the multimodal model; plus one row
per modality for the unimodal models that `rank` trained. Runs of different settings are never
averaged together. Methods that use no fusion (MLA, UME; `uses_fusion` in result.json) show fusion
`none`. PDMP is compared with each baseline of the same fusion (or of none), options and selection
split, paired by seed (stats.py). Imbalance diagnostics set each modality's accuracy inside the
multimodal model against its unimodal model, and follow the OGM-style score ratio over epochs.

Outputs in runs/<dataset>/report/: report.md, results.csv, paired.csv, diagnostics.csv,
results.tex (booktabs), report.html (self-contained) and figures/*.png. `--all` writes one table
across datasets to runs/report/.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from pdmp_cli.errors import PdmpError
from pdmp_cli.layout import METRICS, RESULT, Layout, read_json, read_jsonl, write_text
from pdmp_cli.stats import paired, summarise_values
from pdmp_cli.ui import console

GROUP = ["method", "options", "fusion", "selected_on", "setting"]
SELECTED = {"val": "val", "test": "test (lineage protocol)"}


# ---- reading the runs ----------------------------------------------------------------------------

def run_dirs(layout: Layout, key: str) -> list[Path]:
    # staging (".x.partial") and replaced (".x.old") folders are never results
    return [p.parent for p in sorted(layout.train_dir(key).glob(f"*/{RESULT}")) if not p.parent.name.startswith(".")]


Results = list[tuple[Path, dict[str, Any]]]


def read_results(layout: Layout, key: str) -> Results:
    """(run folder, result.json) of every finished run, each file read (and schema-checked) once."""
    return [(run, read_json(run / RESULT)) for run in run_dirs(layout, key)]


def options_of(result: dict[str, Any]) -> str:
    return result["setting_tag"].lstrip("+").replace("+", ", ")


NO_FUSION = "none"  # the fusion column of a method that uses none (its runs are built with concat, unused)


def fusion_shown(results: Results) -> dict[str, str]:
    """The fusion each setting shows: NO_FUSION for a method that uses none. A setting trained before
    result.json recorded `uses_fusion` takes it from its newer runs, so its seeds stay one row."""
    fusionless = {r["setting_hash"] for _, r in results if r.get("uses_fusion") is False}
    return {r["setting_hash"]: NO_FUSION if r["setting_hash"] in fusionless else r["fusion"] for _, r in results}


def collect_runs(results: Results) -> pd.DataFrame:
    rows = []
    fusion = fusion_shown(results)
    for _, r in results:
        row = {"method": r["variant"], "options": options_of(r),
               "fusion": fusion[r["setting_hash"]], "selected_on": r["selection"]["split"],
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


def collect_curves(results: Results) -> pd.DataFrame:
    """metrics.jsonl of every run, one row per epoch: validation accuracy, per-modality accuracy,
    score ratio ρ_m and the coefficients the method logged (`log:<name>`)."""
    rows = []
    fusion = fusion_shown(results)
    for run, r in results:
        label = setting_label(r["variant"], options_of(r), fusion[r["setting_hash"]])
        for record in read_jsonl(run / METRICS):
            val = record["val"]
            row = {"label": label, "setting": r["setting_hash"], "seed": r["seed"], "epoch": record["epoch"],
                   "val_accuracy": val["accuracy"]}
            row |= {f"val_acc_{m}": v for m, v in val["modality_accuracy"].items()}
            row |= {f"ratio_{m}": v for m, v in val.get("score_ratio", {}).items()}
            row |= {f"log:{k}": v for k, v in record.get("method", {}).items()}
            rows.append(row)
    return pd.DataFrame(rows)


def with_options(method: str, options: str) -> str:
    return f"{method} [{options}]" if options else method


def setting_label(method: str, options: str, fusion: str) -> str:
    return with_options(method, options) + (f" · {fusion}" if fusion not in ("-", NO_FUSION) else "")


# ---- tables -----------------------------------------------------------------------------------

def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting: seed count, mean and sample std (n−1) of every metric, 95% t interval of the test metrics."""
    values = [c for c in runs.columns if c not in GROUP + ["seed"]]
    grouped = runs.groupby(GROUP, sort=False)
    table = grouped[values].mean().add_suffix("_mean").join(grouped[values].std(ddof=1).add_suffix("_std"))
    for metric in ("accuracy", "macro_f1"):
        table[f"{metric}_ci95"] = grouped[metric].apply(lambda v: summarise_values(v.dropna()).ci95)
    table.insert(0, "seeds", grouped.size())
    ordered = ["seeds"] + [f"{v}_{s}" for v in values for s in ("mean", "std")] + ["accuracy_ci95", "macro_f1_ci95"]
    out = table[ordered].reset_index()
    out.insert(0, "label", [setting_label(m, o, f) for m, o, f in zip(out["method"], out["options"], out["fusion"])])
    return out


def fmt(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if not pd.isna(std) else f"{100 * mean:.2f}"


def fmt_ci(mean: float, half: float) -> str:
    return "-" if pd.isna(half) else f"[{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"


def setting_names(summary: pd.DataFrame) -> list[str]:
    """Method and options per row; settings that still share a name (runs trained under other dataset
    defaults) get their hash, so every table row is one setting."""
    several = summary.groupby(["method", "options", "fusion", "selected_on"])["setting"].transform("nunique") > 1
    labels = [", ".join(filter(None, [o, h[:6] if many else ""]))
              for o, h, many in zip(summary["options"], summary["setting"], several)]
    return [with_options(m, label) for m, label in zip(summary["method"], labels)]


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Human view: percentages as mean ± std and the 95% interval; test-selected rows labelled."""
    modality_cols = [c[: -len("_mean")] for c in summary.columns if c.startswith("acc_") and c.endswith("_mean")]
    out = pd.DataFrame({
        "method": setting_names(summary),
        "fusion": summary["fusion"],
        "selected on": summary["selected_on"].map(lambda s: SELECTED.get(s, s)),
        "seeds": summary["seeds"].astype(int),
        "test acc %": [fmt(m, s) for m, s in zip(summary["accuracy_mean"], summary["accuracy_std"])],
        "95% CI": [fmt_ci(m, h) for m, h in zip(summary["accuracy_mean"], summary["accuracy_ci95"])],
        "test macro-F1 %": [fmt(m, s) for m, s in zip(summary["macro_f1_mean"], summary["macro_f1_std"])],
    })
    for c in modality_cols:
        out[f"{c[4:]} acc %"] = [fmt(m, s) for m, s in zip(summary[f"{c}_mean"], summary[f"{c}_std"])]
    return out


def paired_table(runs: pd.DataFrame) -> pd.DataFrame:
    """PDMP (every variant) against each other method of the same fusion, options and selection split,
    paired by seed on test accuracy: mean difference, paired t-test and Wilcoxon p, wins/ties/losses.
    A method that uses no fusion is a baseline of every fusion."""
    if runs.empty:
        return pd.DataFrame()
    runs = runs.assign(base=runs["method"].str.split("+").str[0])
    fusionless = runs[runs["fusion"] == NO_FUSION]
    rows = []
    for (options, fusion, selected), group in runs.groupby(["options", "fusion", "selected_on"], sort=False):
        if fusion == NO_FUSION:
            continue
        group = pd.concat([group, fusionless[(fusionless["options"] == options) & (fusionless["selected_on"] == selected)]])
        settings = {s: g for s, g in group.groupby("setting", sort=False)}
        for ps, pg in settings.items():
            if pg["base"].iloc[0] != "pdmp":
                continue
            for bs, bg in settings.items():
                if bg["base"].iloc[0] == "pdmp":
                    continue
                p = paired(dict(zip(pg["seed"], pg["accuracy"])), dict(zip(bg["seed"], bg["accuracy"])))
                rows.append({"pdmp": pg["method"].iloc[0], "baseline": bg["method"].iloc[0], "options": options,
                             "fusion": fusion, "selected_on": selected, "n": p.n,
                             "mean_diff": p.mean_diff, "std_diff": p.std_diff, "t_pvalue": p.t_pvalue,
                             "wilcoxon_pvalue": p.wilcoxon_pvalue, "wins": p.wins, "ties": p.ties, "losses": p.losses,
                             "seeds": " ".join(map(str, p.seeds))})
    return pd.DataFrame(rows)


def paired_display(table: pd.DataFrame) -> pd.DataFrame:
    def pvalue(p: float) -> str:
        return "-" if pd.isna(p) else f"{p:.3f}"

    return pd.DataFrame({
        "PDMP": [with_options(m, o) for m, o in zip(table["pdmp"], table["options"])],
        "vs": table["baseline"], "fusion": table["fusion"],
        "selected on": table["selected_on"].map(lambda s: SELECTED.get(s, s)),
        "paired seeds": table["n"],
        "Δ test acc (points)": [f"{100 * d:+.2f}" if not pd.isna(d) else "-" for d in table["mean_diff"]],
        "paired t p": [pvalue(p) for p in table["t_pvalue"]],
        "Wilcoxon p": [pvalue(p) for p in table["wilcoxon_pvalue"]],
        "W/T/L": [f"{w}/{t}/{lo}" for w, t, lo in zip(table["wins"], table["ties"], table["losses"])],
    })


def diagnostics_table(runs: pd.DataFrame, rank: dict[str, Any] | None, curves: pd.DataFrame) -> pd.DataFrame:
    """Per setting and modality: its test accuracy inside the multimodal model, its unimodal model's
    (from rank.json), the gap (how under-optimised the encoder is), and the last epoch's score ratio ρ_m."""
    if runs.empty:
        return pd.DataFrame()
    unimodal = {m: summarise_values(t["accuracy"] for t in e["test"].values()).mean
                for m, e in rank["modalities"].items()} if rank else {}
    last = curves.sort_values("epoch").groupby(["setting", "seed"]).tail(1) if not curves.empty else curves
    rows = []
    for (method, options, fusion, selected, setting), group in runs.groupby(GROUP, sort=False):
        for column in [c for c in group.columns if c.startswith("acc_") and group[c].notna().any()]:
            m = column[4:]
            inside = group[column].mean()
            ratio = last.loc[last["setting"] == setting, f"ratio_{m}"].mean() if f"ratio_{m}" in last else float("nan")
            uni = unimodal.get(m, float("nan"))
            rows.append({"label": setting_label(method, options, fusion), "selected_on": selected, "modality": m,
                         "seeds": len(group), "multimodal_acc": inside, "unimodal_acc": uni, "gap": uni - inside,
                         "relative": inside / uni if uni else float("nan"), "final_score_ratio": ratio})
    return pd.DataFrame(rows)


def diagnostics_display(table: pd.DataFrame) -> pd.DataFrame:
    def pct(v: float) -> str:
        return "-" if pd.isna(v) else f"{100 * v:.2f}"

    return pd.DataFrame({
        "setting": table["label"], "modality": table["modality"], "seeds": table["seeds"],
        "in multimodal acc %": [pct(v) for v in table["multimodal_acc"]],
        "unimodal acc %": [pct(v) for v in table["unimodal_acc"]],
        "gap (points)": ["-" if pd.isna(v) else f"{100 * v:+.2f}" for v in table["gap"]],
        "ρ last epoch (val)": ["-" if pd.isna(v) else f"{v:.3f}" for v in table["final_score_ratio"]],
    })


def markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# ---- LaTeX ------------------------------------------------------------------------------------

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def ranks(means: pd.Series) -> pd.Series:
    """1 for the best mean, 2 for the second best (ties share a place), 0 otherwise."""
    distinct = sorted(set(means.dropna().round(10)), reverse=True)
    place = {v: i + 1 for i, v in enumerate(distinct[:2])}
    return means.round(10).map(lambda v: place.get(v, 0)).fillna(0).astype(int)


def latex_cell(mean: float, std: float, place: int) -> str:
    if pd.isna(mean):
        return "--"
    text = f"{100 * mean:.2f}" + (f" $\\pm$ {100 * std:.2f}" if not pd.isna(std) else "")
    return {1: f"\\textbf{{{text}}}", 2: f"\\underline{{{text}}}"}.get(place, text)


def latex_table(groups: list[tuple[str, pd.DataFrame]], caption: str, label: str) -> str:
    """booktabs table: rows are settings, one column group (n, accuracy, macro-F1) per dataset.
    Best mean of each column in bold, second underlined, among the multimodal rows. `caption` is LaTeX."""
    keys = ["name", "fusion", "selected_on"]
    groups = [(k, g.assign(name=setting_names(g))) for k, g in groups]
    rows = list(dict.fromkeys(tuple(r) for _, g in groups for r in g[keys].itertuples(index=False)))
    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{caption}}}", f"\\label{{{label}}}",
             f"\\begin{{tabular}}{{lll{'rrr' * len(groups)}}}", r"\toprule"]
    if len(groups) > 1:
        lines.append(" & ".join(["", "", ""] + [f"\\multicolumn{{3}}{{c}}{{{latex_escape(k)}}}" for k, _ in groups]) + r" \\")
        lines.append("".join(f"\\cmidrule(lr){{{4 + 3 * i}-{6 + 3 * i}}}" for i in range(len(groups))))
    lines.append(" & ".join(["Method", "Fusion", "Selected on"] + ["$n$", r"Acc. (\%)", r"Macro-F1 (\%)"] * len(groups)) + r" \\")
    lines.append(r"\midrule")
    cells: dict[tuple, list[str]] = {r: [] for r in rows}
    for _, g in groups:
        g = g.set_index(keys)
        baseline = g.index.get_level_values("fusion") == "-"  # unimodal reference rows
        places = {m: ranks(g[f"{m}_mean"].where(~baseline)) for m in ("accuracy", "macro_f1")}
        for r in rows:
            if r not in g.index:
                cells[r] += ["--", "--", "--"]
                continue
            s = g.loc[r]
            cells[r] += [str(int(s["seeds"]))] + [latex_cell(s[f"{m}_mean"], s[f"{m}_std"], places[m].loc[r])
                                                 for m in ("accuracy", "macro_f1")]
    unimodal = [r for r in rows if r[1] == "-"]
    for i, r in enumerate(unimodal + [r for r in rows if r not in unimodal]):
        if unimodal and i == len(unimodal):
            lines.append(r"\midrule")
        lines.append(" & ".join([latex_escape(r[0]), latex_escape(r[1]), latex_escape(SELECTED.get(r[2], r[2]))]
                                + cells[r]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


# ---- HTML -------------------------------------------------------------------------------------

CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #ddd;"
       "text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%}")


def html_page(title: str, sections: list[tuple[str, str | pd.DataFrame | Path]]) -> str:
    """One self-contained page: tables as HTML, figures embedded as base64 PNG."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, pd.DataFrame):
            parts.append(content.to_html(index=False, escape=True, border=0))
        elif isinstance(content, Path):
            data = base64.b64encode(content.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(content.stem)}' src='data:image/png;base64,{data}'>")
        else:
            parts.append(f"<p>{html.escape(content)}</p>")
    return "\n".join(parts + ["</body></html>"])


# ---- terminal ---------------------------------------------------------------------------------

def print_table(shown: pd.DataFrame, title: str) -> None:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for col in shown.columns:
        numeric = col not in ("method", "fusion", "selected on", "PDMP", "vs", "setting", "modality")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    for row in shown.itertuples(index=False):
        table.add_row(*(escape(str(v)) for v in row))  # "[epochs=2]" is text, not rich markup
    # Never truncate a number: on a narrow terminal the table is printed wider (the terminal wraps lines).
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(width=max(console.width, needed)).print(table)


# ---- one dataset ------------------------------------------------------------------------------

def dataset_summary(layout: Layout, key: str, results: Results) -> tuple[pd.DataFrame, dict[str, Any] | None, pd.DataFrame | None]:
    """(multimodal runs, rank.json or None, summary of unimodal + multimodal settings or None if neither)."""
    runs = collect_runs(results)
    rank_path = layout.rank_json(key)
    rank = read_json(rank_path) if rank_path.exists() else None
    parts = ([unimodal_runs(rank)] if rank else []) + ([runs] if len(runs) else [])
    return runs, rank, summarise(pd.concat(parts, ignore_index=True)) if parts else None


def build_report(layout: Layout, key: str, quiet: bool = False) -> dict[str, Path]:
    from pdmp_cli import plots

    results = read_results(layout, key)
    runs, rank, summary = dataset_summary(layout, key, results)
    if summary is None:
        raise PdmpError(f"no results under {layout.dataset_dir(key)}; run `pdmp rank` and `pdmp compare` first")
    shown = display_table(summary)
    curves = collect_curves(results)
    pairs = paired_table(runs)
    diagnostics = diagnostics_table(runs, rank, curves)
    selected = ", ".join(sorted(SELECTED.get(s, s) for s in summary["selected_on"].unique()))
    protocol = (f"Test-split metrics of the checkpoint selected on the split named in 'selected on' ({selected}); "
                f"mean ± sample std over the number of seeds in 'seeds', 95% CI from Student's t.")

    out_dir = layout.report_dir(key)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "results.csv", "paired": out_dir / "paired.csv",
             "diagnostics": out_dir / "diagnostics.csv", "latex": out_dir / "results.tex", "html": out_dir / "report.html"}
    figures = {}
    if not curves.empty:
        fig_dir = out_dir / "figures"
        figures["validation accuracy per epoch"] = plots.val_accuracy(curves, fig_dir / "val_accuracy.png",
                                                                      f"{key}: validation accuracy (mean ± std over seeds)")
        figures["per-modality accuracy per epoch"] = plots.modality_panels(
            curves, "val_acc_", fig_dir / "modality_accuracy.png", "validation accuracy (%)",
            f"{key}: each modality's accuracy inside the multimodal model")
        figures["score ratio per epoch"] = plots.modality_panels(
            curves, "ratio_", fig_dir / "score_ratio.png", "ρ_m = s_m / mean of the others", f"{key}: OGM-style score ratio (val)", 1.0)
        figures["coefficients over training"] = plots.coefficients(curves, fig_dir / "coefficients.png",
                                                                   f"{key}: PDMP γ_m and OGM k_m (epoch means)")
    figures["test accuracy (bar chart)"] = plots.bars(summary, out_dir / "figures" / "test_accuracy.png",
                                                      f"{key}: test accuracy, mean ± std")
    figures = {k: v for k, v in figures.items() if v is not None}
    paths |= {f"figure:{p.stem}": p for p in figures.values()}

    ranking_line = ""
    if rank:
        scores = ", ".join(f"{m} {100 * rank['modalities'][m]['score']:.2f}" for m in rank["ranking"])
        ranking_line = (f"Ranking ({rank['metric']} on the {rank['protocol']}): {' > '.join(rank['ranking'])} "
                        f"({scores}); dominant modality: **{rank['dominant']}**. Recipe {rank['recipe_hash']}.")
    lines = [f"# pdmp report: {key}", ""] + ([ranking_line, ""] if rank else [])
    lines += [protocol, "", markdown(shown), ""]
    if not pairs.empty:
        lines += ["## PDMP against each baseline, paired by seed (test accuracy)", "",
                  "Δ = PDMP − baseline; p-values of the two-sided paired t-test and Wilcoxon signed-rank test "
                  "(undefined, '-', with fewer than 2 pairs or no spread); W/T/L = seeds won/tied/lost.", "",
                  markdown(paired_display(pairs)), ""]
    if not diagnostics.empty:
        lines += ["## Imbalance diagnostics", "",
                  "Each modality's test accuracy inside the multimodal model against its unimodal model from "
                  "`rank` (gap = unimodal − multimodal: how under-optimised the encoder is), and the OGM-style "
                  "score ratio ρ_m = s_m / mean of the others on the validation split after the last epoch.", "",
                  markdown(diagnostics_display(diagnostics)), ""]
    lines += ["## Figures", ""] + [f"![{name}](figures/{p.name})" for name, p in figures.items()] + [""]
    caption = (f"{latex_escape(key)}: test accuracy and macro-F1 (\\%), mean $\\pm$ std over $n$ seeds; checkpoints "
               f"selected on {latex_escape(selected)}. Best multimodal result in bold, second underlined.")
    write_text(paths["markdown"], "\n".join(lines))
    write_text(paths["csv"], summary.to_csv(index=False))
    write_text(paths["paired"], pairs.to_csv(index=False))
    write_text(paths["diagnostics"], diagnostics.to_csv(index=False))
    write_text(paths["latex"], latex_table([(key, summary)], caption, f"tab:{key}"))
    sections: list[tuple[str, Any]] = [("", ranking_line.replace("**", "")), ("", protocol), ("Results", shown)]
    if not pairs.empty:
        sections.append(("PDMP against each baseline, paired by seed", paired_display(pairs)))
    if not diagnostics.empty:
        sections.append(("Imbalance diagnostics", diagnostics_display(diagnostics)))
    sections += [(name, p) for name, p in figures.items()]
    write_text(paths["html"], html_page(f"pdmp report: {key}", [s for s in sections if not (isinstance(s[1], str) and not s[1])]))

    if not quiet:
        print_table(shown, f"pdmp report: {key}")
        if rank:
            console.print(f"dominant modality: [bold]{rank['dominant']}[/bold] (ranking {' > '.join(rank['ranking'])})")
        if not pairs.empty:
            print_table(paired_display(pairs), "PDMP vs baselines, paired by seed (test accuracy)")
        if not diagnostics.empty:
            print_table(diagnostics_display(diagnostics), "imbalance diagnostics")
        console.print(f"wrote {out_dir}/: " + ", ".join(p.relative_to(out_dir).as_posix() for p in paths.values()))
    return paths


# ---- across datasets --------------------------------------------------------------------------

def dataset_keys(layout: Layout) -> list[str]:
    if not layout.root.exists():
        return []
    return sorted(p.name for p in layout.root.iterdir()
                  if p.is_dir() and (p.joinpath("rank.json").exists() or run_dirs(layout, p.name)))


def build_report_all(layout: Layout, quiet: bool = False) -> dict[str, Path]:
    """One table with the datasets as column groups (n, accuracy, macro-F1 each), rows = settings."""
    from pdmp_cli import plots

    groups = []
    for key in dataset_keys(layout):
        summary = dataset_summary(layout, key, read_results(layout, key))[2]
        if summary is not None:
            groups.append((key, summary))
    if not groups:
        raise PdmpError(f"no results under {layout.root}; run `pdmp rank` and `pdmp compare` first")
    several = [k for k, g in groups if g.duplicated(["label", "selected_on"]).any()]
    if several:
        raise PdmpError(f"{several[0]} holds several settings with the same label (runs under other defaults); "
                        f"report it alone with `pdmp report --dataset …` or move the old runs away")
    wide = pd.concat({k: g.set_index(["label", "selected_on"])[["seeds", "accuracy_mean", "accuracy_std", "macro_f1_mean",
                                                                 "macro_f1_std", "accuracy_ci95"]] for k, g in groups},
                     axis=1)
    shown = pd.DataFrame({"method": [lbl for lbl, _ in wide.index],
                          "selected on": [SELECTED.get(s, s) for _, s in wide.index]})
    for key, _ in groups:
        shown[f"{key} n"] = [("-" if pd.isna(n) else str(int(n))) for n in wide[(key, "seeds")]]
        shown[f"{key} acc %"] = [fmt(m, s) for m, s in zip(wide[(key, "accuracy_mean")], wide[(key, "accuracy_std")])]
        shown[f"{key} F1 %"] = [fmt(m, s) for m, s in zip(wide[(key, "macro_f1_mean")], wide[(key, "macro_f1_std")])]
    out_dir = layout.root / "report"
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "results.csv", "latex": out_dir / "results.tex",
             "html": out_dir / "report.html"}
    long = pd.concat([g.assign(dataset=k) for k, g in groups], ignore_index=True)
    caption = ("Test accuracy and macro-F1 (%) per dataset, mean ± std over n seeds; checkpoints selected on the "
               "split in 'Selected on'. Best multimodal result per column in bold, second underlined.")
    figure = plots.bars(long.assign(label=long["dataset"] + ": " + long["label"]), out_dir / "figures" / "test_accuracy.png",
                        "test accuracy, mean ± std")
    write_text(paths["markdown"], "\n".join(["# pdmp report: all datasets", "", caption, "", markdown(shown), "",
                                             f"![test accuracy](figures/{figure.name})", ""]))
    write_text(paths["csv"], long.to_csv(index=False))
    write_text(paths["latex"], latex_table(groups, latex_escape(caption).replace("±", "$\\pm$"), "tab:all"))
    write_text(paths["html"], html_page("pdmp report: all datasets", [("", caption), ("Results", shown),
                                                                     ("test accuracy", figure)]))
    if not quiet:
        print_table(shown, "pdmp report: all datasets")
        console.print(f"wrote {out_dir}/: " + ", ".join(p.relative_to(out_dir).as_posix() for p in paths.values()))
    return paths | {"figure:test_accuracy": figure}
