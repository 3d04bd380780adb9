"""Where a job's scans are read from: a folder, or a ZIP archive read in place (never extracted).

A scan is named by its relpath: POSIX, relative to the submitted folder, or the member's name
inside the archive. One frame of a multi-frame DICOM object is named by its file's relpath plus
`#frame=N`, N counted from 1 as DICOM counts frames: `study/x.dcm#frame=3`. Its sha256 is derived
from the file's and the frame number, so each frame has its own cached result. (A file whose
real name ends in `#frame=<digits>` would be misread as a frame; no scanner writes such names.)
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

from vision.errors import ScanError

FRAME_MARK = "#frame="
_FRAME = re.compile(r"^(.+)#frame=([1-9][0-9]*)$")
# A member is read into memory whole; its declared size bounds what zipfile will inflate.
MAX_MEMBER_BYTES = 1 << 30


def frame_relpath(relpath: str, frame: int) -> str:
    """The relpath of one frame of a multi-frame file."""
    return f"{relpath}{FRAME_MARK}{frame}"


def split_frame(relpath: str) -> tuple[str, int | None]:
    """(file relpath, frame number) of a scan's relpath; frame is None for a whole file."""
    match = _FRAME.match(relpath)
    return (match.group(1), int(match.group(2))) if match else (relpath, None)


def scan_sha256(file_sha256: str, frame: int | None) -> str:
    """A scan's content hash: the file's, or for a frame a hash of the file's hash and the frame."""
    if frame is None or not file_sha256:
        return file_sha256
    return hashlib.sha256(f"{file_sha256}{FRAME_MARK}{frame}".encode()).hexdigest()


def is_archive(source) -> bool:
    """Whether a submitted FOLDER is a ZIP archive: anything named *.zip that is not a directory."""
    return str(source).lower().endswith(".zip") and not Path(source).is_dir()


def safe_member(name: str) -> bool:
    """A member name usable as a scan path: relative, without `..`, not a directory entry."""
    path = PurePosixPath(name)
    return bool(name) and not (name.endswith("/") or path.is_absolute() or ".." in path.parts)


def members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's file members with usable names, sorted by name; of duplicates, the last (what
    ZipFile.open(name) reads)."""
    by_name = {info.filename: info for info in archive.infolist() if safe_member(info.filename)}
    return [by_name[name] for name in sorted(by_name)]


@functools.lru_cache(maxsize=4)
def _cached_archive(path: str, mtime_ns: int, size: int, pid: int) -> zipfile.ZipFile:
    # A worker reads many members per batch: the central directory is parsed once per process
    # and archive version (pid: a forked child must not share the parent's file offset).
    return zipfile.ZipFile(path)


def open_archive(source) -> zipfile.ZipFile:
    """The ZIP archive at source, opened once per process and version; OSError or BadZipFile if not."""
    st = os.stat(source)
    return _cached_archive(os.path.realpath(source), st.st_mtime_ns, st.st_size, os.getpid())


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes; ScanError naming the problem (bad CRC, unsupported compression, encrypted)."""
    if info.file_size > MAX_MEMBER_BYTES:
        raise ScanError(f"archive member too large: {info.file_size} bytes (limit {MAX_MEMBER_BYTES})")
    try:
        with archive.open(info) as fh:
            return fh.read()
    except MemoryError:
        raise
    except Exception as exc:
        # zipfile fails with BadZipFile (CRC), zlib/lzma errors, EOFError, NotImplementedError
        # (compression method) and RuntimeError (encrypted): all mean this member cannot be read.
        raise ScanError(f"corrupt archive member: {exc or type(exc).__name__}") from exc


def read_bytes(source, relpath: str) -> bytes:
    """The bytes of the file at relpath (no frame suffix) in a folder or ZIP archive; ScanError why not."""
    if is_archive(source):
        try:
            archive = open_archive(source)
        except FileNotFoundError:
            raise ScanError("archive not found: deleted or moved after submit") from None
        except (OSError, zipfile.BadZipFile) as exc:
            raise ScanError(f"cannot read archive: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            info = archive.getinfo(relpath)
        except KeyError:
            raise ScanError("not in the archive any more: the archive changed after submit") from None
        return read_member(archive, info)
    path = Path(source) / relpath
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ScanError("file not found: deleted or moved after submit") from None
    except PermissionError:
        raise ScanError("permission denied: the worker cannot read this file") from None
    except OSError as exc:
        raise ScanError(f"cannot read file: {exc.strerror or exc}") from None


def load(source, relpath: str) -> tuple[bytes, int | None]:
    """(file bytes, frame) of a scan's relpath: what decode and prepare_bytes take."""
    file_relpath, frame = split_frame(relpath)
    return read_bytes(source, file_relpath), frame


def hash_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, head_bytes: int) -> tuple[str, int, bytes]:
    """SHA-256, size and first head_bytes of a member, streamed; ScanError if it cannot be read whole."""
    if info.file_size > MAX_MEMBER_BYTES:
        raise ScanError(f"archive member too large: {info.file_size} bytes (limit {MAX_MEMBER_BYTES})")
    digest, size, head = hashlib.sha256(), 0, b""
    try:
        with archive.open(info) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                if not head:
                    head = chunk[:head_bytes]
                digest.update(chunk)
                size += len(chunk)
    except MemoryError:
        raise
    except Exception as exc:  # the same open-ended set as read_member
        raise ScanError(f"corrupt archive member: {exc or type(exc).__name__}") from exc
    return digest.hexdigest(), size, head


def member_head(archive: zipfile.ZipFile, info: zipfile.ZipInfo, head_bytes: int) -> bytes:
    """The first bytes of a member that fails to read whole (a bad CRC shows only at its end), or b""."""
    try:
        with archive.open(info) as fh:
            return fh.read(head_bytes)
    except Exception:
        return b""
