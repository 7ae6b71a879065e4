"""Initial mask index: model versions, source images, segmentations.

Revision ID: 0001
Revises:
Create Date: 2024-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in models.py: a migration must not change when the models do.
TIMESTAMP = sa.DateTime(timezone=True)
JSON = sa.JSON()


def upgrade() -> None:
    op.create_table(
        "model_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_version"),
        sa.UniqueConstraint("name", name="uq_model_version_name"),
    )
    op.create_table(
        "source_image",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("etag_or_version", sa.String(256), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("release", sa.String(64), nullable=True),
        sa.Column("dataset_image_id", sa.String(512), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("view_position", sa.String(16), nullable=True),
        sa.Column("first_seen", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("refusal_code", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_source_image"),
        sa.UniqueConstraint("uri", name="uq_source_image_uri"),
    )
    op.create_index("ix_source_image_sha256", "source_image", ["sha256"])
    op.create_index("ix_source_image_status_id", "source_image", ["status", "id"])
    op.create_index("ix_source_image_dataset_release", "source_image", ["dataset", "release"])
    op.create_index(
        "ix_source_image_dataset_image_id",
        "source_image",
        ["dataset_image_id"],
        postgresql_ops={"dataset_image_id": "varchar_pattern_ops"},
    )
    op.create_table(
        "segmentation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("pipeline_version", sa.String(32), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("dice_rca_max", sa.Float(), nullable=True),
        sa.Column("dice_rca_mean", sa.Float(), nullable=True),
        sa.Column("dice_rca_max_rl", sa.Float(), nullable=True),
        sa.Column("dice_rca_max_ll", sa.Float(), nullable=True),
        sa.Column("dice_rca_max_h", sa.Float(), nullable=True),
        sa.Column("dice_rca_mean_rl", sa.Float(), nullable=True),
        sa.Column("dice_rca_mean_ll", sa.Float(), nullable=True),
        sa.Column("dice_rca_mean_h", sa.Float(), nullable=True),
        sa.Column("qc_status", sa.String(16), nullable=False),
        sa.Column("qc_flags", JSON, nullable=True),
        sa.Column("shape_outlier_score", sa.Float(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("object_keys", JSON, nullable=False),
        sa.Column("timings", JSON, nullable=True),
        # The large columns last (see models.Segmentation).
        sa.Column("landmarks_1024", JSON, nullable=False),
        sa.Column("landmarks_original", JSON, nullable=False),
        sa.Column("landmarks_original_str", sa.Text(), nullable=False),
        sa.Column("latent", JSON, nullable=True),
        sa.Column("rle_right_lung", sa.Text(), nullable=False),
        sa.Column("rle_left_lung", sa.Text(), nullable=False),
        sa.Column("rle_heart", sa.Text(), nullable=False),
        sa.Column("rle_right_lung_1024", sa.Text(), nullable=False),
        sa.Column("rle_left_lung_1024", sa.Text(), nullable=False),
        sa.Column("rle_heart_1024", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_segmentation"),
        sa.UniqueConstraint(
            "image_sha256", "model_version", name="uq_segmentation_image_sha256_model_version"
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["source_image.id"], name="fk_segmentation_image_id_source_image"
        ),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_version.name"],
            name="fk_segmentation_model_version_model_version",
        ),
    )
    _create_dice_index("ix_segmentation_dataset_dice_rca_mean", ["dataset"])
    _create_dice_index("ix_segmentation_model_version_dice_rca_mean", ["model_version"])
    _create_dice_index("ix_segmentation_dice_rca_mean", [])
    op.create_index("ix_segmentation_dataset_id", "segmentation", ["dataset", "id"])
    op.create_index("ix_segmentation_image_id", "segmentation", ["image_id"])
    op.create_index("ix_segmentation_created_at", "segmentation", ["created_at"])
    _prefer_lz4("segmentation", [
        "landmarks_1024", "landmarks_original", "landmarks_original_str", "latent",
        "rle_right_lung", "rle_left_lung", "rle_heart",
        "rle_right_lung_1024", "rle_left_lung_1024", "rle_heart_1024",
    ])


def _create_dice_index(name: str, leading: list[str]) -> None:
    # Queries sort a missing Dice as the lowest value (SQLite's native NULL order). On
    # PostgreSQL only a NULLS FIRST index serves that order in both directions; SQLite
    # has no NULLS clause in CREATE INDEX and needs none.
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(name, "segmentation", [*leading, sa.text("dice_rca_mean NULLS FIRST")])
    else:
        op.create_index(name, "segmentation", [*leading, "dice_rca_mean"])


def _prefer_lz4(table: str, columns: list[str]) -> None:
    # PostgreSQL compresses large values (the RLE texts) with pglz unless told otherwise;
    # lz4 halved the load time and sped exports up by a quarter in the benchmark.
    # Only where the server was built with it (PostgreSQL 14+ with lz4).
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    has_lz4 = bind.exec_driver_sql(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    ).scalar()
    for column in columns if has_lz4 else []:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")


def downgrade() -> None:
    op.drop_table("segmentation")
    op.drop_table("source_image")
    op.drop_table("model_version")
