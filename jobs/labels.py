"""Class names, their aliases, and the true label of a scan from its folders or a CSV."""
from __future__ import annotations

import csv
import re
from pathlib import Path, PurePosixPath

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


def read_labels_csv(path: Path) -> dict[str, str]:
    """`path,label` rows as {relative path: class}; unknown labels raise LabelError naming the row."""
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise LabelError(f"{path}: cannot read labels file ({exc.strerror})") from exc
    labels: dict[str, str] = {}
    with fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise LabelError(f"{path}: labels file needs a header with 'path' and 'label' columns")
        for line, row in enumerate(reader, start=2):
            found = canonical(row["label"] or "")
            if not found:
                raise LabelError(
                    f"{path}:{line}: unknown label {row['label']!r}; expected one of {', '.join(CLASSES)}"
                )
            labels[PurePosixPath(row["path"].strip()).as_posix()] = found
    return labels
