"""Comparisons, one per segmentation and other model, with both models on the row.

- ``model``: the compared segmentation's own model (existing rows get it from their
  segmentation), indexed with ``other_model``: which models were compared with which
  is then a few index seeks (the gallery's compare picker), not a join over every
  stored comparison.
- Unique (segmentation_id, other_model) instead of (segmentation_id,
  other_segmentation_id): a mask keeps only its latest comparison with a model
  (a compare after its image changed used to leave the older pairing beside it),
  so listings join it without picking among several; the older duplicates go.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_UNIQUE = "uq_comparison_segmentation_id_other_segmentation_id"
NEW_UNIQUE = "uq_comparison_segmentation_id_other_model"


def upgrade() -> None:
    op.add_column("comparison", sa.Column("model", sa.String(128), nullable=True))
    op.execute(
        "UPDATE comparison SET model = "
        "(SELECT model_version FROM segmentation WHERE segmentation.id = comparison.segmentation_id)"
    )
    op.execute(
        "DELETE FROM comparison WHERE EXISTS (SELECT 1 FROM comparison newer"
        " WHERE newer.segmentation_id = comparison.segmentation_id AND newer.other_model = comparison.other_model"
        " AND (newer.created_at > comparison.created_at"
        " OR (newer.created_at = comparison.created_at AND newer.id > comparison.id)))"
    )
    with op.batch_alter_table("comparison") as batch:
        batch.alter_column("model", existing_type=sa.String(128), nullable=False)
        batch.drop_constraint(OLD_UNIQUE, type_="unique")
        batch.create_unique_constraint(NEW_UNIQUE, ["segmentation_id", "other_model"])
    op.create_index("ix_comparison_model_other_model", "comparison", ["model", "other_model"])


def downgrade() -> None:
    op.drop_index("ix_comparison_model_other_model", table_name="comparison")
    with op.batch_alter_table("comparison") as batch:
        batch.drop_constraint(NEW_UNIQUE, type_="unique")
        batch.create_unique_constraint(OLD_UNIQUE, ["segmentation_id", "other_segmentation_id"])
        batch.drop_column("model")
