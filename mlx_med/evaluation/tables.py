"""Headline numbers of an eval as one flat row, and Markdown tables of such rows (CLI, sweeps, report)."""

from __future__ import annotations

from typing import Any


def metrics_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one eval, flat (used by tables, sweeps and the report)."""
    row = {k: metrics.get(k) for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")}
    row["sacrebleu"] = metrics.get("sacrebleu", {}).get("bleu")
    row["rougeL(rs)"] = metrics.get("rouge_score", {}).get("rougeL")
    if "choice" in metrics:
        row["accuracy"] = metrics["choice"]["accuracy"]
    row["out_tokens"] = metrics.get("lengths", {}).get("mean_output_tokens")
    if "perplexity" in metrics:
        row["ppl"] = metrics["perplexity"]["perplexity"]
    row["n"] = metrics.get("n")
    return row


def markdown_table(rows: list[dict[str, Any]], digits: int = 2) -> str:
    """A GitHub markdown table; the columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def format_metrics_table(named: dict[str, dict[str, Any]]) -> str:
    """Markdown table of several evals' headline metrics, one row per name."""
    return markdown_table([{"eval": name, **metrics_row(m)} for name, m in named.items()])
