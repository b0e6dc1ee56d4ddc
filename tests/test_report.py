"""`pdmp report` outputs parsed back: CSVs equal the runs' JSON, LaTeX shape, HTML and figures (tiny av-digits)."""
from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdmp_cli.cli import app
from pdmp_cli.layout import read_jsonl
from tests.conftest import TINY_SAMPLES

KEY = f"av-digits@n{TINY_SAMPLES}"
T_975_DF1 = 12.706204736174698  # Student's t, 97.5% quantile, 1 degree of freedom (from a table)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(tmp_path_factory, data_root, tiny):
    runs = tmp_path_factory.mktemp("runs")
    common = ["--samples", str(TINY_SAMPLES), "--epochs", "2", "--data-dir", str(data_root), "--runs-dir", str(runs), "-q"]
    for args in (["rank", "--seeds", "2"], ["compare", "--methods", "joint,ogm-ge,pdmp", "--seeds", "0,1", "--workers", "2"]):
        out = CliRunner().invoke(app, [*args, *common])
        assert out.exit_code == 0, out.output
    out = CliRunner().invoke(app, ["report", "--runs-dir", str(runs)])
    assert out.exit_code == 0, out.output
    return runs, runs / KEY / "report", out.output


def results(runs: Path, method: str) -> list[dict]:
    return [json.loads((runs / KEY / "train" / f"{method}-concat+epochs=2-s{s}" / "result.json").read_text()) for s in (0, 1)]


def csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_results_csv_equals_the_runs(reported):
    runs, out, _ = reported
    table = {r["method"]: r for r in csv_rows(out / "results.csv")}
    for method in ("joint", "ogm-ge", "pdmp"):
        accs = [r["test"]["accuracy"] for r in results(runs, method)]
        f1s = [r["test"]["macro_f1"] for r in results(runs, method)]
        row = table[method]
        assert int(row["seeds"]) == 2 and row["selected_on"] == "val"
        assert float(row["accuracy_mean"]) == pytest.approx(sum(accs) / 2)
        assert float(row["macro_f1_mean"]) == pytest.approx(sum(f1s) / 2)
        std = abs(accs[0] - accs[1]) / math.sqrt(2)
        assert float(row["accuracy_std"]) == pytest.approx(std)
        assert float(row["accuracy_ci95"]) == pytest.approx(T_975_DF1 * std / math.sqrt(2)) if std else row["accuracy_ci95"] in ("0.0", "")


def test_paired_csv_pdmp_against_each_baseline(reported):
    runs, out, printed = reported
    pairs = {r["baseline"]: r for r in csv_rows(out / "paired.csv")}
    assert set(pairs) == {"joint", "ogm-ge"} and all(r["pdmp"] == "pdmp" for r in pairs.values())
    pdmp = [r["test"]["accuracy"] for r in results(runs, "pdmp")]
    for baseline, row in pairs.items():
        base = [r["test"]["accuracy"] for r in results(runs, baseline)]
        diffs = [p - b for p, b in zip(pdmp, base)]
        assert int(row["n"]) == 2 and float(row["mean_diff"]) == pytest.approx(sum(diffs) / 2)
        assert (int(row["wins"]), int(row["ties"]), int(row["losses"])) == (
            sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs))
    assert "paired by seed" in printed and "W/T/L" in printed


def test_diagnostics_and_score_ratio_in_every_run(reported):
    runs, out, _ = reported
    rank = json.loads((runs / KEY / "rank.json").read_text())
    rows = {(r["label"], r["modality"]): r for r in csv_rows(out / "diagnostics.csv")}
    for method in ("joint", "ogm-ge", "pdmp"):
        last = []
        for seed in (0, 1):
            metrics = read_jsonl(runs / KEY / "train" / f"{method}-concat+epochs=2-s{seed}" / "metrics.jsonl")
            for record in metrics:  # every method records ρ_m; with two modalities ρ_a = 1 / ρ_v
                ratio = record["val"]["score_ratio"]
                assert set(ratio) == {"audio", "visual"} and ratio["audio"] * ratio["visual"] == pytest.approx(1)
            last.append(metrics[-1]["val"]["score_ratio"]["audio"])
        for m in ("audio", "visual"):
            row = rows[(f"{method} [epochs=2] · concat", m)]
            uni = sum(t["accuracy"] for t in rank["modalities"][m]["test"].values()) / 2
            inside = sum(r["test"]["modality_accuracy"][m] for r in results(runs, method)) / 2
            assert float(row["unimodal_acc"]) == pytest.approx(uni)
            assert float(row["multimodal_acc"]) == pytest.approx(inside)
            assert float(row["gap"]) == pytest.approx(uni - inside)
        assert float(rows[(f"{method} [epochs=2] · concat", "audio")]["final_score_ratio"]) == pytest.approx(sum(last) / 2)


def latex_rows(tex: str) -> list[list[str]]:
    body = tex.split("\\midrule", 1)[1].split("\\bottomrule")[0]
    return [[c.strip() for c in line.rstrip(" \\").split(" & ")] for line in body.splitlines()
            if line.strip().endswith("\\\\")]


def test_latex_table_shape_and_marks(reported):
    runs, out, _ = reported
    tex = (out / "results.tex").read_text()
    for rule in ("\\toprule", "\\bottomrule", "\\begin{tabular}", "\\end{tabular}"):
        assert tex.count(rule) == 1
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    header = tex.split("\\toprule", 1)[1].split("\\midrule", 1)[0].strip().rstrip(" \\").split(" & ")
    rows = latex_rows(tex)
    assert len(spec) == len(header) == 6 and all(len(r) == 6 for r in rows) and len(rows) == 5
    assert "\\pm" in tex and not re.search(r"(?<!\\)[_%#&]", tex.replace(" & ", " "))  # specials escaped
    summary = [r for r in csv_rows(out / "results.csv") if not r["method"].startswith("unimodal")]
    for column, metric in ((4, "accuracy"), (5, "macro_f1")):
        table = {r["method"]: float(r[f"{metric}_mean"]) for r in summary}
        order = sorted(set(table.values()), reverse=True)
        for row in rows:
            name, cell = row[0].split(" ")[0], row[column]
            assert row[3] == "2"  # n seeds in every row
            if name == "unimodal":
                assert row[1] == "-" and "\\textbf" not in cell and "\\underline" not in cell  # marks: multimodal rows
                continue
            assert row[1] == "concat" and row[2] == "val"
            assert cell.startswith("\\textbf{") == (table[name] == order[0])
            assert cell.startswith("\\underline{") == (len(order) > 1 and table[name] == order[1])
            assert f"{100 * table[name]:.2f} $\\pm$" in cell


def test_figures_and_self_contained_html(reported):
    _, out, _ = reported
    names = {"val_accuracy", "modality_accuracy", "score_ratio", "coefficients", "test_accuracy"}
    for name in names:
        data = (out / "figures" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    page = (out / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(names) and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert "src='http" not in page and "<table" in page
    md = (out / "report.md").read_text()
    assert all(f"figures/{n}.png" in md for n in names) and "Imbalance diagnostics" in md


def test_report_all_has_one_column_group_per_dataset(reported, tmp_path):
    runs, _, _ = reported
    both = tmp_path / "runs"
    shutil.copytree(runs / KEY, both / KEY)
    shutil.copytree(runs / KEY, both / "other")
    out = CliRunner().invoke(app, ["report", "--all", "--runs-dir", str(both)])
    assert out.exit_code == 0, out.output
    tex = (both / "report" / "results.tex").read_text()
    assert tex.count("\\multicolumn{3}{c}") == 2 and "\\cmidrule(lr){4-6}\\cmidrule(lr){7-9}" in tex
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    assert len(spec) == 9 and all(len(r) == 9 for r in latex_rows(tex))
    table = csv_rows(both / "report" / "results.csv")
    assert {r["dataset"] for r in table} == {KEY, "other"} and len(table) == 10
    assert (both / "report" / "figures" / "test_accuracy.png").read_bytes().startswith(PNG)
    bad = CliRunner().invoke(app, ["report", "--all", "--dataset", "av-digits", "--runs-dir", str(both)])
    assert bad.exit_code == 2 and "--all reports every dataset" in bad.output


def test_seeds_of_a_method_built_on_rank_s_models_form_one_setting(reported, tmp_path):
    # UME uses rank's unimodal models of each run's seed: their hashes differ per seed, the setting does not.
    runs = tmp_path / "runs"
    shutil.copytree(reported[0], runs)
    common = ["--samples", str(TINY_SAMPLES), "--epochs", "2", "--runs-dir", str(runs), "-q"]
    for args in (["compare", "--methods", "ume", "--seeds", "0,1"], ["report"]):
        out = CliRunner().invoke(app, [*args, *common] if args[0] == "compare" else [*args, "--runs-dir", str(runs)])
        assert out.exit_code == 0, out.output
    rows = [r for r in csv_rows(runs / KEY / "report" / "results.csv") if r["method"] == "ume"]
    assert len(rows) == 1 and rows[0]["seeds"] == "2"
    assert [r[0] for r in latex_rows((runs / KEY / "report" / "results.tex").read_text())].count("ume [epochs=2]") == 1


def test_latex_keeps_settings_that_share_a_name_apart():
    import pandas as pd

    from pdmp_cli.report import latex_table, summarise

    runs = pd.DataFrame({"method": ["joint", "joint"], "options": ["", ""], "fusion": ["concat", "concat"],
                         "selected_on": ["val", "val"], "setting": ["aaaaaa111", "bbbbbb222"], "seed": [0, 0],
                         "accuracy": [0.5, 0.7], "macro_f1": [0.4, 0.6]})
    rows = latex_rows(latex_table([("d", summarise(runs))], "c", "tab:d"))
    assert [(r[0], r[3]) for r in rows] == [("joint [aaaaaa]", "1"), ("joint [bbbbbb]", "1")]
