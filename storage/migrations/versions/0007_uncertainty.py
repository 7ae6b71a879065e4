"""Per-landmark uncertainty of a segmentation: landmark_std (JSON, [120] pixels), its
per-organ means uncertainty_rl/ll/h and uncertainty_samples.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FLOATS = ("uncertainty_rl", "uncertainty_ll", "uncertainty_h")


def upgrade() -> None:
    # Nullable columns: existing rows keep their data and read NULL (no uncertainty).
    with op.batch_alter_table("segmentation") as batch:
        for name in FLOATS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))
        batch.add_column(sa.Column("uncertainty_samples", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("landmark_std", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("segmentation") as batch:
        for name in ("landmark_std", "uncertainty_samples", *reversed(FLOATS)):
            batch.drop_column(name)
