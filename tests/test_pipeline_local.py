"""`cli.py run` and `evaluate` on the embedded default: SQLite and local worker processes."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score
from sqlalchemy import func, select

from cli import cli
from db.models import Result, Scan
from db.session import session_scope
from vision.modelio import write_card

pytestmark = pytest.mark.slow
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def run_json(*args):
    result = CliRunner().invoke(cli, [*args, "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_run_on_sqlite_reports_sklearn_metrics_and_fails_the_corrupt_scan(scan_folder, shipped_model, env_for):
    settings, _ = env_for(shipped_model)
    report = run_json("run", str(scan_folder))

    assert settings.database_url.startswith("sqlite:///")
    assert (report["scans"], report["labelled"], report["unlabelled"], report["failed"]) == (18, 16, 1, 1)
    with session_scope(settings.database_url) as s:
        rows = s.execute(select(Scan.true_label, Result.predicted_label).join(Result, Scan.result_id == Result.id)
                         .where(Scan.job_id == report["job"], Scan.true_label.is_not(None))).all()
        per_scan = s.execute(select(Scan.path, func.count(Scan.result_id)).where(Scan.job_id == report["job"])
                             .group_by(Scan.path)).all()
        failed = s.execute(select(Scan.path, Scan.error).where(Scan.status == "failed")).all()
    y_true, y_pred = [r[0] for r in rows], [r[1] for r in rows]
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["macro_avg"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert sorted(n for _, n in per_scan) == [0] + [1] * 17
    assert [(p, e.split(":")[0]) for p, e in failed] == [("glioma/truncated.jpg", "corrupt JPEG")]


def test_evaluate_equals_run_then_report(scan_folder, shipped_model, env_for):
    env_for(shipped_model)
    evaluated = run_json("evaluate", str(scan_folder), "--model", str(shipped_model))
    run_json("run", str(scan_folder))
    reported = run_json("report")

    drop = ("job",)
    assert {k: v for k, v in evaluated.items() if k not in drop} == {k: v for k, v in reported.items() if k not in drop}


def test_export_writes_csv_and_heatmaps_on_each_scans_pixel_grid(scan_folder, shipped_model, env_for, tmp_path):
    env_for(shipped_model)
    job = run_json("run", str(scan_folder))["job"]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(job), "--out", str(out)], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "sha256", "true_label", "predicted_label", *[f"p_{c}" for c in CLASSES],
                             "status", "error", "model_sha256", "served_in", "study_instance_uid", "series_instance_uid",
                             "sop_instance_uid", "modality", "series_description"]
    assert len(rows) == 18
    by_path = {r["path"]: r for r in rows}
    assert by_path["glioma/truncated.jpg"]["status"] == "failed"
    done = [r for r in rows if r["status"] == "done"]
    for row in done:
        probs = [float(row[f"p_{c}"]) for c in CLASSES]
        assert CLASSES[int(np.argmax(probs))] == row["predicted_label"]
        with Image.open(scan_folder / row["path"]) as scan, Image.open(out / "heatmaps" / f"{row['path']}.png") as hm, \
                Image.open(out / "overlays" / f"{row['path']}.png") as ov:
            assert hm.size == scan.size and hm.mode == "L"
            assert ov.size == scan.size and ov.mode == "RGB"
    assert not (out / "heatmaps" / "glioma" / "truncated.jpg.png").exists()


def test_run_on_a_missing_folder_fails_with_a_clear_message(shipped_model, env_for, tmp_path):
    env_for(shipped_model)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope")])

    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'nope'}: no such folder\n"


def test_run_with_an_unreadable_model_fails_without_leaving_a_job(scan_folder, env_for, tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    settings, _ = env_for(bad)
    result = CliRunner().invoke(cli, ["run", str(scan_folder)])

    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'bad.json'}: model card not found next to the model\n"


def test_a_model_the_worker_processes_cannot_load_stops_run_at_once_with_the_reason(tiny_model, scan_folder,
                                                                                    env_for, tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    write_card(bad, json.loads(tiny_model.with_suffix(".json").read_text()))  # a card that matches the bytes
    settings, _ = env_for(bad)
    result = CliRunner().invoke(cli, ["run", str(scan_folder), "--workers", "2"])

    assert result.exit_code == 1
    assert result.output.startswith(f"job 1\nError: {bad}: cannot be loaded in safe mode: ")
    assert result.output.count("\n") == 2
    with session_scope(settings.database_url) as s:  # the job stays recorded, no scan touched
        assert s.execute(select(Scan.status, func.count(), func.sum(Scan.attempts)).group_by(Scan.status)).all() \
            == [("pending", 18, 0)]


def test_scans_the_model_was_trained_on_are_counted_and_left_out_of_unseen(tiny_model, scan_folder, env_for):
    from PIL import Image

    Image.open(scan_folder / "glioma" / "Tr-gl_0207.jpg").rotate(90).save(scan_folder / "glioma" / "new.png")
    env_for(tiny_model)
    report = run_json("run", str(scan_folder))

    # The tiny model was trained and validated on the 16 example scans; only the rotated copy is new.
    assert report["labelled"] == 17 and report["seen_in_training"] == 16
    assert report["unseen"]["labelled"] == 1
    assert set(report["unseen"]) == {"labelled", "accuracy", "per_class", "macro_avg", "weighted_avg",
                                     "confusion_matrix"}
    assert report["unseen"]["per_class"]["glioma"]["support"] == 1


def test_a_byte_identical_copy_in_the_same_batch_is_computed_once_and_counted_as_cached(tiny_model, scan_folder,
                                                                                       env_for):
    import shutil

    shutil.copy(scan_folder / "glioma" / "Tr-gl_0207.jpg", scan_folder / "glioma" / "twin.jpg")
    settings, _ = env_for(tiny_model)
    report = run_json("run", str(scan_folder))

    with session_scope(settings.database_url) as s:
        rows = s.execute(select(Scan.path, Scan.from_cache, Scan.result_id).where(
            Scan.job_id == report["job"], Scan.path.in_(["glioma/Tr-gl_0207.jpg", "glioma/twin.jpg"]))
            .order_by(Scan.path)).all()
        results = s.scalar(select(func.count()).select_from(Result))
        cached = s.scalar(select(func.count()).where(Scan.job_id == report["job"], Scan.from_cache.is_(True)))
    assert [(path, cached) for path, cached, _ in rows] == [("glioma/Tr-gl_0207.jpg", False),
                                                            ("glioma/twin.jpg", True)]
    assert rows[0][2] == rows[1][2]
    # The unlabelled scan is a copy of a pituitary example: two twins, 16 distinct contents, 16 results.
    assert (results, cached) == (16, 2)


def test_each_result_records_the_precision_it_was_served_in(tiny_model, scan_folder, env_for):
    settings, _ = env_for(tiny_model, BRAINSCAN_PRECISION="float32")
    report = run_json("run", str(scan_folder))

    with session_scope(settings.database_url) as s:
        served = s.execute(select(Result.served_in, func.count()).group_by(Result.served_in)).all()
    assert served == [("float32", 16)]  # 16 distinct contents among the 17 done scans
    assert report["served_in"] == {"float32": 17}


def test_a_job_whose_results_mix_precisions_says_so(tiny_model, scan_folder, env_for):
    from PIL import Image

    env_for(tiny_model, BRAINSCAN_PRECISION="float32")
    run_json("run", str(scan_folder))
    Image.open(scan_folder / "glioma" / "Tr-gl_0207.jpg").rotate(90).save(scan_folder / "glioma" / "new.png")
    env_for(tiny_model, BRAINSCAN_PRECISION="mixed_bfloat16")
    result = CliRunner().invoke(cli, ["run", str(scan_folder)], catch_exceptions=False)

    # The 17 scans seen before are cache hits and keep the precision that computed them.
    assert result.exit_code == 0, result.output
    assert "results served in more than one precision: float32 17, mixed_bfloat16 1\n" in result.output


def test_export_gives_each_row_the_precision_it_was_served_in(tiny_model, scan_folder, env_for, tmp_path):
    env_for(tiny_model, BRAINSCAN_PRECISION="float32")
    run_json("run", str(scan_folder))
    Image.open(scan_folder / "glioma" / "Tr-gl_0207.jpg").rotate(90).save(scan_folder / "glioma" / "new.png")
    env_for(tiny_model, BRAINSCAN_PRECISION="mixed_bfloat16")
    job = run_json("run", str(scan_folder))["job"]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(job), "--out", str(out)], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as fh:
        served = {r["path"]: r["served_in"] for r in csv.DictReader(fh)}
    assert served["glioma/new.png"] == "mixed_bfloat16"
    assert served["glioma/truncated.jpg"] == ""  # failed: no result
    assert sorted(set(served.values())) == ["", "float32", "mixed_bfloat16"]
    assert list(served.values()).count("float32") == 17
