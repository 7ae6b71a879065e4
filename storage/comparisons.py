"""Per-image comparisons between two models' masks, stored by ``chexmask compare``
(``worker.compare`` computes them) so that queries can filter on agreement
(``QueryFilters.compare_to`` and the agreement bounds)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chexmask.anatomy import ORGANS
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import MaskComparison, utcnow

BATCH = 1000  # rows per transaction


@dataclass(frozen=True)
class Agreement:
    """Segmentation ``segmentations[0]`` (model ``models[0]``) against ``segmentations[1]``."""

    segmentations: tuple[int, int]
    models: tuple[str, str]
    frame: str
    dice: dict[str, float]  # by organ
    hausdorff: dict[str, float]  # by organ, pixels of the frame; inf when one mask is empty


def save_comparisons(index: MaskIndex, agreements: Iterable[Agreement]) -> int:
    """Store each agreement, once from each side, replacing the segmentation's earlier
    comparison with that model (a later pairing wins, also within one run); returns
    how many were stored."""
    from sqlalchemy.dialects import postgresql, sqlite

    insert = (postgresql if index.dialect == "postgresql" else sqlite).insert(MaskComparison)
    key = ("id", "segmentation_id", "other_model")
    replaced = [name for name in MaskComparison.model_fields if name not in key]
    statement = insert.on_conflict_do_update(
        index_elements=list(key[1:]), set_={name: insert.excluded[name] for name in replaced}
    )
    count = 0
    # by key: one statement may not update a row twice (two masks of the other model
    # sharing a dataset image id); the later pairing wins, as a later run's would
    batch: dict[tuple[int, str], dict[str, Any]] = {}
    for agreement in agreements:
        batch.update(((row["segmentation_id"], row["other_model"]), row) for row in _rows(agreement))
        count += 1
        if len(batch) >= 2 * BATCH:
            _write(index, statement, list(batch.values()))
            batch = {}
    if batch:
        _write(index, statement, list(batch.values()))
    return count


def _write(index: MaskIndex, statement: Any, rows: list[dict[str, Any]]) -> None:
    with index.engine.begin() as connection:
        connection.execute(statement, rows)


def _rows(agreement: Agreement) -> list[dict[str, Any]]:
    now = utcnow()
    values = {
        "frame": agreement.frame,
        "dice_min": min(agreement.dice.values()),
        **{f"dice_{organ}": agreement.dice[organ] for organ in ORGANS},
        # an infinite distance (one mask empty) is stored as NULL: JSON and some drivers have no infinity
        **{f"hausdorff_{organ}": d if math.isfinite(d := agreement.hausdorff[organ]) else None for organ in ORGANS},
        "created_at": now,
    }
    (first, second), (model_a, model_b) = agreement.segmentations, agreement.models
    rows = [
        {**values, "segmentation_id": first, "other_segmentation_id": second, "model": model_a, "other_model": model_b}
    ]
    if second != first:  # a model compared with itself pairs each mask with itself: one row
        rows.append(
            {
                **values,
                "segmentation_id": second,
                "other_segmentation_id": first,
                "model": model_b,
                "other_model": model_a,
            }
        )
    return rows
