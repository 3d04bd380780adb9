"""The report object (jobs.report.job_report) as JSON, aligned text, CSV or Markdown: the same numbers in each.

CSV carries full-precision numbers, one row per class and scope plus macro, weighted and accuracy rows;
Markdown rounds to 4 decimals for reading. An undefined metric is an empty CSV cell and `n/a` in Markdown.
"""
from __future__ import annotations

import csv
import io
import json

from jobs.report import format_table, served_in_text

FORMATS = ("table", "json", "csv", "markdown")
CSV_COLUMNS = ("scope", "row", "precision", "recall", "f1", "support", "auc", "accuracy")
CLASS_METRICS = ("precision", "recall", "f1", "support", "auc")


def _csv_num(value) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


def csv_rows(report: dict) -> list[dict]:
    """Per class, macro_avg, weighted_avg and accuracy rows for scope `all` and then scope `unseen`."""
    rows = []
    for scope, block in (("all", report), ("unseen", report["unseen"])):
        for cls, m in block["per_class"].items():
            rows.append({"scope": scope, "row": cls, **{k: m[k] for k in CLASS_METRICS}})
        for name in ("macro_avg", "weighted_avg"):
            rows.append({"scope": scope, "row": name, **block[name], "support": block["labelled"]})
        rows.append({"scope": scope, "row": "accuracy", "support": block["labelled"], "accuracy": block["accuracy"]})
    return rows


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(report):
        writer.writerow({k: _csv_num(row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue().rstrip("\n")


def _md(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _md_metrics(block: dict) -> list[str]:
    rows = [[cls, *(_md(m[k]) for k in ("precision", "recall", "f1")), m["support"], _md(m["auc"])]
            for cls, m in block["per_class"].items()]
    for name in ("macro_avg", "weighted_avg"):
        rows.append([name, *(_md(block[name][k]) for k in ("precision", "recall", "f1")), block["labelled"], ""])
    return _md_table(["class", "precision", "recall", "f1", "support", "auc"], rows)


def to_markdown(report: dict) -> str:
    lines = [
        f"# brainscan report: job {report['job']}",
        "",
        f"- status: {report['status']}",
        f"- folder: `{report['folder']}`",
        f"- model: {report['model']} (`{report['model_sha256'][:12]}`)",
        f"- served in: {served_in_text(report) or 'no results yet'}",
        f"- scans: {report['scans']}, labelled: {report['labelled']}, unlabelled: {report['unlabelled']}, "
        f"failed: {report['failed']}, pending: {report['pending']}",
        f"- accuracy: {_md(report['accuracy'])}",
        "",
    ]
    if not report["labelled"]:
        lines.append("No labelled scans: metrics need labels (class folders or --labels FILE.csv).")
    else:
        lines += ["## Per class", ""] + _md_metrics(report) + [""]
        cm = report["confusion_matrix"]
        lines += ["## Confusion matrix (rows = true, columns = predicted)", ""]
        lines += _md_table(["true \\ predicted", *cm["labels"]],
                           [[c, *row] for c, row in zip(cm["labels"], cm["matrix"])])
        u = report["unseen"]
        lines += ["", "## Scans the model did not see in training", "",
                  f"{report['seen_in_training']} labelled scans were in the model's training or validation set; "
                  f"{u['labelled']} were not.", "", f"- accuracy (unseen): {_md(u['accuracy'])}", ""]
        lines += _md_metrics(u) if u["labelled"] else ["No unseen labelled scans."]
    if report["failures"]:
        lines += ["", "## Failed scans by reason", ""]
        lines += _md_table(["reason", "scans"], [[reason or "", n] for reason, n in report["failures"].items()])
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1)


RENDERERS = {"table": format_table, "json": to_json, "csv": to_csv, "markdown": to_markdown}


def render(report: dict, fmt: str) -> str:
    """The report in one of FORMATS."""
    return RENDERERS[fmt](report)
