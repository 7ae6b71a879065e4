"""The gallery's newest/oldest-first pages at a million rows: a covering created_at index.

Replaces ix_segmentation_created_at (created_at) by (created_at, id, is_current,
dataset, model_version, dice_rca_mean, dice_rca_max): in the order of the
time sort and its id tie-break, and holding every column the gallery's
segmentation filters test, so a filtered newest-first page is read from the
index alone until a page's worth is found (see storage/browse.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COVERED = ["id", "is_current", "dataset", "model_version", "dice_rca_mean", "dice_rca_max"]


def upgrade() -> None:
    # Queries sort ASC NULLS FIRST / DESC NULLS LAST; on PostgreSQL only a NULLS FIRST
    # index serves both directions (created_at is never NULL, but the planner does not
    # use that). SQLite has no NULLS clause in CREATE INDEX and needs none.
    leading = sa.text("created_at NULLS FIRST") if op.get_bind().dialect.name == "postgresql" else "created_at"
    op.create_index("ix_segmentation_created_at_covering", "segmentation", [leading, *COVERED])
    op.drop_index("ix_segmentation_created_at", table_name="segmentation")


def downgrade() -> None:
    op.create_index("ix_segmentation_created_at", "segmentation", ["created_at"])
    op.drop_index("ix_segmentation_created_at_covering", table_name="segmentation")
