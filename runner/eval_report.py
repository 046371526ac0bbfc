"""The evaluation grid's report: tables in the paper's format (Markdown and CSV), figures, one page.

Tables: accuracy mean +/- std over seeds per method and dataset (the paper's Table 2), the gain
of CM+Z over Z in percentage points (Table 3), the transfer of a bank to another model (Table 5),
and what each cell cost (calls and tokens per item, requests sent and served from the cache).
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from runner.bank import load_bank
from runner.evaluate import CellResult

GROUP = ["model", "dataset", "strategy", "budget", "method", "bank_model"]


def cells_frame(results: Sequence[CellResult]) -> pl.DataFrame:
    return pl.DataFrame([r.record() for r in results], infer_schema_length=None)


def summarise(cells: pl.DataFrame) -> pl.DataFrame:
    """One row per cell group across seeds: accuracy mean and (population) std, costs averaged."""
    return (
        cells.group_by(GROUP, maintain_order=True)
        .agg(
            pl.col("accuracy").mean().alias("accuracy_mean"),
            pl.col("accuracy").std(ddof=0).alias("accuracy_std"),
            pl.len().alias("n_seeds"),
            pl.col("n_items").first(),
            pl.col("n_user").mean().alias("n_user_mean"),
            pl.col("coverage").mean().alias("coverage_mean"),
            pl.col("candidate_set_mean").mean(),
            pl.col("calls_per_item").mean(),
            pl.col("prompt_tokens_per_item").mean(),
            pl.col("completion_tokens_per_item").mean(),
            pl.col("engine_requests").sum(),
            pl.col("cache_hits").sum(),
            pl.col("n_errors").sum(),
            pl.col("seconds").sum(),
        )
        .with_columns((pl.col("engine_requests") - pl.col("cache_hits")).alias("requests_sent"))
    )


def _pct(mean: float | None, std: float | None, n_seeds: int) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}%" + (f" ± {100 * (std or 0):.2f}%" if n_seeds > 1 else "")


def _budget(budget: float) -> str:
    return f"{budget * 100:g}%"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _own(summary: pl.DataFrame) -> pl.DataFrame:
    """Cells whose bank (if any) was estimated by the model that annotates."""
    return summary.filter(pl.col("bank_model").is_null() | (pl.col("bank_model") == pl.col("model")))


def _lookup(summary: pl.DataFrame, **where: object) -> dict | None:
    rows = summary.filter(*(pl.col(k) == v for k, v in where.items()))
    return rows.row(0, named=True) if rows.height else None


def accuracy_table(summary: pl.DataFrame, model: str) -> str:
    """Table 2: one row per method (Z, CM (b%) + Z) and strategy, one column per dataset."""
    own = _own(summary).filter(pl.col("model") == model)
    datasets = own["dataset"].unique(maintain_order=True).to_list()
    budgets = own["budget"].unique(maintain_order=True).to_list()
    rows = []
    for strategy in own["strategy"].unique(maintain_order=True).to_list():
        uses_pool = strategy.startswith("few_shot")  # only few-shot's Z reads the user split (its examples)
        for position, budget in enumerate(budgets):
            for method in ("Z", "CM+Z"):
                if method == "Z" and position > 0 and not uses_pool:
                    continue  # the same Z at every budget: shown once
                if method == "Z":
                    name = f"{strategy} (examples from {_budget(budget)})" if uses_pool else strategy
                else:
                    name = f"CM ({_budget(budget)}) + {strategy}"
                cells = []
                for dataset in datasets:
                    found = _lookup(own, dataset=dataset, strategy=strategy, budget=budget, method=method)
                    z = _lookup(own, dataset=dataset, strategy=strategy, budget=budget, method="Z")
                    text = _pct(found["accuracy_mean"], found["accuracy_std"], found["n_seeds"]) if found else "—"
                    if found and z and method == "CM+Z" and (found["accuracy_mean"] or 0) > (z["accuracy_mean"] or 0):
                        text = f"**{text}**"
                    cells.append(text)
                rows.append([name, *cells])
    return _markdown(["Method", *datasets], rows)


def improvement_table(summary: pl.DataFrame) -> str:
    """Table 3: accuracy of CM+Z minus Z, in percentage points, per model, strategy and budget."""
    own = _own(summary)
    datasets = own["dataset"].unique(maintain_order=True).to_list()
    rows = []
    for key in own.select("model", "strategy", "budget").unique(maintain_order=True).iter_rows(named=True):
        cells = []
        for dataset in datasets:
            cm = _lookup(own, **key, dataset=dataset, method="CM+Z")
            z = _lookup(own, **key, dataset=dataset, method="Z")
            if cm and z and cm["accuracy_mean"] is not None and z["accuracy_mean"] is not None:
                cells.append(f"{100 * (cm['accuracy_mean'] - z['accuracy_mean']):+.2f}")
            else:
                cells.append("—")
        rows.append([key["model"], f"CM ({_budget(key['budget'])}) + {key['strategy']}", *cells])
    return _markdown(["Model", "Method", *datasets], rows)


def transfer_table(summary: pl.DataFrame) -> str | None:
    """Table 5: Z and CM+Z of each model with its own bank and with the first model's bank."""
    transferred = summary.filter(pl.col("bank_model").is_not_null() & (pl.col("bank_model") != pl.col("model")))
    if transferred.height == 0:
        return None
    datasets = summary["dataset"].unique(maintain_order=True).to_list()
    source = transferred["bank_model"][0]
    rows = []
    for key in transferred.select("model", "strategy", "budget").unique(maintain_order=True).iter_rows(named=True):
        target, strategy, budget = key["model"], key["strategy"], key["budget"]
        lines = [
            (f"{strategy} ({source})", source, "Z", None),
            (f"CM_{source} ({_budget(budget)}) + {strategy} ({source})", source, "CM+Z", source),
            (f"{strategy} ({target})", target, "Z", None),
            (f"CM_{source} ({_budget(budget)}) + {strategy} ({target})", target, "CM+Z", source),
            (f"CM_{target} ({_budget(budget)}) + {strategy} ({target})", target, "CM+Z", target),
        ]
        for name, model, method, bank_model in lines:
            cells = []
            for dataset in datasets:
                rows_found = summary.filter(
                    (pl.col("model") == model)
                    & (pl.col("dataset") == dataset)
                    & (pl.col("strategy") == strategy)
                    & (pl.col("budget") == budget)
                    & (pl.col("method") == method)
                    & (pl.col("bank_model").is_null() if bank_model is None else pl.col("bank_model") == bank_model)
                )
                found = rows_found.row(0, named=True) if rows_found.height else None
                cells.append(_pct(found["accuracy_mean"], found["accuracy_std"], found["n_seeds"]) if found else "—")
            rows.append([name, *cells])
    return _markdown(["Method", *datasets], rows)


def cost_table(summary: pl.DataFrame) -> str:
    """What each cell group cost: calls and tokens per annotated item, and engine requests saved."""
    rows = []
    for row in summary.iter_rows(named=True):
        bank = "" if row["bank_model"] in (None, row["model"]) else f" (bank {row['bank_model']})"

        def number(value: float | None, digits: int = 2) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        rows.append(
            [
                row["dataset"],
                row["model"],
                row["strategy"],
                _budget(row["budget"]),
                row["method"] + bank,
                str(row["n_items"]),
                number(row["n_user_mean"], 0) if row["method"] == "CM+Z" else "—",
                number(row["calls_per_item"]),
                number(row["prompt_tokens_per_item"], 0),
                number(row["completion_tokens_per_item"], 1),
                number(row["candidate_set_mean"], 1),
                f"{row['requests_sent']} / {row['engine_requests']}",
                number(row["seconds"], 0),
            ]
        )
    header = [
        "Dataset",
        "Model",
        "Strategy",
        "Budget",
        "Method",
        "Items",
        "User samples",
        "Calls/item",
        "Prompt tok/item",
        "Completion tok/item",
        "Mean size of C",
        "Requests sent / asked",
        "Seconds",
    ]
    return _markdown(header, rows)


@dataclass(frozen=True)
class Report:
    page: Path  # report.html: tables and figures on one page
    markdown: Path
    cells_csv: Path
    summary_csv: Path
    figures: list[Path]


def _figures(cells: pl.DataFrame, summary: pl.DataFrame, directory: Path) -> list[Path]:
    from runner.plots import accuracy_chart, discrepancy_heatmap

    figures = []
    own = _own(summary)
    for model in own["model"].unique(maintain_order=True).to_list():
        for budget in own["budget"].unique(maintain_order=True).to_list():
            part = own.filter((pl.col("model") == model) & (pl.col("budget") == budget))
            name = f"accuracy-{_slug(model)}-{budget * 100:g}pct.png"
            title = f"Accuracy by strategy: {model}, CM bank from a {_budget(budget)} user split"
            figures.append(accuracy_chart(part, directory / name, title))
    # one heatmap per dataset and model: the first strategy's bank at the largest budget, first seed
    estimated = cells.filter((pl.col("method") == "CM+Z") & (pl.col("bank_model") == pl.col("model")))
    for key in estimated.select("model", "dataset").unique(maintain_order=True).iter_rows(named=True):
        group = estimated.filter((pl.col("model") == key["model"]) & (pl.col("dataset") == key["dataset"]))
        chosen = group.filter(pl.col("budget") == group["budget"].max()).row(0, named=True)
        bank_path = Path(chosen["output_dir"]) / "memory_bank.json"
        if bank_path.is_file():
            name = f"discrepancy-{_slug(key['dataset'])}-{_slug(key['model'])}.png"
            title = (
                f"{key['dataset']}: discrepancies of {key['model']} under {chosen['strategy']} "
                f"({_budget(chosen['budget'])} user split, seed {chosen['seed']})"
            )
            figures.append(discrepancy_heatmap(load_bank(bank_path), directory / name, title))
        # the same cell's risk-coverage plot (the job draws it: the user split's estimate and, here, gold)
        plot = Path(chosen["output_dir"]) / "risk_coverage.png"
        if plot.is_file():
            copied = directory / f"risk-coverage-{_slug(key['dataset'])}-{_slug(key['model'])}.png"
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, copied)
            figures.append(copied)
    return figures


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text).strip("-")


def write_report(results: Sequence[CellResult], directory: Path, title: str) -> Report:
    directory.mkdir(parents=True, exist_ok=True)
    cells = cells_frame(results)
    summary = summarise(cells)
    cells_csv, summary_csv = directory / "cells.csv", directory / "summary.csv"
    cells.write_csv(cells_csv)
    summary.write_csv(summary_csv)

    sections: list[tuple[str, str]] = []
    for model in _own(summary)["model"].unique(maintain_order=True).to_list():
        sections.append((f"Accuracy, {model} (mean ± std over seeds)", accuracy_table(summary, model)))
    sections.append(("Improvement of CM+Z over Z (percentage points)", improvement_table(summary)))
    transfer = transfer_table(summary)
    if transfer:
        sections.append(("Bank transferred to another model", transfer))
    sections.append(("Cost per cell (means over seeds; requests summed)", cost_table(summary)))

    figures = _figures(cells, summary, directory / "figures")
    markdown = directory / "results.md"
    body = [f"# {title}", ""]
    for heading, table in sections:
        body += [f"## {heading}", "", table, ""]
    body += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures]
    markdown.write_text("\n".join(body) + "\n", encoding="utf-8")

    page = directory / "report.html"
    page.write_text(_html(title, sections, figures), encoding="utf-8")
    return Report(page=page, markdown=markdown, cells_csv=cells_csv, summary_csv=summary_csv, figures=figures)


def _html_table(markdown: str) -> str:
    lines = markdown.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]

    def cell(text: str, tag: str) -> str:
        bold = text.startswith("**") and text.endswith("**")
        inner = html.escape(text.strip("*"))
        return f"<{tag}>{f'<b>{inner}</b>' if bold else inner}</{tag}>"

    head = "".join(cell(c, "th") for c in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(title: str, sections: Sequence[tuple[str, str]], figures: Sequence[Path]) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin-bottom:1.5em;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:1em 0}"
    )
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(
        "<p>Bold: CM+Z beats Z of the same strategy and budget. Files: results.md, summary.csv, cells.csv.</p>"
    )
    for heading, table in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{_html_table(table)}")
    parts.append("<h2>Figures</h2>")
    for figure in figures:
        name = html.escape(figure.name)
        parts.append(f"<p><a href='figures/{name}'>{name}</a><br><img src='figures/{name}' alt='{name}'></p>")
    return "\n".join(parts) + "\n"
