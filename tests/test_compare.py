"""`report JOB --compare OTHER` and `jobs`, on two real jobs whose predictions differ in exactly one scan.

Job A: a tiny model trained by the project's own code, run on the 16 example scans. Model B is model A
with one logits bias raised by just enough to flip the one scan closest to that class (the gap is read
from job A's stored probabilities); job B runs model B on the same scans renamed, one left out and one new
(a mirrored example). Matched by content, exactly one prediction changed.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps
from sqlalchemy import select

from cli import cli
from db.models import Job, Result, Scan
from db.session import session_scope
from jobs.report import job_report
from tests.conftest import report_tiny_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "scans"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
LEFT_OUT = "notumor/Tr-no_1015.jpg"




def invoke(*args, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def flip_one(probabilities: dict[str, list[float]], skip: str) -> tuple[int, float, str]:
    """(class index k, logit shift, path): raising logit k by the shift makes exactly that scan predict k.

    A scan predicts k once the shift exceeds its gap, max log-probability minus log-probability of k; the
    shift is the midpoint between the smallest and the next gap of the class where they differ most.
    """
    best = None
    for k in range(len(CLASSES)):
        gaps = sorted((float(np.max(np.log(p)) - np.log(p[k])), path) for path, p in probabilities.items()
                      if int(np.argmax(p)) != k and path != skip)
        if len(gaps) >= 2 and (best is None or gaps[1][0] - gaps[0][0] > best[0]):
            best = (gaps[1][0] - gaps[0][0], k, (gaps[0][0] + gaps[1][0]) / 2, gaps[0][1])
    assert best is not None and best[0] > 1e-4, "no class separates one scan from the rest"
    return best[1], best[2], best[3]


def shifted_model(model_a: Path, k: int, shift: float, out: Path) -> Path:
    """Model A with logits bias k raised by `shift`, saved with its card as a model of its own."""
    import keras

    from vision.modelio import read_card, write_card

    model = keras.saving.load_model(model_a, compile=False, safe_mode=True)
    layer = model.get_layer("logits")
    bias = np.array(layer.bias.numpy())
    bias[k] += shift
    layer.bias.assign(bias)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    write_card(out, dict(read_card(model_a), name="tiny-b"))
    return out


def renamed_copy(dest: Path) -> Path:
    """The examples as `<class>/night2-<name>`, less LEFT_OUT, plus a mirrored glioma (new content)."""
    for src in sorted(EXAMPLES.glob("*/*.jpg")):
        rel = f"{src.parent.name}/{src.name}"
        if rel != LEFT_OUT:
            (dest / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / src.parent.name / f"night2-{src.name}")
    with Image.open(EXAMPLES / "glioma" / "Tr-gl_0207.jpg") as im:
        ImageOps.mirror(im).save(dest / "glioma" / "night2-mirrored.png")
    return dest


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from config import load_settings
    from jobs.lifecycle import new_job, run_job

    work = tmp_path_factory.mktemp("compare")
    model_a = report_tiny_model(tmp_path_factory)
    folder_a = shutil.copytree(EXAMPLES, work / "night1")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DATABASE_URL", raising=False)
        mp.delenv("BROKER_URL", raising=False)
        mp.setenv("BRAINSCAN_VAR", str(work / "var"))
        mp.setenv("BRAINSCAN_MODEL", str(model_a))
        settings = load_settings()
        job_a = new_job(settings, folder_a)
        run_job(settings, job_a, workers=1)
        with session_scope(settings.database_url) as s:
            probabilities = dict(s.execute(
                select(Scan.path, Result.probabilities).join(Result, Scan.result_id == Result.id)
                .where(Scan.job_id == job_a)).all())
        k, shift, flipped = flip_one(probabilities, skip=LEFT_OUT)
        model_b = shifted_model(model_a, k, shift, work / "model-b" / "tiny-b.keras")
        settings_b = dataclasses.replace(settings, model_path=model_b)
        job_b = new_job(settings_b, renamed_copy(work / "night2"))
        run_job(settings_b, job_b, workers=1)
        yield {"settings": settings, "a": job_a, "b": job_b, "flipped": flipped, "k": CLASSES[k]}


def compare_json(pair, *extra) -> dict:
    return json.loads(invoke("report", str(pair["b"]), "--compare", str(pair["a"]), "--format", "json", *extra))


def test_compare_lists_exactly_the_scan_whose_prediction_changed(pair):
    path_a = pair["flipped"]
    cls, name = path_a.split("/")
    with session_scope(pair["settings"].database_url) as s:
        rows = {job: s.execute(select(Scan.sha256, Scan.true_label, Result.predicted_label, Result.probabilities)
                               .join(Result, Scan.result_id == Result.id)
                               .where(Scan.job_id == job, Scan.path == path)).one()
                for job, path in ((pair["a"], path_a), (pair["b"], f"{cls}/night2-{name}"))}
    a, b = rows[pair["a"]], rows[pair["b"]]
    assert a.sha256 == b.sha256 and b.predicted_label == pair["k"] != a.predicted_label
    verdict = "fixed" if b.predicted_label == a.true_label else "broken" if a.predicted_label == a.true_label \
        else "still wrong"
    assert compare_json(pair)["changed"] == [{
        "sha256": a.sha256, "path_a": path_a, "path_b": f"{cls}/night2-{name}", "true_label": a.true_label,
        "predicted_a": a.predicted_label, "predicted_b": b.predicted_label,
        "probability_a": max(a.probabilities), "probability_b": max(b.probabilities), "verdict": verdict,
    }]


def test_compare_names_both_jobs_and_models(pair):
    cmp = compare_json(pair)
    assert (cmp["a"]["job"], cmp["a"]["model"], cmp["b"]["job"], cmp["b"]["model"]) == (pair["a"], "tiny", pair["b"],
                                                                                         "tiny-b")
    assert cmp["a"]["model_sha256"] != cmp["b"]["model_sha256"]


def test_compare_matches_scans_by_content_and_counts_the_unmatched(pair):
    cmp = compare_json(pair)
    assert (cmp["matched"], cmp["only_in_a"], cmp["only_in_b"]) == (15, 1, 1)


def test_compare_deltas_are_job_minus_other(pair):
    with session_scope(pair["settings"].database_url) as s:
        a, b = job_report(s, pair["a"]), job_report(s, pair["b"])
    cmp = compare_json(pair)
    assert cmp["accuracy"] == {"a": a["accuracy"], "b": b["accuracy"], "delta": b["accuracy"] - a["accuracy"]}
    assert cmp["macro_f1"] == {"a": a["macro_avg"]["f1"], "b": b["macro_avg"]["f1"],
                               "delta": b["macro_avg"]["f1"] - a["macro_avg"]["f1"]}
    for cls in CLASSES:
        fa, fb = a["per_class"][cls]["f1"], b["per_class"][cls]["f1"]
        assert cmp["per_class_f1"][cls] == {"a": fa, "b": fb, "delta": None if None in (fa, fb) else fb - fa}


def test_compare_text_shows_the_deltas_and_the_changed_scan(pair):
    cmp = compare_json(pair)
    c = cmp["changed"][0]
    lines = invoke("report", str(pair["b"]), "--compare", str(pair["a"])).splitlines()
    assert lines[0] == (f"job {pair['a']} (model tiny {cmp['a']['model_sha256'][:12]}) -> job {pair['b']} "
                        f"(model tiny-b {cmp['b']['model_sha256'][:12]})")
    assert f"{'accuracy':<20}{cmp['accuracy']['a']:>10.4f}{cmp['accuracy']['b']:>10.4f}" \
           f"{cmp['accuracy']['delta']:>+10.4f}" in lines
    assert lines[-3:] == [
        f"15 scans matched by content; 1 only in job {pair['a']}, 1 only in job {pair['b']}",
        "1 prediction changed:",
        f"  {c['path_a']}  true {c['true_label']}: {c['predicted_a']} {c['probability_a']:.3f} -> "
        f"{c['predicted_b']} {c['probability_b']:.3f} ({c['verdict']})",
    ]


def test_compare_csv_has_one_row_per_changed_scan(pair):
    c = compare_json(pair)["changed"][0]
    rows = list(csv.DictReader(io.StringIO(invoke("report", str(pair["b"]), "--compare", str(pair["a"]),
                                                  "--format", "csv"))))
    assert rows == [{k: str(v) for k, v in c.items()}]


def test_compare_markdown_lists_the_changed_scan(pair):
    c = compare_json(pair)["changed"][0]
    text = invoke("report", str(pair["b"]), "--compare", str(pair["a"]), "--format", "markdown")
    assert "## 1 changed prediction" in text.splitlines()
    assert (f"| `{c['path_a']}` | {c['true_label']} | {c['predicted_a']} ({c['probability_a']:.3f}) | "
            f"{c['predicted_b']} ({c['probability_b']:.3f}) | {c['verdict']} |") in text.splitlines()


def test_a_job_compared_with_itself_changes_nothing(pair):
    cmp = json.loads(invoke("report", str(pair["a"]), "--compare", str(pair["a"]), "--format", "json"))
    assert (cmp["changed"], cmp["matched"], cmp["only_in_a"], cmp["only_in_b"]) == ([], 16, 0, 0)
    assert cmp["accuracy"]["delta"] == 0.0


def test_compare_with_an_unknown_job_says_so(pair):
    assert invoke("report", str(pair["a"]), "--compare", "999", code=1) == "Error: job 999 not found\n"


def test_html_and_compare_together_are_refused(pair, tmp_path):
    out = invoke("report", str(pair["a"]), "--compare", str(pair["b"]), "--html", str(tmp_path / "x.html"), code=2)
    assert "--html and --compare are separate reports: give one of them" in out
    assert not (tmp_path / "x.html").exists()


def test_jobs_lists_newest_first_with_counts_accuracy_status_and_model(pair):
    with session_scope(pair["settings"].database_url) as s:
        jobs = {j: s.get(Job, j) for j in (pair["a"], pair["b"])}
        expected = [{"id": j.id, "started": j.created_at.replace(tzinfo=None).isoformat(timespec="seconds") + "+00:00",
                     "folder": j.folder, "scans": 16, "failed": 0, "accuracy": job_report(s, j.id)["accuracy"],
                     "status": "complete", "model": name}
                    for j, name in ((jobs[pair["b"]], "tiny-b"), (jobs[pair["a"]], "tiny"))]
    assert json.loads(invoke("jobs", "--format", "json")) == expected


def test_jobs_table_has_one_aligned_line_per_job(pair):
    lines = invoke("jobs").splitlines()
    assert lines[0].split() == ["id", "started", "(UTC)", "folder", "scans", "failed", "accuracy", "status", "model"]
    assert [line.split()[0] for line in lines[1:]] == [str(pair["b"]), str(pair["a"])]
    assert [line.split()[-2:] for line in lines[1:]] == [["complete", "tiny-b"], ["complete", "tiny"]]
    assert invoke("jobs", "--limit", "1").splitlines()[1:] == lines[1:2]
