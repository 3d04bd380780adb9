"""Finding the scans of a folder: recursive, decided by content, hashed."""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vision.decode import sniff


class FolderError(Exception):
    """A folder that cannot be submitted: missing, not a folder, or holding no scans."""


@dataclass(frozen=True)
class FoundScan:
    relpath: str  # POSIX path relative to the submitted folder
    sha256: str  # "" when the file could not be read (processing then fails it with that reason)
    size: int


# Files with these suffixes are scans even when their content is broken (they then fail with a reason).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


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
                head = chunk[:16]
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, head


def _inside(path: Path, root: str) -> bool:
    # realpath, not Path.resolve: resolve raises RuntimeError on a symlink loop (Python 3.11).
    return os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep)


def find_scans(folder: Path, follow_links: bool = False) -> list[FoundScan]:
    """Every JPEG/PNG/BMP/TIFF under folder (by content), sorted by path; raises FolderError.

    Without follow_links, symlinks that lead out of the folder (to a file or a directory)
    are ignored: a submitted folder cannot make the service read files elsewhere.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FolderError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a folder")
    root = os.path.realpath(folder)
    found = []
    files = links_out = 0
    for path in _walk(folder, follow_links):
        if not follow_links and path.is_symlink() and not _inside(path, root):
            links_out += 1
            continue
        named_as_image = path.suffix.lower() in IMAGE_SUFFIXES
        try:
            hashed = hash_file(path)
        except OSError:
            # Unreadable now (no permission, broken link, link loop): kept if it is named as
            # an image, with no hash, so processing fails it with "could not be read".
            hashed = "", 0, b""
        if hashed is None:  # a directory (link inside the folder), FIFO, socket or device
            continue
        files += 1
        sha, size, head = hashed
        # An image is a scan whatever its name; a broken file named as one is a scan that will fail.
        if sniff(head) is None and not named_as_image:
            continue
        found.append(FoundScan(path.relative_to(folder).as_posix(), sha, size))
    if not found:
        if not files and not links_out:
            raise FolderError(f"{folder}: empty folder (no files in it or its subfolders)")
        message = f"{folder}: no scans among {files} file(s) (looked for JPEG, PNG, BMP and TIFF content)"
        if links_out:
            message += f"; {links_out} symlink(s) leading out of the folder were not followed"
        raise FolderError(message)
    # os.walk lists a directory's files before its subdirectories; the promise is path order.
    found.sort(key=lambda scan: scan.relpath)
    return found
