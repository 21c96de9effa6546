"""A folder of images labelled by a ``labels.csv`` (``file,label``), like the ImageNet assets.

The file's rows name an image (relative to the folder) and its integer class index. A header row is
optional: when the first row's label field is not an integer it is read as the header, and its
``file`` and ``label`` columns (any order, any extra columns such as ``wnid``) are used. Without a
header the first two columns are file and label.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dfq_deploy.errors import BadInputError

LABELS_CSV = "labels.csv"
FILE_COLUMNS = ("file", "filename", "path", "image")
LABEL_COLUMNS = ("label", "class", "class_index", "target")
HINT = "labels.csv rows are file,label: an image path relative to the folder and its class index (0, 1, ...)"
# How many missing files an error lists by name.
LIST_MISSING = 5


def has_labels_csv(folder: str | Path) -> bool:
    """True when ``folder`` is a directory holding a ``labels.csv``."""
    return (Path(folder) / LABELS_CSV).is_file()


def _columns(header: list[str], path: Path) -> tuple[int, int]:
    names = [h.strip().lower() for h in header]
    found = [next((names.index(c) for c in choices if c in names), None) for choices in (FILE_COLUMNS, LABEL_COLUMNS)]
    if found[0] is None or found[1] is None:
        raise BadInputError(
            f"{path}: header {header} has no file and label columns",
            hint=f"name them 'file' and 'label' (or give no header: file,label rows); {HINT}",
        )
    return found[0], found[1]


def _label(text: str, where: str) -> int:
    try:
        label = int(text.strip())
    except ValueError:
        raise BadInputError(f"{where}: label {text!r} is not an integer class index", hint=HINT) from None
    if label < 0:
        raise BadInputError(f"{where}: label {label} is negative", hint=HINT)
    return label


def read_labels_csv(folder: str | Path) -> list[tuple[Path, int]]:
    """(image path, label) for every row of ``folder/labels.csv``, in the file's order.

    Every listed image must exist: the missing ones are named (the first few, and how many in all)
    in one :class:`BadInputError`, as are a non-integer or negative label, a short row and an empty file.
    """
    folder = Path(folder)
    path = folder / LABELS_CSV
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read {path}: {exc}", hint=HINT) from None
    if not rows:
        raise BadInputError(f"{path} lists no images", hint=HINT)
    file_col, label_col = 0, 1
    if len(rows[0][1]) >= 2 and not rows[0][1][1].strip().lstrip("-").isdigit():
        file_col, label_col = _columns(rows[0][1], path)
        rows = rows[1:]
    entries = []
    for line, row in rows:
        where = f"{path} line {line}"
        if len(row) <= max(file_col, label_col):
            raise BadInputError(f"{where}: expected file,label, got {row}", hint=HINT)
        entries.append((folder / row[file_col].strip(), _label(row[label_col], where)))
    if not entries:
        raise BadInputError(f"{path} has a header but lists no images", hint=HINT)
    missing = [str(p.relative_to(folder)) for p, _ in entries if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:LIST_MISSING]) + (", ..." if len(missing) > LIST_MISSING else "")
        raise BadInputError(
            f"{path} lists {len(missing)} image(s) not found in {folder}: {shown}",
            hint="fix the paths (relative to the folder holding labels.csv) or remove those rows",
        )
    return entries
