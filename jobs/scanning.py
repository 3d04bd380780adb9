"""Finding the scans of a folder: recursive, decided by content, hashed."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from vision.decode import sniff


class FolderError(Exception):
    """A folder that cannot be submitted: missing, not a folder, or holding no scans."""


@dataclass(frozen=True)
class FoundScan:
    relpath: str  # POSIX path relative to the submitted folder
    sha256: str
    size: int


def _walk(root: Path, follow_links: bool):
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop: each directory is walked once
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def hash_file(path: Path) -> tuple[str, int, bytes]:
    """SHA-256, size and first bytes of a file in one read."""
    digest = hashlib.sha256()
    head = b""
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            if not head:
                head = chunk[:16]
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, head


def find_scans(folder: Path, follow_links: bool = False) -> list[FoundScan]:
    """Every JPEG/PNG/BMP/TIFF under folder (by content), sorted by path; raises FolderError."""
    folder = Path(folder)
    if not folder.exists():
        raise FolderError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a folder")
    root = folder.resolve()
    found = []
    for path in _walk(folder, follow_links):
        if path.is_symlink() and not follow_links:
            target = path.resolve()
            if root not in target.parents:  # links out of the submitted folder are not followed
                continue
        named_as_image = path.suffix.lower() in IMAGE_SUFFIXES
        try:
            sha, size, head = hash_file(path)
        except OSError:
            # Unreadable now: kept if it is named as an image, so processing fails it with its reason.
            sha, size, head = "", 0, b""
        # An image is a scan whatever its name; a broken file named as one is a scan that will fail.
        if sniff(head) is None and not named_as_image:
            continue
        found.append(FoundScan(path.relative_to(folder).as_posix(), sha, size))
    if not found:
        raise FolderError(f"{folder}: no scans found (looked for JPEG, PNG, BMP and TIFF files)")
    return found


# Files with these suffixes are scans even when their content is broken (they then fail with a reason).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
