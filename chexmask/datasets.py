"""Datasets: canonical names, the id column of each CheXmask CSV, and how an
image's dataset and id follow from its path.

The index stores one canonical name per dataset so that ``nih``, ``ChestX-Ray8``
and ``chestx-ray8`` all select the same rows. The id is the value of the
dataset's id column in its CheXmask CSV, so results join back to the official
tables:

- ChestX-ray8: ``images_001/00000001_000.png`` -> ``00000001_000.png`` (Image Index)
- CheXpert: ``.../CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg`` ->
  ``CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg`` (Path)
- MIMIC-CXR-JPG: ``files/p10/p10000032/s50414267/<dicom_id>.jpg`` -> ``<dicom_id>``
- PadChest: ``<n>/<ImageID>.png`` -> ``<ImageID>.png`` (ImageID)
- VinDr-CXR: ``train/<image_id>.dicom`` -> ``<image_id>``
- anything else: dataset ``generic``, id = file stem.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

# canonical name -> the id column of that dataset's official CheXmask CSV
ID_COLUMNS: dict[str, str] = {
    "chestx-ray8": "Image Index",
    "chexpert": "Path",
    "mimic-cxr-jpg": "dicom_id",
    "padchest": "ImageID",
    "vindr-cxr": "image_id",
}
DEFAULT_ID_COLUMN = "image_id"

_ALIASES: dict[str, str] = {
    "nih": "chestx-ray8",
    "chestxray8": "chestx-ray8",
    "chestx-ray14": "chestx-ray8",
    "chestxray14": "chestx-ray8",
    "nih-cxr14": "chestx-ray8",
    "mimic": "mimic-cxr-jpg",
    "mimic-cxr": "mimic-cxr-jpg",
    "mimiccxrjpg": "mimic-cxr-jpg",
    "vindr": "vindr-cxr",
    "vindrcxr": "vindr-cxr",
}


def canonical(dataset: str) -> str:
    """The canonical name of a dataset: lower case, ``_``/space as ``-``, aliases resolved.

    Names that are not known CheXmask datasets are kept (normalised) so that
    new sources can be indexed without a code change.
    """
    name = re.sub(r"[\s_]+", "-", dataset.strip().lower())
    if not name:
        raise ValueError("dataset name is empty")
    return _ALIASES.get(name, _ALIASES.get(name.replace("-", ""), name))


def id_column(dataset: str) -> str:
    """The name of the id column in the CheXmask CSV of ``dataset``."""
    return ID_COLUMNS.get(canonical(dataset), DEFAULT_ID_COLUMN)


GENERIC = "generic"

_NIH_NAME = re.compile(r"\d{8}_\d{3}\.png", re.IGNORECASE)
_CHEXPERT_ROOT = re.compile(r"CheXpert-v1\.0(-small)?", re.IGNORECASE)
_CHEXPERT_TAIL = re.compile(r"(train|valid|test)/patient\d+/study\d+/view\d+_\w+\.jpg", re.IGNORECASE)
_MIMIC_DIRS = (re.compile(r"p\d\d"), re.compile(r"p\d{8}"), re.compile(r"s\d{8}"))
# PadChest ImageIDs: a long decimal UID, "_", and a short code ("00-064-025" or "k6ga29").
_PADCHEST_NAME = re.compile(r"\d{20,}_[0-9a-z-]+\.png", re.IGNORECASE)
_VINDR_NAME = re.compile(r"[0-9a-f]{32}\.dicom", re.IGNORECASE)


@dataclass(frozen=True)
class DatasetImage:
    dataset: str  # canonical name
    image_id: str


def _chestx_ray8(path: PurePosixPath) -> str | None:
    return path.name if _NIH_NAME.fullmatch(path.name) else None


def _chexpert(path: PurePosixPath) -> str | None:
    parts = path.parts
    for i, part in enumerate(parts):
        if _CHEXPERT_ROOT.fullmatch(part):
            # The CSV's Path column names the full-size release whichever copy was read.
            return "/".join(("CheXpert-v1.0", *parts[i + 1 :]))
    tail = "/".join(parts[-4:])
    return f"CheXpert-v1.0/{tail}" if _CHEXPERT_TAIL.fullmatch(tail) else None


def _mimic(path: PurePosixPath) -> str | None:
    dirs = path.parts[-4:-1]
    if len(dirs) == 3 and all(p.fullmatch(d) for p, d in zip(_MIMIC_DIRS, dirs, strict=True)):
        return path.stem
    return None


def _padchest(path: PurePosixPath) -> str | None:
    return path.name if _PADCHEST_NAME.fullmatch(path.name) else None


def _vindr(path: PurePosixPath) -> str | None:
    return path.stem if _VINDR_NAME.fullmatch(path.name) else None


# Tried in this order when the dataset is not given; path rules before name rules.
ADAPTERS: dict[str, Callable[[PurePosixPath], str | None]] = {
    "chexpert": _chexpert,
    "mimic-cxr-jpg": _mimic,
    "chestx-ray8": _chestx_ray8,
    "padchest": _padchest,
    "vindr-cxr": _vindr,
}
# Datasets whose CSV id keeps the file extension.
_ID_WITH_SUFFIX = {"chestx-ray8", "padchest"}


def identify(path: str, dataset: str | None = None) -> DatasetImage:
    """The dataset and dataset image id of a file path or object key.

    ``dataset`` overrides the inference; the id then follows that dataset's
    convention when the path fits it, else the file name (or stem).
    """
    posix = PurePosixPath(path.replace("\\", "/"))
    if dataset:
        name = canonical(dataset)
        adapter = ADAPTERS.get(name)
        found = adapter(posix) if adapter else None
        return DatasetImage(name, found or (posix.name if name in _ID_WITH_SUFFIX else posix.stem))
    for name, adapter in ADAPTERS.items():
        if (found := adapter(posix)) is not None:
            return DatasetImage(name, found)
    return DatasetImage(GENERIC, posix.stem)
