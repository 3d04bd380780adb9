"""`report --format json|csv|markdown`: three renderings of one real job's report, carrying the same numbers.

The job: a tiny model trained by the project's own code on the 16 example scans, run through the local
pipeline on those scans plus a truncated JPEG (fails) and an unlabelled copy (not in the metrics).
"""
from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner

from cli import cli
from tests.conftest import make_scan_folder, report_tiny_model

pytestmark = pytest.mark.slow
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
METRICS = ("precision", "recall", "f1", "support", "auc")




def invoke(*args) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{format: stdout of `report JOB --format FORMAT`} of one real job."""
    from config import load_settings
    from jobs.lifecycle import new_job, run_job

    work = tmp_path_factory.mktemp("report-formats")
    model = report_tiny_model(tmp_path_factory)
    folder = make_scan_folder(work / "archive")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DATABASE_URL", raising=False)
        mp.delenv("BROKER_URL", raising=False)
        mp.setenv("BRAINSCAN_VAR", str(work / "var"))
        mp.setenv("BRAINSCAN_MODEL", str(model))
        mp.setenv("BRAINSCAN_PRECISION", "float32")
        settings = load_settings()
        job = new_job(settings, folder)
        run_job(settings, job, workers=1)
        yield {fmt: invoke("report", str(job), "--format", fmt) for fmt in ("json", "csv", "markdown", "table")}


@pytest.fixture(scope="module")
def report(outputs) -> dict:
    return json.loads(outputs["json"])


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def number(cell: str):
    return None if cell == "" else int(cell) if cell.isdigit() else float(cell)


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """{heading: rows of the first table under it (header row first, separator dropped)}."""
    tables, heading = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not set(line) <= set("|-: "):
            tables.setdefault(heading, []).append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return tables


def four(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def test_the_job_has_labelled_unlabelled_and_failed_scans(report):
    assert (report["scans"], report["labelled"], report["unlabelled"], report["failed"]) == (18, 16, 1, 1)


def test_csv_has_a_row_per_class_then_macro_weighted_and_accuracy_for_each_scope(outputs):
    rows = csv_rows(outputs["csv"])
    assert list(rows[0]) == ["scope", "row", "precision", "recall", "f1", "support", "auc", "accuracy"]
    names = [*CLASSES, "macro_avg", "weighted_avg", "accuracy"]
    assert [(r["scope"], r["row"]) for r in rows] == [(s, n) for s in ("all", "unseen") for n in names]


def test_csv_carries_the_json_numbers_exactly(outputs, report):
    rows = {(r["scope"], r["row"]): {k: number(v) for k, v in r.items() if k not in ("scope", "row")}
            for r in csv_rows(outputs["csv"])}
    for scope, block in (("all", report), ("unseen", report["unseen"])):
        for cls in CLASSES:
            assert rows[(scope, cls)] == {**{k: block["per_class"][cls][k] for k in METRICS}, "accuracy": None}
        for avg in ("macro_avg", "weighted_avg"):
            assert rows[(scope, avg)] == {**block[avg], "support": block["labelled"], "auc": None, "accuracy": None}
        assert rows[(scope, "accuracy")] == {"precision": None, "recall": None, "f1": None, "auc": None,
                                             "support": block["labelled"], "accuracy": block["accuracy"]}


def test_csv_leaves_undefined_metrics_empty(outputs, report):
    """Every labelled example trained the tiny model, so nothing is unseen and every unseen metric is undefined."""
    assert report["unseen"]["labelled"] == 0
    unseen = [r for r in csv_rows(outputs["csv"]) if r["scope"] == "unseen"]
    assert {r[k] for r in unseen for k in ("precision", "recall", "f1", "auc", "accuracy")} == {""}
    assert {r["support"] for r in unseen} == {"0"}


def test_markdown_per_class_table_carries_the_json_numbers(outputs, report):
    table = markdown_tables(outputs["markdown"])["Per class"]
    assert table[0] == ["class", "precision", "recall", "f1", "support", "auc"]
    expected = [[c, *(four(report["per_class"][c][k]) for k in METRICS)] for c in CLASSES]
    expected += [[avg, *(four(report[avg][k]) for k in ("precision", "recall", "f1")), str(report["labelled"]), ""]
                 for avg in ("macro_avg", "weighted_avg")]
    assert table[1:] == expected


def test_markdown_confusion_matrix_and_counts_carry_the_json_numbers(outputs, report):
    text = outputs["markdown"]
    table = markdown_tables(text)["Confusion matrix (rows = true, columns = predicted)"]
    assert table[0] == ["true \\ predicted", *CLASSES]
    assert [[row[0], *map(int, row[1:])] for row in table[1:]] == [
        [c, *row] for c, row in zip(CLASSES, report["confusion_matrix"]["matrix"])]
    assert "- scans: 18, labelled: 16, unlabelled: 1, failed: 1, pending: 0" in text.splitlines()
    assert f"- accuracy: {four(report['accuracy'])}" in text.splitlines()
    reasons = markdown_tables(text)["Failed scans by reason"]
    assert reasons[1:] == [[reason, str(n)] for reason, n in report["failures"].items()]


def test_markdown_counts_the_scans_by_the_precision_they_were_served_in(outputs, report):
    assert report["served_in"] == {"float32": 17}
    assert "- served in: float32 17" in outputs["markdown"].splitlines()


def test_markdown_says_when_no_labelled_scan_was_unseen(outputs):
    assert "16 labelled scans were in the model's training or validation set; 0 were not." in outputs["markdown"]
    assert "No unseen labelled scans." in outputs["markdown"]


def test_table_still_prints_the_aligned_text(outputs, report):
    assert outputs["table"].splitlines()[0] == (f"job {report['job']} (complete): 18 scans, 16 labelled, "
                                                "1 unlabelled (not in metrics), 1 failed, 0 pending")


@pytest.mark.parametrize("command", ["run", "evaluate", "report"])
def test_run_evaluate_and_report_accept_every_format(command):
    assert "--format [table|json|csv|markdown]" in invoke(command, "--help")
