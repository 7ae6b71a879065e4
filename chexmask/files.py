"""Which files in a folder are images to segment, and how folders are walked.

Shared by ``chexmask segment``, the folder watcher and the release scanner, so
that all three agree on what counts: files with an image suffix (or none, as
DICOM files often have), outside hidden folders, that are not hidden,
temporary or backup files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".j2k", ".jp2", ".tif", ".tiff", ""})
# Names that writers use while a file is still incomplete.
TEMPORARY_SUFFIXES = frozenset({".part", ".tmp", ".crdownload", ".partial", ".download", ".swp"})


def ignored_name(relative: PurePath) -> bool:
    """Hidden, temporary, backup and non-image files, and anything in a hidden folder."""
    suffix = relative.suffix.lower()
    return (
        any(p.startswith((".", "~")) for p in relative.parts)
        or relative.name.endswith("~")
        or suffix in TEMPORARY_SUFFIXES
        or suffix not in IMAGE_SUFFIXES
    )


def ignored(path: Path, root: Path) -> bool:
    """Whether ``path`` under ``root`` is not an image to report; see ``ignored_name``."""
    try:
        return ignored_name(path.relative_to(root))
    except ValueError:
        return True


def walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Files under ``root`` outside hidden folders, in sorted path order, with their stat."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith((".", "~")):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from walk(Path(entry.path))
        elif entry.is_file():
            try:
                yield Path(entry.path), entry.stat()
            except FileNotFoundError:
                continue


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, plus every image file under named folders (in path order)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += [p for p, _ in walk(path) if not ignored(p, path)]
        else:
            found.append(path)
    return found
