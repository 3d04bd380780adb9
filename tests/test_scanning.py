"""What find_scans lists for a submitted folder, and what it refuses.

Folders are built in tmp_path from the real example scans. A scan is listed with its
SHA-256, its size and its POSIX path relative to the folder; a file that cannot be read
is listed with no hash so that processing fails it with a reason.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import jobs.scanning as scanning
from jobs.scanning import FolderError, FoundScan, find_scans
from vision.decode import decode
from vision.errors import ScanError

SCANS = Path(__file__).resolve().parent.parent / "examples" / "scans"
SCAN = (SCANS / "notumor" / "Tr-no_1379.jpg").read_bytes()  # a small real JPEG
OTHER_SCAN = (SCANS / "glioma" / "Tr-gl_0207.jpg").read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan_at(relpath: str, data: bytes = SCAN) -> FoundScan:
    return FoundScan(relpath, sha(data), len(data))


def put(path: Path, data: bytes = SCAN) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@contextlib.contextmanager
def must_finish_within(seconds: int):
    """Fail instead of hanging (SIGALRM also interrupts a blocking open())."""

    def expire(signum, frame):
        pytest.fail(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "submitted"
    path.mkdir()
    return path


# ---- what is listed ----------------------------------------------------------------------


def test_lists_every_real_scan_with_sha256_size_and_posix_relpath(tmp_path):
    folder = shutil.copytree(SCANS, tmp_path / "scans")
    expected = [
        FoundScan(p.relative_to(SCANS).as_posix(), sha(p.read_bytes()), p.stat().st_size)
        for p in sorted(SCANS.rglob("*.jpg"))
    ]
    assert len(expected) == 16
    assert find_scans(folder) == expected


def test_scans_are_sorted_by_relpath_across_directories(folder):
    put(folder / "z.jpg")
    put(folder / "a" / "b" / "deep.jpg")
    assert [s.relpath for s in find_scans(folder)] == ["a/b/deep.jpg", "z.jpg"]


def test_relpaths_do_not_depend_on_how_the_folder_is_named(folder, monkeypatch):
    put(folder / "sub" / "x.jpg")
    monkeypatch.chdir(folder.parent)
    assert find_scans(Path("submitted")) == find_scans(folder) == [scan_at("sub/x.jpg")]
    assert find_scans("submitted/../submitted") == [scan_at("sub/x.jpg")]


def test_names_with_spaces_unicode_and_a_newline_are_kept_verbatim(folder):
    names = ["with space.jpg", "dir with space/x.jpg", "Müller 脑 scan.jpg", "line\nbreak.jpg"]
    for name in names:
        put(folder / name)
    assert find_scans(folder) == [scan_at(name) for name in sorted(names)]


def test_files_that_are_not_scans_are_skipped(folder):
    put(folder / "README.txt", b"Scans from ward 3, axial T1.\n")
    put(folder / "labels.csv", b"path,label\nscan.jpg,notumor\n")
    put(folder / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    put(folder / "scan.jpg")
    assert find_scans(folder) == [scan_at("scan.jpg")]


def test_text_file_named_as_an_image_is_kept_and_then_fails_as_not_an_image(folder):
    text = b"this is not a scan\n"
    put(folder / "fake.jpg", text)
    assert find_scans(folder) == [scan_at("fake.jpg", text)]
    with pytest.raises(ScanError, match="^not an image: "):
        decode((folder / "fake.jpg").read_bytes())


def test_image_suffix_is_matched_case_insensitively(folder):
    text = b"broken"
    put(folder / "UPPER.JPG", text)
    put(folder / "mixed.Tiff", text)
    assert [s.relpath for s in find_scans(folder)] == ["UPPER.JPG", "mixed.Tiff"]


def test_image_without_an_image_suffix_is_kept_by_its_content(folder):
    put(folder / "scan_without_suffix")
    put(folder / "export.dat", OTHER_SCAN)
    assert find_scans(folder) == [scan_at("export.dat", OTHER_SCAN), scan_at("scan_without_suffix")]


def test_ten_thousand_files_in_one_directory_are_all_listed(folder):
    original = put(folder.parent / "original.jpg")
    for i in range(10_000):
        os.link(original, folder / f"scan_{i:05d}.jpg")  # hard links: 10,000 names, one inode
    started = time.perf_counter()
    found = find_scans(folder)
    print(f"find_scans over 10,000 files: {time.perf_counter() - started:.2f} s")
    assert len(found) == 10_000
    assert found[0] == scan_at("scan_00000.jpg") and found[-1] == scan_at("scan_09999.jpg")
    assert {(s.sha256, s.size) for s in found} == {(sha(SCAN), len(SCAN))}


# ---- symlinks ----------------------------------------------------------------------------


@pytest.mark.parametrize("follow_links", [False, True])
def test_directory_symlink_loop_terminates_with_each_file_once(folder, follow_links):
    put(folder / "a" / "scan.jpg")
    (folder / "a" / "up").symlink_to("..")  # a/up/a/up/... -> the folder again
    (folder / "b").mkdir()
    (folder / "b" / "self").symlink_to(".")
    with must_finish_within(10):
        found = find_scans(folder, follow_links=follow_links)
    assert found == [scan_at("a/scan.jpg")]


@pytest.mark.parametrize("follow_links", [False, True])
def test_file_symlink_loop_terminates_and_is_kept_unreadable(folder, follow_links):
    put(folder / "scan.jpg")
    (folder / "a.jpg").symlink_to("b.jpg")
    (folder / "b.jpg").symlink_to("a.jpg")
    with must_finish_within(10):
        found = find_scans(folder, follow_links=follow_links)
    assert found == [FoundScan("a.jpg", "", 0), FoundScan("b.jpg", "", 0), scan_at("scan.jpg")]


@pytest.fixture
def links_out(folder) -> Path:
    """A folder with one scan, a link to a scan outside it and a link to a directory outside it."""
    outside = folder.parent / "outside"
    put(outside / "secret.jpg", OTHER_SCAN)
    put(outside / "dir" / "x.jpg", OTHER_SCAN)
    put(folder / "scan.jpg")
    (folder / "link_file.jpg").symlink_to(outside / "secret.jpg")
    (folder / "link_dir").symlink_to(outside / "dir")
    (folder / "relative_link.jpg").symlink_to(Path("..") / "outside" / "secret.jpg")
    return folder


def test_symlinks_leading_out_of_the_folder_are_not_followed_by_default(links_out):
    assert find_scans(links_out) == [scan_at("scan.jpg")]


def test_symlinks_leading_out_of_the_folder_are_followed_when_asked(links_out):
    assert find_scans(links_out, follow_links=True) == [
        scan_at("link_dir/x.jpg", OTHER_SCAN),
        scan_at("link_file.jpg", OTHER_SCAN),
        scan_at("relative_link.jpg", OTHER_SCAN),
        scan_at("scan.jpg"),
    ]


@pytest.mark.parametrize("follow_links", [False, True])
def test_symlinks_within_the_folder_list_each_directory_once_under_its_real_path(folder, follow_links):
    put(folder / "real" / "x.jpg")
    (folder / "alias").symlink_to("real")  # sorts before "real"; must not shadow it
    (folder / "alias.jpg").symlink_to(Path("real") / "x.jpg")  # a file link is a name of its own
    assert find_scans(folder, follow_links=follow_links) == [scan_at("alias.jpg"), scan_at("real/x.jpg")]


# ---- files that cannot be read -----------------------------------------------------------


def test_broken_symlink_named_as_an_image_is_kept_without_hash(folder):
    put(folder / "scan.jpg")
    (folder / "gone.jpg").symlink_to("deleted.jpg")  # really fails to open, even as root
    (folder / "gone.txt").symlink_to("deleted.txt")  # unreadable and not named as an image
    assert find_scans(folder) == [FoundScan("gone.jpg", "", 0), scan_at("scan.jpg")]


def test_file_without_read_permission_is_kept_without_hash(folder, monkeypatch):
    put(folder / "scan.jpg")
    locked = put(folder / "locked.jpg")
    locked.chmod(0)
    if os.geteuid() == 0:
        # Root reads a mode-000 file anyway; make its open fail as it does for any other user.
        real_hash_file = scanning.hash_file

        def hash_file_as_user(path):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_hash_file(path)

        monkeypatch.setattr(scanning, "hash_file", hash_file_as_user)
    assert find_scans(folder) == [FoundScan("locked.jpg", "", 0), scan_at("scan.jpg")]


def test_fifo_named_as_an_image_is_skipped_without_blocking(folder):
    put(folder / "scan.jpg")
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would wait for a writer forever
    with must_finish_within(10):
        found = find_scans(folder)
    assert found == [scan_at("scan.jpg")]


def test_device_behind_a_followed_link_is_skipped_without_reading_it(folder):
    put(folder / "scan.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")  # endless bytes
    with must_finish_within(10):
        found = find_scans(folder, follow_links=True)
    assert found == [scan_at("scan.jpg")]


# ---- folders that are refused ------------------------------------------------------------


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(FolderError) as caught:
        find_scans(tmp_path / "nope")
    assert str(caught.value) == f"{tmp_path / 'nope'}: no such folder"


def test_file_given_as_folder_is_refused(tmp_path):
    path = put(tmp_path / "scan.jpg")
    with pytest.raises(FolderError) as caught:
        find_scans(path)
    assert str(caught.value) == f"{path}: not a folder (nor a .zip archive)"


def test_empty_folder_is_refused(folder):
    (folder / "empty subfolder").mkdir()
    with pytest.raises(FolderError) as caught:
        find_scans(folder)
    assert str(caught.value) == f"{folder}: empty folder (no files in it or its subfolders)"


def test_folder_without_scans_is_refused_with_the_number_of_files_seen(folder):
    put(folder / "README.txt", b"nothing here\n")
    put(folder / "notes" / "todo.md", b"- scan ward 3\n")
    with pytest.raises(FolderError) as caught:
        find_scans(folder)
    assert str(caught.value) == (
        f"{folder}: no scans among 2 file(s) (looked for JPEG, PNG, BMP, TIFF and DICOM content)"
    )


def test_folder_whose_scans_are_all_behind_links_out_says_they_were_not_followed(folder):
    put(folder.parent / "elsewhere" / "scan.jpg")
    (folder / "scan.jpg").symlink_to(folder.parent / "elsewhere" / "scan.jpg")
    with pytest.raises(FolderError) as caught:
        find_scans(folder)
    assert str(caught.value) == (
        f"{folder}: no scans among 0 file(s) (looked for JPEG, PNG, BMP, TIFF and DICOM content); "
        "1 symlink(s) leading out of the folder were not followed"
    )
