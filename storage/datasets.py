"""Dataset names and the id column each CheXmask CSV uses.

The index stores one canonical name per dataset so that ``nih``, ``ChestX-Ray8``
and ``chestx-ray8`` all select the same rows.
"""

from __future__ import annotations

import re

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
