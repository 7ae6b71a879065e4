"""Which files in a folder are images to segment, and how folders are walked.

Shared by ``chexmask segment``, the folder watcher and the release scanner, so
that all three agree on what counts: files with an image suffix (or none, as
DICOM files often have), outside hidden folders, that are not hidden,
temporary or backup files.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath

log = logging.getLogger(__name__)

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
            continue
        try:
            stat_result = entry.stat()  # follows a symlink to what it points at
        except OSError:
            continue  # gone, or a dangling or looping link
        if regular(Path(entry.path), stat_result):
            yield Path(entry.path), stat_result


_noted: set[Path] = set()


def regular(path: Path, stat_result: os.stat_result) -> bool:
    """Whether ``path`` is (or links to) a regular file. Anything else (a FIFO, a
    device, a socket) is never opened, and logged the first time it is seen."""
    if stat.S_ISREG(stat_result.st_mode):
        return True
    if path not in _noted and not stat.S_ISDIR(stat_result.st_mode):
        _noted.add(path)
        log.warning("ignoring %s: not a regular file (FIFO, device or socket)", path)
    return False


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, plus every image file under named folders (in path order)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += [p for p, _ in walk(path) if not ignored(p, path)]
        else:
            found.append(path)
    return found
