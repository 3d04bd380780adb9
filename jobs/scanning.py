"""Finding the scans of a folder or ZIP archive: recursive, decided by content, hashed.

A DICOM file is one scan, one scan per frame when it has several (jobs.sources names them), or
none when it holds no pixel data (structured reports, presentation states): those are counted
as skipped.
"""
from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from jobs import sources
from vision.decode import HEAD_BYTES, sniff
from vision.dicom import MAX_FRAMES, DicomInfo, describe
from vision.errors import ScanError


class FolderError(Exception):
    """A folder that cannot be submitted: missing, not a folder, or holding no scans."""


@dataclass(frozen=True)
class FoundScan:
    relpath: str  # POSIX path relative to the submitted folder or inside the archive; see jobs.sources
    sha256: str  # "" when the file could not be read (processing then fails it with that reason)
    size: int
    dicom: DicomInfo | None = None  # the identifying attributes of a DICOM scan


@dataclass
class Listing:
    """The scans of a folder or archive, and how many DICOM objects without pixel data were skipped."""

    scans: list[FoundScan] = field(default_factory=list)
    skipped: int = 0
    files: int = 0  # regular files (or archive members) looked at


# Files with these suffixes are scans even when their content is broken (they then fail with a reason).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}


def _walk(root: Path, follow_links: bool):
    """Paths of the files under root, each directory walked once.

    Without follow_links, os.walk does not enter links to directories; they are yielded
    too, so that the caller can tell which of them lead out of the folder.
    """
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        try:
            st = os.stat(dirpath)
        except OSError:  # vanished or unreachable since it was listed
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop: each directory is walked once
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        # Real subdirectories first, so that a directory reached both directly and through a
        # link (followed) is usually listed under its real path.
        dirnames.sort(key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))
        names = sorted(filenames)
        if not follow_links:
            names += [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in names:
            yield Path(dirpath) / name


def hash_file(path: Path) -> tuple[str, int, bytes] | None:
    """SHA-256, size and first bytes of a regular file in one read; None if it is not one.

    A FIFO, socket or device (or a link to one) is not a file that can be a scan, and
    reading one can block forever or never end: O_NONBLOCK makes opening a FIFO return at
    once, and fstat on the open descriptor tells what it is before anything is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        head = b""
        size = 0
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            if not head:
                head = chunk[:HEAD_BYTES]
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, head


def _inside(path: Path, root: str) -> bool:
    # realpath, not Path.resolve: resolve raises RuntimeError on a symlink loop (Python 3.11).
    return os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep)


def find_scans(folder: Path, follow_links: bool = False) -> list[FoundScan]:
    """Every JPEG/PNG/BMP/TIFF/DICOM scan under folder or in a ZIP archive (by content), sorted by path;
    raises FolderError. See list_scans."""
    return list_scans(folder, follow_links).scans


def list_scans(folder: Path, follow_links: bool = False) -> Listing:
    """The scans of a folder, or of a ZIP archive read in place, and the DICOM objects skipped.

    Without follow_links, symlinks that lead out of the folder (to a file or a directory)
    are ignored: a submitted folder cannot make the service read files elsewhere.
    """
    folder = Path(folder)
    if sources.is_archive(folder):
        listing = _archive_listing(folder)
        links_out = 0
    else:
        if not folder.exists():
            raise FolderError(f"{folder}: no such folder")
        if not folder.is_dir():
            raise FolderError(f"{folder}: not a folder (nor a .zip archive)")
        listing, links_out = _folder_listing(folder, follow_links)
    if not listing.scans:
        if not listing.files and not links_out and not listing.skipped:
            what = "archive (no files in it)" if sources.is_archive(folder) else \
                "folder (no files in it or its subfolders)"
            raise FolderError(f"{folder}: empty {what}")
        message = (f"{folder}: no scans among {listing.files} file(s) "
                   "(looked for JPEG, PNG, BMP, TIFF and DICOM content)")
        if listing.skipped:
            message += f"; {listing.skipped} DICOM object(s) without pixel data were skipped"
        if links_out:
            message += f"; {links_out} symlink(s) leading out of the folder were not followed"
        raise FolderError(message)
    # os.walk lists a directory's files before its subdirectories; the promise is path order
    # (and frame order within a multi-frame file: #frame=10 after #frame=9).
    listing.scans.sort(key=_order)
    return listing


def _order(scan: FoundScan) -> tuple[str, int]:
    relpath, frame = sources.split_frame(scan.relpath)
    return relpath, frame or 0


def _folder_listing(folder: Path, follow_links: bool) -> tuple[Listing, int]:
    root = os.path.realpath(folder)
    listing = Listing()
    links_out = 0
    for path in _walk(folder, follow_links):
        if not follow_links and path.is_symlink() and not _inside(path, root):
            links_out += 1
            continue
        try:
            hashed = hash_file(path)
        except OSError:
            # Unreadable now (no permission, broken link, link loop): kept if it is named as
            # an image, with no hash, so processing fails it with "could not be read".
            hashed = "", 0, b""
        if hashed is None:  # a directory (link inside the folder), FIFO, socket or device
            continue
        listing.files += 1
        _add(listing, path.relative_to(folder).as_posix(), *hashed, lambda path=path: open(path, "rb"))
    return listing, links_out


def _archive_listing(archive_path: Path) -> Listing:
    try:
        archive = zipfile.ZipFile(archive_path)
    except FileNotFoundError:
        raise FolderError(f"{archive_path}: no such archive") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise FolderError(f"{archive_path}: not a readable ZIP archive ({exc})") from None
    listing = Listing()
    with archive:
        for info in sources.members(archive):
            listing.files += 1
            try:
                hashed = sources.hash_member(archive, info, HEAD_BYTES)
            except ScanError:
                # Kept if it looks like or is named as a scan, with no hash: processing reads it
                # again and fails that scan alone with the member's own reason.
                hashed = "", 0, sources.member_head(archive, info, HEAD_BYTES)
            _add(listing, info.filename, *hashed, lambda info=info: archive.open(info))
    return listing


def _add(listing: Listing, relpath: str, sha: str, size: int, head: bytes, open_file) -> None:
    """Add the scans one file holds: none, itself, or one per frame of a multi-frame DICOM object."""
    kind = sniff(head)
    # An image is a scan whatever its name; a broken file named as one is a scan that will fail.
    if kind is None and Path(relpath).suffix.lower() not in IMAGE_SUFFIXES:
        return
    info = None
    if kind == "DICOM" and sha:
        try:
            with open_file() as fh:
                info = describe(fh)
        except MemoryError:
            raise
        except Exception:
            info = None  # an unreadable header: one scan, which decoding fails with the reason
    if info is not None and info.frames == 0:
        listing.skipped += 1
    elif info is not None and 1 < info.frames <= MAX_FRAMES:  # more fail at decode, as one scan
        listing.scans += [FoundScan(sources.frame_relpath(relpath, n), sources.scan_sha256(sha, n), size, info)
                          for n in range(1, info.frames + 1)]
    else:
        listing.scans.append(FoundScan(relpath, sha, size, info))
