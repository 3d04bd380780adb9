"""Preparing a batch's new contents: in threads as one at a time, each content once, a failing path not the end."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np

from db.models import Job, Scan
from jobs.processing import prepare_new
from vision.preprocess import DEFAULTS
from tests.conftest import EXAMPLES


def scans_of(folder):
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    return [Scan(id=i, path=p, sha256=hashlib.sha256((folder / p).read_bytes()).hexdigest())
            for i, p in enumerate(paths, 1)]


def test_threads_prepare_exactly_what_one_thread_prepares():
    job, scans = Job(folder=str(EXAMPLES)), scans_of(EXAMPLES)
    one = prepare_new(job, scans, {}, DEFAULTS, threads=1)
    four = prepare_new(job, scans, {}, DEFAULTS, threads=4)

    assert list(four[0]) == list(one[0]) and len(one[0]) == 16
    assert four[1] == one[1] and four[2] == one[2] == {}
    for sha in one[0]:
        np.testing.assert_array_equal(four[0][sha].array, one[0][sha].array)
        assert four[0][sha].box == one[0][sha].box


def test_a_content_missing_at_its_first_path_is_prepared_from_the_next_and_cached_ones_are_skipped(tmp_path):
    source = sorted(EXAMPLES.glob("glioma/*.jpg"))[0]
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(source, tmp_path / name)
    other = sorted(EXAMPLES.glob("notumor/*.jpg"))[0]
    shutil.copy(other, tmp_path / "d.jpg")
    scans = scans_of(tmp_path)
    (tmp_path / "a.jpg").unlink()
    cached = {scans[3].sha256: 99}

    prepared, computed_by, failures = prepare_new(Job(folder=str(tmp_path)), scans, cached, DEFAULTS, threads=2)

    assert list(prepared) == [scans[0].sha256]
    assert computed_by == {scans[0].sha256: 2}
    assert failures == {1: "file not found: deleted or moved after submit"}
