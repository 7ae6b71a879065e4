"""The mask index: every image seen, its status, and its segmentations.

SQLite by default (WAL, busy timeout), PostgreSQL through its URL. The schema is
created and evolved only by the Alembic migrations (``MaskIndex.upgrade``).

A segmentation belongs to image *content*: there is at most one per image sha256
and model version, made for (and listed with) the first image that had those
bytes; a copy under another URI is "done" by ``has_segmentation`` but not listed
again. Listings pair a segmentation with its image only while the image's
sha256 still matches (``Segmentation.is_current``, kept in step by every method
that changes an image), so an image whose bytes change stops showing the old
one until its new bytes are segmented. The worker records the sha256 of what it
read with ``update_image`` (or ``register_image``) before adding its segmentation.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, Row, make_url
from sqlmodel import Session, select

from chexmask import PIPELINE_VERSION
from chexmask.errors import ConfigError
from chexmask.status import ImageStatus
from chexmask.storage.datasets import canonical
from chexmask.storage.layout import numpy_text
from chexmask.storage.models import (
    ORGANS,
    ModelVersion,
    QCStatus,
    Segmentation,
    SourceImage,
    as_utc,
    utcnow,
)

N_LANDMARKS = 120
MIGRATIONS_INI = Path(__file__).with_name("alembic.ini")


@dataclass(frozen=True)
class QueryFilters:
    """What to select. ``None`` means no constraint.

    ``id_pattern`` matches ``dataset_image_id``: with ``*``/``?`` it is a glob,
    with ``%`` an SQL LIKE pattern, otherwise an exact id. Matching is case
    sensitive on every backend. ``created_after`` (inclusive) and
    ``created_before`` (exclusive) bound the segmentation time; naive datetimes
    are taken as UTC. ``status`` is the image's.
    """

    dataset: str | None = None
    release: str | None = None
    model: str | None = None
    status: ImageStatus | None = None
    min_dice_mean: float | None = None
    max_dice_mean: float | None = None
    min_dice_max: float | None = None
    max_dice_max: float | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    id_pattern: str | None = None

    @property
    def segmentation_level(self) -> bool:
        """Whether any filter concerns segmentations rather than images."""
        image_fields = {"dataset", "release", "status", "id_pattern"}
        return any(getattr(self, f.name) is not None for f in fields(self) if f.name not in image_fields)


@dataclass(frozen=True)
class Registration:
    image: SourceImage
    created: bool  # first time this URI was seen
    changed: bool  # known URI whose content (etag/version, sha256 or size) differs

    @property
    def needs_processing(self) -> bool:
        return self.created or self.changed


@dataclass(frozen=True)
class SegmentationSummary:
    """One row of a query: a segmentation with its image."""

    id: int
    image_id: int
    uri: str
    dataset: str
    release: str | None
    dataset_image_id: str | None
    status: ImageStatus
    model_version: str
    dice_rca_mean: float | None
    dice_rca_max: float | None
    qc_status: QCStatus
    height: int
    width: int
    created_at: datetime


_SUMMARY_COLUMNS = (
    Segmentation.id,
    Segmentation.image_id,
    SourceImage.uri,
    SourceImage.dataset,
    SourceImage.release,
    SourceImage.dataset_image_id,
    SourceImage.status,
    Segmentation.model_version,
    Segmentation.dice_rca_mean,
    Segmentation.dice_rca_max,
    Segmentation.qc_status,
    Segmentation.height,
    Segmentation.width,
    Segmentation.created_at,
)

SORT_KEYS: dict[str, Any] = {
    "id": Segmentation.id,
    "created_at": Segmentation.created_at,
    "dice_rca_mean": Segmentation.dice_rca_mean,
    "dice_rca_max": Segmentation.dice_rca_max,
    "dataset_image_id": SourceImage.dataset_image_id,
}


def engine_url(database_url: str) -> str:
    """``database_url`` with the driver this package installs (psycopg 3 for PostgreSQL)."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def json_dumps(value: Any) -> str:
    """Compact JSON: smaller rows, and a fixed text form the export can parse quickly."""
    return json.dumps(value, separators=(",", ":"))


def _create_engine(database_url: str) -> Engine:
    url = make_url(engine_url(database_url))
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, json_serializer=json_dumps)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30}, json_serializer=json_dumps)
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while a worker writes; the busy timeout makes writers queue
    # instead of failing at once; NORMAL sync is crash-safe in WAL mode.
    cursor.execute("PRAGMA busy_timeout=30000")
    _enable_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # PostgreSQL's LIKE is case sensitive; make SQLite's agree.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def _enable_wal(cursor: Any, attempts: int = 100) -> None:
    """Switch the file to WAL (the first connection to a new file does). Connections racing
    to switch a new file get "database is locked" at once, without the busy timeout
    (SQLite does not wait where waiting could deadlock), so they try again."""
    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


class MaskIndex:
    def __init__(self, database_url: str):
        self.engine = _create_engine(database_url)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # --- schema -----------------------------------------------------------------

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` with Alembic; a no-op when already there."""
        from alembic import command

        config = _alembic_config()
        with self.engine.begin() as connection:
            # Take the lock first, so workers starting together queue instead of racing
            # to create the tables, and (on SQLite, whose driver would otherwise run
            # each DDL statement on its own) the whole migration is one transaction.
            if self.dialect == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(4242001)"))
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at; ``None`` for an empty database."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @staticmethod
    def head_revision() -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(_alembic_config()).get_current_head()

    # --- models -----------------------------------------------------------------

    def register_model(self, name: str, weights_sha256: str, description: str = "") -> ModelVersion:
        """Record a model version once; the same name with other weights is refused."""
        with self._session() as session:
            model = self._ensure_model(session, name, weights_sha256, description)
            session.commit()
            return model

    def models(self) -> list[ModelVersion]:
        with self._session() as session:
            return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))

    def _ensure_model(
        self, session: Session, name: str, weights_sha256: str, description: str = ""
    ) -> ModelVersion:
        session.execute(
            self._insert(ModelVersion)
            .values(name=name, weights_sha256=weights_sha256, description=description, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["name"])
        )
        model = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()
        if model.weights_sha256 != weights_sha256:
            raise ConfigError(
                f"model version {name!r} is registered with weights {model.weights_sha256[:12]}…, "
                f"not {weights_sha256[:12]}…; give new weights a new version name"
            )
        return model

    # --- images -----------------------------------------------------------------

    def register_image(
        self,
        *,
        uri: str,
        dataset: str,
        etag_or_version: str | None = None,
        sha256: str | None = None,
        size: int | None = None,
        release: str | None = None,
        dataset_image_id: str | None = None,
        height: int | None = None,
        width: int | None = None,
        modality: str | None = None,
        view_position: str | None = None,
    ) -> Registration:
        """Insert or update the image at ``uri``; idempotent.

        A known URI whose etag/version, sha256 or size differs from the stored one is
        *changed*: its content fields are replaced (unknown ones cleared) and it
        goes back to ``queued`` with no attempts. Otherwise the given fields only
        fill in or update descriptive metadata.
        """
        content = {"etag_or_version": etag_or_version, "sha256": sha256, "size": size,
                   "height": height, "width": width}
        described = {"dataset": canonical(dataset), "release": release,
                     "dataset_image_id": dataset_image_id, "modality": modality,
                     "view_position": view_position}
        now = utcnow()
        with self._session() as session:
            new_id = session.execute(
                self._insert(SourceImage)
                .values(uri=uri, **content, **described, first_seen=now, updated_at=now,
                        status=ImageStatus.QUEUED, attempts=0)
                .on_conflict_do_nothing(index_elements=["uri"])
                .returning(SourceImage.id)
            ).scalar_one_or_none()
            if new_id is not None:
                session.commit()
                return Registration(session.get_one(SourceImage, new_id), created=True, changed=False)

            image = session.scalars(
                select(SourceImage).where(SourceImage.uri == uri).with_for_update()
            ).one()
            changed = _content_changed(image, content)
            updates = {k: v for k, v in {**content, **described}.items() if v is not None}
            if changed:
                # Whatever was known about the old bytes no longer holds.
                updates.update(content, status=ImageStatus.QUEUED, attempts=0,
                               refusal_code=None, reason=None)
            if _assign(image, updates):
                image.updated_at = now
                _sync_segmentations(session, image)
            session.commit()
            return Registration(image, created=False, changed=changed)

    def update_image(
        self,
        image_id: int,
        *,
        sha256: str | None = None,
        size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        modality: str | None = None,
        view_position: str | None = None,
    ) -> SourceImage:
        """Record what reading the image revealed; ``None`` leaves a field as it is."""
        given = {"sha256": sha256, "size": size, "height": height, "width": width,
                 "modality": modality, "view_position": view_position}
        values = {k: v for k, v in given.items() if v is not None}
        return self._update_image(image_id, values, sync=sha256 is not None)

    def mark(
        self,
        image_id: int,
        status: ImageStatus,
        code: str | None = None,
        reason: str | None = None,
    ) -> SourceImage:
        """Move an image to ``status``; ``code``/``reason`` replace the stored ones.

        ``processing`` counts one more attempt. A refusal must carry a code.
        """
        status = ImageStatus(status)
        if status is ImageStatus.REFUSED and not code:
            raise ValueError("a refused image needs a refusal code")
        values: dict[str, Any] = {"status": status, "refusal_code": code, "reason": reason}
        if status is ImageStatus.PROCESSING:
            # Incremented in SQL so concurrent workers never lose a count.
            values["attempts"] = SourceImage.attempts + 1
        return self._update_image(image_id, values)

    def _update_image(self, image_id: int, values: dict[str, Any], sync: bool = False) -> SourceImage:
        with self._session() as session:
            image = session.scalars(
                sa.update(SourceImage)
                .where(SourceImage.id == image_id)
                .values(**values, updated_at=utcnow())
                .returning(SourceImage)
            ).one_or_none()
            if image is None:
                raise KeyError(f"no image with id {image_id}")
            if sync:
                _sync_segmentations(session, image)
            session.commit()
            return image

    def get_image(self, image_id: int) -> SourceImage | None:
        with self._session() as session:
            return session.get(SourceImage, image_id)

    def images_by_uri(self, uris: Iterable[str]) -> dict[str, SourceImage]:
        """The known images among ``uris``, by URI (one query per 500 URIs)."""
        wanted = list(dict.fromkeys(uris))
        found: dict[str, SourceImage] = {}
        with self._session() as session:
            # Chunked so the IN list stays under every backend's parameter limit.
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                found.update(
                    (image.uri, image)
                    for image in session.scalars(select(SourceImage).where(SourceImage.uri.in_(chunk)))
                )
        return found

    def images(
        self, filters: QueryFilters = QueryFilters(), limit: int = 100, offset: int = 0
    ) -> list[SourceImage]:
        """A page of images in id order; only the image-level filters may be set."""
        if filters.segmentation_level:
            raise ValueError("images() takes only dataset, release, status and id_pattern filters")
        statement = (
            select(SourceImage)
            .where(*_image_conditions(filters))
            .order_by(SourceImage.id)
            .limit(limit)
            .offset(offset)
        )
        with self._session() as session:
            return list(session.scalars(statement))

    def images_missing_model(
        self, model_version: str, filters: QueryFilters = QueryFilters(), batch_size: int = 1000
    ) -> Iterator[SourceImage]:
        """Images with no segmentation by ``model_version``, in id order, streamed.

        Refused images are left out (a refusal is never retried); images whose
        sha256 is still unknown are included, since nothing proves they are done.
        """
        if filters.segmentation_level:
            raise ValueError("images_missing_model() takes only image-level filters")
        done = sa.exists().where(
            Segmentation.image_sha256 == SourceImage.sha256,
            Segmentation.model_version == model_version,
        )
        statement = (
            select(SourceImage)
            .where(*_image_conditions(filters), SourceImage.status != ImageStatus.REFUSED, ~done)
            .order_by(SourceImage.id)
            .execution_options(yield_per=batch_size)
        )
        with self._session() as session:
            yield from session.scalars(statement)

    def status_counts(
        self, filters: QueryFilters = QueryFilters()
    ) -> dict[tuple[str, str | None], dict[ImageStatus, int]]:
        """Image counts by status for each (dataset, release)."""
        if filters.segmentation_level:
            raise ValueError("status_counts() takes only image-level filters")
        statement = (
            sa.select(SourceImage.dataset, SourceImage.release, SourceImage.status, sa.func.count())
            .where(*_image_conditions(filters))
            .group_by(SourceImage.dataset, SourceImage.release, SourceImage.status)
        )
        counts: dict[tuple[str, str | None], dict[ImageStatus, int]] = {}
        with self.engine.connect() as connection:
            for dataset, release, status, n in connection.execute(statement):
                counts.setdefault((dataset, release), {})[status] = n
        return counts

    # --- segmentations ------------------------------------------------------------

    def add_segmentation(
        self,
        *,
        image_id: int,
        image_sha256: str,
        model_version: str,
        weights_sha256: str,
        landmarks_1024: Sequence[Sequence[int]],
        landmarks_original: Sequence[Sequence[int]],
        height: int,
        width: int,
        rle: Mapping[str, str],
        rle_1024: Mapping[str, str],
        pipeline_version: str = PIPELINE_VERSION,
        latent: Sequence[float] | None = None,
        object_keys: Mapping[str, str] | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> tuple[Segmentation, bool]:
        """Store a segmentation unless (sha256, model) has one; returns (row, created).

        ``rle``/``rle_1024`` map ``right_lung``, ``left_lung``, ``heart`` to CheXmask
        RLE strings at original and 1024 resolution. The model version is
        registered on first use.
        """
        original = _points(landmarks_original)
        values = {
            "image_id": image_id,
            "image_sha256": image_sha256,
            "model_version": model_version,
            "weights_sha256": weights_sha256,
            "pipeline_version": pipeline_version,
            "landmarks_1024": _points(landmarks_1024),
            "landmarks_original": original,
            "landmarks_original_str": numpy_text(original),
            "latent": None if latent is None else [float(v) for v in latent],
            "height": int(height),
            "width": int(width),
            **{f"rle_{organ}": value for organ, value in _organs(rle).items()},
            **{f"rle_{organ}_1024": value for organ, value in _organs(rle_1024).items()},
            "qc_status": QCStatus.PENDING,
            "object_keys": dict(object_keys or {}),
            "timings": None if timings is None else {k: float(v) for k, v in timings.items()},
            "created_at": utcnow(),
        }
        with self._session() as session:
            image = session.get(SourceImage, image_id)
            if image is None:
                raise KeyError(f"no image with id {image_id}")
            self._ensure_model(session, model_version, weights_sha256)
            new_id = session.execute(
                self._insert(Segmentation)
                .values(**values, dataset=image.dataset, is_current=image.sha256 == image_sha256)
                .on_conflict_do_nothing(index_elements=["image_sha256", "model_version"])
                .returning(Segmentation.id)
            ).scalar_one_or_none()
            if new_id is None:
                existing = session.scalars(
                    select(Segmentation).where(
                        Segmentation.image_sha256 == image_sha256,
                        Segmentation.model_version == model_version,
                    )
                ).one()
                session.commit()
                return existing, False
            session.commit()
            return session.get_one(Segmentation, new_id), True

    def has_segmentation(self, image_sha256: str, model_version: str) -> bool:
        statement = sa.select(
            sa.exists().where(
                Segmentation.image_sha256 == image_sha256,
                Segmentation.model_version == model_version,
            )
        )
        with self.engine.connect() as connection:
            return bool(connection.execute(statement).scalar())

    def get_segmentation(self, segmentation_id: int) -> Segmentation | None:
        with self._session() as session:
            return session.get(Segmentation, segmentation_id)

    def set_qc(
        self,
        segmentation_id: int,
        *,
        status: QCStatus = QCStatus.DONE,
        dice_rca_mean: float | None = None,
        dice_rca_max: float | None = None,
        dice_rca_mean_rl: float | None = None,
        dice_rca_mean_ll: float | None = None,
        dice_rca_mean_h: float | None = None,
        dice_rca_max_rl: float | None = None,
        dice_rca_max_ll: float | None = None,
        dice_rca_max_h: float | None = None,
        shape_outlier_score: float | None = None,
        flags: Sequence[str] | None = None,
        reason: str | None = None,
    ) -> Segmentation:
        """Replace the QC results of a segmentation (all of them, so reruns are idempotent)."""
        scores = {
            "dice_rca_mean": dice_rca_mean, "dice_rca_max": dice_rca_max,
            "dice_rca_mean_rl": dice_rca_mean_rl, "dice_rca_mean_ll": dice_rca_mean_ll,
            "dice_rca_mean_h": dice_rca_mean_h, "dice_rca_max_rl": dice_rca_max_rl,
            "dice_rca_max_ll": dice_rca_max_ll, "dice_rca_max_h": dice_rca_max_h,
            "shape_outlier_score": shape_outlier_score,
        }
        values = {k: None if v is None else float(v) for k, v in scores.items()}
        with self._session() as session:
            segmentation = session.scalars(
                sa.update(Segmentation)
                .where(Segmentation.id == segmentation_id)
                .values(**values, qc_status=QCStatus(status),
                        qc_flags=None if flags is None else list(flags), qc_reason=reason or None)
                .returning(Segmentation)
            ).one_or_none()
            if segmentation is None:
                raise KeyError(f"no segmentation with id {segmentation_id}")
            session.commit()
            return segmentation

    # --- queries ----------------------------------------------------------------

    def query(
        self,
        filters: QueryFilters = QueryFilters(),
        sort: str = "id",
        limit: int = 100,
        offset: int = 0,
    ) -> list[SegmentationSummary]:
        """A page of segmentations with their images.

        ``sort`` is a key of ``SORT_KEYS``, ``-`` in front for descending; a
        missing Dice sorts as the lowest value. Ties are broken by id so pages
        never overlap.
        """
        statement = (
            self.select_segmentations(filters, *_SUMMARY_COLUMNS)
            .order_by(*_order_by(sort))
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as connection:
            return [SegmentationSummary(**row._mapping) for row in connection.execute(statement)]

    def select_segmentations(self, filters: QueryFilters, *columns: Any) -> sa.Select:
        """``SELECT columns`` over the current segmentations joined to their images, filtered."""
        # The dataset is matched on the segmentation so (dataset, Dice) is one index.
        image_filters = replace(filters, dataset=None)
        dataset = [] if filters.dataset is None else [Segmentation.dataset == canonical(filters.dataset)]
        return (
            sa.select(*columns)
            .select_from(Segmentation)
            .join(SourceImage, Segmentation.image_id == SourceImage.id)
            .where(
                Segmentation.is_current.is_(True),
                *dataset,
                *_image_conditions(image_filters),
                *_segmentation_conditions(filters),
            )
        )

    def stream(self, statement: sa.Select, batch_size: int = 2000) -> Iterator[Row[Any]]:
        """Rows of ``statement`` fetched ``batch_size`` at a time (a server-side cursor
        on PostgreSQL), so a result of any size runs in constant memory."""
        with self.engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(
                statement
            )
            yield from result

    # --- helpers ------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[Session]:
        # Objects stay readable after the session closes; they are returned to callers.
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def _insert(self, model: type) -> Any:
        """An INSERT that supports ``on_conflict_do_nothing`` on this backend."""
        from sqlalchemy.dialects import postgresql, sqlite

        return (postgresql if self.dialect == "postgresql" else sqlite).insert(model)


def _alembic_config() -> Any:
    from alembic.config import Config

    return Config(str(MIGRATIONS_INI))


def _sync_segmentations(session: Session, image: SourceImage) -> None:
    """Keep the copies segmentations hold of their image's facts in step with it:
    its dataset, and whether it still has the bytes (sha256) they were made from."""
    is_current = sa.false() if image.sha256 is None else Segmentation.image_sha256 == image.sha256
    session.execute(
        sa.update(Segmentation)
        .where(Segmentation.image_id == image.id)
        .values(dataset=image.dataset, is_current=is_current)
    )


def _content_changed(image: SourceImage, given: Mapping[str, Any]) -> bool:
    """Whether a known fingerprint (etag/version, sha256, size) differs from the stored one."""
    return any(
        given[name] is not None and getattr(image, name) is not None and given[name] != getattr(image, name)
        for name in ("etag_or_version", "sha256", "size")
    )


def _assign(row: Any, values: Mapping[str, Any]) -> bool:
    """Set the attributes that differ; whether any did."""
    changed = False
    for name, value in values.items():
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed


def _points(landmarks: Sequence[Sequence[int]]) -> list[list[int]]:
    points = [[int(x), int(y)] for x, y in landmarks]
    if len(points) != N_LANDMARKS:
        raise ValueError(f"expected {N_LANDMARKS} landmarks, got {len(points)}")
    return points


def _organs(rle: Mapping[str, str]) -> dict[str, str]:
    if set(rle) != set(ORGANS):
        raise ValueError(f"RLE must give exactly {', '.join(ORGANS)}; got {sorted(rle)}")
    return {organ: str(rle[organ]) for organ in ORGANS}


def _image_conditions(filters: QueryFilters) -> list[Any]:
    conditions: list[Any] = []
    if filters.dataset is not None:
        conditions.append(SourceImage.dataset == canonical(filters.dataset))
    if filters.release is not None:
        conditions.append(SourceImage.release == filters.release)
    if filters.status is not None:
        conditions.append(SourceImage.status == ImageStatus(filters.status))
    if filters.id_pattern is not None:
        conditions.append(_id_condition(filters.id_pattern))
    return conditions


def _id_condition(pattern: str) -> Any:
    column = SourceImage.dataset_image_id
    if "*" in pattern or "?" in pattern:
        escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")
    if "%" in pattern:
        return column.like(pattern)
    # Ids often contain "_"; without "%" a pattern is an exact id, not a LIKE.
    return column == pattern


def _segmentation_conditions(filters: QueryFilters) -> list[Any]:
    conditions: list[Any] = []
    if filters.model is not None:
        conditions.append(Segmentation.model_version == filters.model)
    if filters.min_dice_mean is not None:
        conditions.append(Segmentation.dice_rca_mean >= filters.min_dice_mean)
    if filters.max_dice_mean is not None:
        conditions.append(Segmentation.dice_rca_mean <= filters.max_dice_mean)
    if filters.min_dice_max is not None:
        conditions.append(Segmentation.dice_rca_max >= filters.min_dice_max)
    if filters.max_dice_max is not None:
        conditions.append(Segmentation.dice_rca_max <= filters.max_dice_max)
    if filters.created_after is not None:
        conditions.append(Segmentation.created_at >= as_utc(filters.created_after))
    if filters.created_before is not None:
        conditions.append(Segmentation.created_at < as_utc(filters.created_before))
    return conditions


def _order_by(sort: str) -> list[Any]:
    descending = sort.startswith("-")
    key = sort.removeprefix("-")
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}; choose from {', '.join(SORT_KEYS)}")
    column = SORT_KEYS[key]
    if descending:
        order = [column.desc().nulls_last(), Segmentation.id.desc()]
    else:
        order = [column.asc().nulls_first(), Segmentation.id.asc()]
    return order[1:] if key == "id" else order
