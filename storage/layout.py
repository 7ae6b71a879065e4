"""The CheXmask CSV layout (SPEC 9.5): columns, landmark texts and CSV lines.

Shared by the index, which stores the original-resolution landmark text ready
made, and the export, which writes the lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from chexmask.datasets import id_column

VALUE_COLUMNS = (
    "Dice RCA (Mean)",
    "Dice RCA (Max)",
    "Landmarks",
    "Left Lung",
    "Right Lung",
    "Heart",
    "Height",
    "Width",
)

_JSON_PUNCTUATION = str.maketrans("", "", "[] ")


def header(dataset: str) -> list[str]:
    return [id_column(dataset), *VALUE_COLUMNS]


def landmarks_1024_text(points_json: str) -> str:
    """``x0,y0,x1,y1,...`` as in the 1024-level files, from the stored JSON text
    ``[[x0,y0],[x1,y1],...]`` (reformatted as text: no JSON decoding per row)."""
    return points_json.translate(_JSON_PUNCTUATION)


def numpy_text(points: Sequence[Sequence[int]]) -> str:
    """The text of ``str(numpy.array(points))`` for an N x 2 int array, as the
    original-resolution files hold it: multi-line, every number right-aligned to
    the widest. Built with one %-format, ~20x faster than numpy's printing."""
    values = tuple(str(v) for point in points for v in point)
    return _numpy_template(max(map(len, values)), len(points)) % values


@lru_cache(maxsize=64)
def _numpy_template(width: int, points: int) -> str:
    return "[[" + "]\n [".join([f"%{width}s %{width}s"] * points) + "]]"


def csv_line(row: Sequence[Any]) -> str:
    """One line exactly as ``csv.writer(f, lineterminator="\\n")`` writes it: minimal
    quoting and "\\n" endings, as pandas wrote the official CheXmask files.

    Built by hand because the csv module inspects and copies the long RLE fields
    character by character, which made it the slowest step of an export; here a
    field costs four substring searches. A test holds the two to the same output.
    """
    return ",".join(map(_csv_field, row)) + "\n"


def _csv_field(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        return str(value)
    if "," in value or '"' in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value
