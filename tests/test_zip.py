"""A ZIP archive as FOLDER: scans read in place, member paths, class folders inside, a broken member fails alone."""
from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.scanning import FolderError, find_scans, list_scans
from tests.conftest import EXAMPLES
from tests.test_dicom import MULTI_FRAME, pixels, windowed12
from training.data import cached_arrays, labelled_examples
from vision.preprocess import DEFAULTS

BROKEN = "glioma/broken.jpg"
# The same bytes through the same model in the same batch: equal up to float noise.
PROB_TOL = 1e-5


def archive_of(tmp_path: Path) -> tuple[Path, Path]:
    """(archive, the same scans unzipped): the examples in class folders, a 3-frame DICOM object, a text file,
    and in the archive only, a member whose stored bytes were damaged after its CRC was written."""
    folder = tmp_path / "unzipped"
    files = {p.relative_to(EXAMPLES).as_posix(): p.read_bytes() for p in sorted(EXAMPLES.glob("*/*.jpg"))}
    files["glioma/series3.dcm"] = windowed12(np.stack([pixels(n) for n in MULTI_FRAME]))
    files["notes/readme.txt"] = b"night archive 2026-12-08\n"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    archive = tmp_path / "night.zip"
    broken = (EXAMPLES / "pituitary" / "Tr-pi_0956.jpg").read_bytes()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
        zf.writestr("glioma/", b"")  # a directory entry, as zip tools write them
        zf.writestr(BROKEN, broken, compress_type=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    at = raw.find(broken) + len(broken) // 2  # stored: the member's bytes lie in the archive as they are
    raw[at] ^= 0xFF
    archive.write_bytes(bytes(raw))
    return archive, folder


def test_listing_an_archive_is_listing_its_unzipped_folder_plus_the_broken_member(tmp_path):
    archive, folder = archive_of(tmp_path)
    in_zip = {s.relpath: s for s in find_scans(archive)}
    on_disk = {s.relpath: s for s in find_scans(folder)}

    assert set(in_zip) == set(on_disk) | {BROKEN}
    assert all(in_zip[p] == on_disk[p] for p in on_disk)  # same sha256, size and DICOM attributes
    assert "glioma/series3.dcm#frame=3" in in_zip
    assert in_zip[BROKEN].sha256 == ""  # kept (named and sniffed as a JPEG) to fail with its reason


def test_unsafe_and_duplicate_member_names(tmp_path):
    scan = (EXAMPLES / "notumor" / "Tr-no_1379.jpg").read_bytes()
    other = (EXAMPLES / "glioma" / "Tr-gl_0207.jpg").read_bytes()
    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.jpg", scan)  # never a scan path: export would write outside its folder
        zf.writestr("/abs.jpg", scan)
        zf.writestr("a/x.jpg", scan)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("a/x.jpg", other)  # ZipFile.open reads the last one, and so does the listing
    found = find_scans(archive)

    assert [s.relpath for s in found] == ["a/x.jpg"]
    assert found[0].size == len(other)


def test_an_unreadable_archive_is_a_folder_error(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(FolderError, match="bad.zip: not a readable ZIP archive"):
        list_scans(bad)
    with pytest.raises(FolderError, match="gone.zip: no such archive"):
        list_scans(tmp_path / "gone.zip")
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(FolderError, match="empty.zip: empty archive"):
        list_scans(empty)


def test_training_reads_an_archive_like_its_folder(tmp_path):
    archive, folder = archive_of(tmp_path)
    from_zip, from_folder = labelled_examples(archive), labelled_examples(folder)

    assert [(e.sha256, e.label) for e in from_zip] == [(e.sha256, e.label) for e in from_folder]
    assert len(from_zip) == 16 + 3  # the broken member has no hash; each frame is an example
    params = dict(DEFAULTS, size=64)
    np.testing.assert_array_equal(cached_arrays(from_zip, params, tmp_path / "c1"),
                                  cached_arrays(from_folder, params, tmp_path / "c2"))


def _results(url: str, job_id: int) -> dict:
    from sqlalchemy import select

    from db.models import Result, Scan
    from db.session import session_scope

    with session_scope(url) as session:
        rows = session.execute(select(Scan, Result).outerjoin(Result, Scan.result_id == Result.id)
                               .where(Scan.job_id == job_id)).all()
        return {s.path: (s.status, s.error, s.true_label, s.from_cache,
                         r.predicted_label if r else None, r.probabilities if r else None) for s, r in rows}


@pytest.mark.slow
def test_an_archive_classifies_like_its_unzipped_folder_and_exports_heatmaps(tmp_path, tiny_model, env_for):
    from cli import cli

    archive, folder = archive_of(tmp_path)
    runs = {}
    # Two databases, so that the folder's scans are classified afresh, not taken from the archive's cache.
    for name, source in (("zip", archive), ("folder", folder)):
        settings, _ = env_for(tiny_model, database_url=f"sqlite:///{tmp_path / name}.sqlite")
        result = CliRunner().invoke(cli, ["run", str(source), "--format", "json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        runs[name] = (settings, report, _results(settings.database_url, report["job"]))
    (zip_settings, zip_report, in_zip), (_, folder_report, on_disk) = runs["zip"], runs["folder"]

    assert (zip_report["scans"], zip_report["failed"]) == (20, 1)
    assert (folder_report["scans"], folder_report["failed"]) == (19, 0)
    assert zip_report["folder"] == str(archive.resolve())
    assert in_zip[BROKEN][:2] == ("failed", f"corrupt archive member: Bad CRC-32 for file '{BROKEN}'")
    for path, (status, _, label, cached, predicted, probs) in on_disk.items():
        z_status, _, z_label, z_cached, z_predicted, z_probs = in_zip[path]
        assert (z_status, z_label, z_predicted, z_cached, cached) == (status, label, predicted, False, False), path
        np.testing.assert_allclose(z_probs, probs, atol=PROB_TOL)
    assert in_zip["glioma/series3.dcm#frame=2"][2] == "glioma"  # labels from the class folders inside

    env_for(tiny_model, database_url=zip_settings.database_url)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(zip_report["job"]), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "19 heatmap/overlay pairs" in result.output
    with open(out / "results.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows[BROKEN]["status"] == "failed" and rows[BROKEN]["error"].startswith("corrupt archive member")
    for rel, size in (("meningioma/Tr-me_0185.jpg", (226, 212)), ("glioma/series3.dcm#frame=2", (512, 512))):
        with Image.open(out / "heatmaps" / f"{rel}.png") as hm, Image.open(out / "overlays" / f"{rel}.png") as ov:
            assert hm.size == ov.size == size
