"""The schema comes from the Alembic migrations, matches the models, and
upgrading an existing index changes nothing."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from chexmask.storage.index import MaskIndex
from chexmask.storage.models import StorageModel, include_in_autogenerate


def test_migrations_match_models(index):
    with index.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": include_in_autogenerate}
        )
        assert compare_metadata(context, StorageModel.metadata) == []


def test_upgrade_on_existing_index_is_a_no_op(index, sample):
    _, seg = sample("a.png", dice_mean=0.8)
    assert index.current_revision() == MaskIndex.head_revision()
    before = _schema(index)
    index.upgrade()
    index.upgrade()
    assert _schema(index) == before
    assert index.get_segmentation(seg.id).dice_rca_mean == 0.8  # data untouched
    assert index.current_revision() == MaskIndex.head_revision()


def test_fresh_database_has_no_revision_until_upgraded(tmp_path):
    index = MaskIndex(f"sqlite:///{tmp_path / 'nested' / 'index.db'}")
    assert index.current_revision() is None
    assert sa.inspect(index.engine).get_table_names() == []
    index.upgrade()
    assert set(sa.inspect(index.engine).get_table_names()) == {
        "alembic_version",
        "model_version",
        "source_image",
        "segmentation",
        "review",
        "comparison",
        "dicom_push",
    }
    index.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def test_concurrent_upgrades_of_a_new_database_all_succeed(backend, request, tmp_path):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'new.db'}"
    else:
        url = request.getfixturevalue("new_pg_database")
    errors: list[BaseException] = []

    def upgrade() -> None:
        index = MaskIndex(url)
        try:
            index.upgrade()
        except BaseException as exc:
            errors.append(exc)
        finally:
            index.close()

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    index = MaskIndex(url)
    assert index.current_revision() == MaskIndex.head_revision()
    index.close()


@pytest.mark.parametrize("index", [pytest.param("postgresql", marks=pytest.mark.services)], indirect=True)
def test_postgresql_compresses_large_columns_with_lz4(index, sample):
    sample("a.png", rle={"right_lung": "1 2 " * 2000, "left_lung": "", "heart": ""})
    with index.engine.connect() as connection:
        has_lz4 = connection.exec_driver_sql(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).scalar()
        method = connection.exec_driver_sql("SELECT pg_column_compression(rle_right_lung) FROM segmentation").scalar()
    assert method == ("lz4" if has_lz4 else "pglz")


def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path):
    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    with index.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    index.close()


def _schema(index: MaskIndex) -> dict:
    inspector = sa.inspect(index.engine)
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
        )
        for table in sorted(inspector.get_table_names())
    }
