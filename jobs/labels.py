"""Class names, their aliases, and the true label of a scan from its folders or a CSV."""
from __future__ import annotations

import csv
import re
from pathlib import Path, PurePosixPath

from jobs.sources import split_frame

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")

_ALIASES = {
    "glioma": "glioma", "gliomatumor": "glioma", "glioma tumor": "glioma",
    "meningioma": "meningioma", "meningiomatumor": "meningioma",
    "notumor": "notumor", "notumour": "notumor", "no": "notumor", "normal": "notumor",
    "healthy": "notumor", "none": "notumor",
    "pituitary": "pituitary", "pituitarytumor": "pituitary", "pituitaryadenoma": "pituitary",
}


class LabelError(Exception):
    """A label that names no known class, or a labels file that cannot be used."""


def canonical(name: str) -> str | None:
    """The class a folder or label name stands for (`No_Tumor` → `notumor`), or None."""
    key = re.sub(r"[\s_\-]+", "", name.strip().lower())
    key = key.replace("tumour", "tumor")
    return _ALIASES.get(key)


def label_from_path(relpath: str) -> str | None:
    """The nearest enclosing folder of a relative path that names a class, or None."""
    for part in reversed(PurePosixPath(relpath).parts[:-1]):
        found = canonical(part)
        if found:
            return found
    return None


# Labels-file key of a row that names a DICOM object by SOP instance UID instead of by path.
UID_KEY = "sop_instance_uid:"


def read_labels_csv(path: Path) -> dict[str, str]:
    """`path,label` rows as {relative path: class}; unknown labels raise LabelError naming the row.

    A `sop_instance_uid` column may name DICOM objects instead (rows with an empty path); those
    rows are keyed UID_KEY + uid. A label for a multi-frame file or UID applies to all its frames.
    """
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise LabelError(f"{path}: cannot read labels file ({exc.strerror})") from exc
    labels: dict[str, str] = {}
    with fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if "label" not in columns or not columns & {"path", "sop_instance_uid"}:
            raise LabelError(f"{path}: labels file needs a header with 'path' (or 'sop_instance_uid') "
                             "and 'label' columns")
        for line, row in enumerate(reader, start=2):
            found = canonical(row["label"] or "")
            if not found:
                raise LabelError(
                    f"{path}:{line}: unknown label {row['label']!r}; expected one of {', '.join(CLASSES)}"
                )
            scan_path = (row.get("path") or "").strip()
            uid = (row.get("sop_instance_uid") or "").strip()
            if not scan_path and not uid:
                raise LabelError(f"{path}:{line}: row names neither a path nor a SOP instance UID")
            labels[PurePosixPath(scan_path).as_posix() if scan_path else UID_KEY + uid] = found
    return labels


def label_keys(relpath: str, sop_instance_uid: str | None = None) -> list[str]:
    """The labels-file keys that name a scan, most specific first: its path, its file's (for a frame of
    a multi-frame DICOM object), its SOP instance UID."""
    keys = [relpath]
    file_relpath, frame = split_frame(relpath)
    if frame is not None:
        keys.append(file_relpath)
    if sop_instance_uid:
        keys.append(UID_KEY + sop_instance_uid)
    return keys


def labelled(labels: dict[str, str], relpath: str, sop_instance_uid: str | None = None) -> str | None:
    """A scan's class from a labels file, by the first of its label_keys the file has."""
    return next((labels[k] for k in label_keys(relpath, sop_instance_uid) if k in labels), None)
