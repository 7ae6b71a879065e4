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

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Row
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from chexmask import PIPELINE_VERSION
from chexmask.anatomy import N_LANDMARKS, ORGAN_ROWS, ORGANS
from chexmask.datasets import canonical
from chexmask.errors import ConfigError, NotFound
from chexmask.status import ImageStatus, QCStatus
from chexmask.storage.engine import alembic_config, create_engine
from chexmask.storage.layout import numpy_text
from chexmask.storage.models import (
    IMPORT_PIPELINES,
    IMPORT_SCHEME,
    ModelVersion,
    Segmentation,
    SourceImage,
    utcnow,
)
from chexmask.storage.queries import (
    AGREEMENT,
    SUMMARY_COLUMNS,
    QueryFilters,
    SegmentationSummary,
    agreement_on,
    image_conditions,
    one_of,
    order_by,
    segmentation_conditions,
    with_agreement,
)


@dataclass(frozen=True)
class Lease:
    """Who holds an image (or a pending QC) and until when; ``expires_at`` of a failed
    image is when its retry is due."""

    id: int
    owner: str | None
    expires_at: datetime | None


@dataclass(frozen=True)
class Registration:
    image: SourceImage
    created: bool  # first time this URI was seen
    changed: bool  # known URI whose content (etag/version, sha256 or size) differs

    @property
    def needs_processing(self) -> bool:
        return self.created or self.changed


class MaskIndex:
    def __init__(self, database_url: str):
        self.engine = create_engine(database_url)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # --- schema -----------------------------------------------------------------

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` with Alembic; a no-op when already there."""
        from alembic import command

        config = alembic_config()
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

        return ScriptDirectory.from_config(alembic_config()).get_current_head()

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

    def _ensure_model(self, session: Session, name: str, weights_sha256: str, description: str = "") -> ModelVersion:
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
        content = {"etag_or_version": etag_or_version, "sha256": sha256, "size": size, "height": height, "width": width}
        described = {
            "dataset": canonical(dataset),
            "release": release,
            "dataset_image_id": dataset_image_id,
            "modality": modality,
            "view_position": view_position,
        }
        now = utcnow()
        with self._session() as session:
            new_id = session.execute(
                self._insert(SourceImage)
                .values(
                    uri=uri,
                    **content,
                    **described,
                    first_seen=now,
                    updated_at=now,
                    status=ImageStatus.QUEUED,
                    attempts=0,
                )
                .on_conflict_do_nothing(index_elements=["uri"])
                .returning(SourceImage.id)
            ).scalar_one_or_none()
            if new_id is not None:
                session.commit()
                return Registration(session.get_one(SourceImage, new_id), created=True, changed=False)

            image = session.scalars(select(SourceImage).where(SourceImage.uri == uri).with_for_update()).one()
            changed = _content_changed(image, content)
            updates = {k: v for k, v in {**content, **described}.items() if v is not None}
            if changed:
                # Whatever was known about the old bytes no longer holds.
                updates.update(
                    content,
                    status=ImageStatus.QUEUED,
                    attempts=0,
                    refusal_code=None,
                    reason=None,
                    retry_at=None,
                    failing_since=None,
                )
            if _assign(image, updates):
                image.updated_at = now
                _sync_segmentations(session, image)
            session.commit()
            return Registration(image, created=False, changed=changed)

    def register_linked(self, images: Sequence[Mapping[str, Any]]) -> int:
        """Register files whose dataset image id an import already covers, as ``done``
        (no bytes read: the published mask stands for them); see ``register_new``.
        Returns how many were new."""
        return len(self.register_new(images, ImageStatus.DONE))

    def register_new(self, images: Sequence[Mapping[str, Any]], status: ImageStatus = ImageStatus.QUEUED) -> set[str]:
        """Register images with ``status`` in one statement; URIs the index knows are left
        as they are. Each mapping gives ``uri``, ``dataset``, ``dataset_image_id`` and
        optionally ``release``, ``etag_or_version``, ``size``. Returns the URIs added.
        (A scan registers a page of a listing at once; one ``register_image`` each, with
        its own transaction, took 5-10 ms an image.)"""
        if not images:
            return set()
        rows = [
            {
                "uri": i["uri"],
                "dataset": canonical(i["dataset"]),
                "release": i.get("release"),
                "dataset_image_id": i["dataset_image_id"],
                "etag_or_version": i.get("etag_or_version"),
                "size": i.get("size"),
            }
            for i in images
        ]
        now = utcnow()
        constants = {"first_seen": now, "updated_at": now, "status": status, "attempts": 0}
        with self.engine.begin() as connection:
            if self.dialect != "postgresql":
                insert = self._insert(SourceImage).on_conflict_do_nothing(index_elements=["uri"])
                added = connection.execute(insert.returning(SourceImage.uri), [{**r, **constants} for r in rows])
                return set(added.scalars())
            # PostgreSQL: one statement over an array per column. A many-row VALUES list
            # (how RETURNING goes with executemany) took ~90 ms a page in the driver alone.
            columns = SourceImage.__table__.c
            arrays = [
                sa.func.unnest(sa.literal([r[c] for r in rows], ARRAY(columns[c].type))).label(c) for c in rows[0]
            ]
            fixed = [sa.literal(v, columns[c].type).label(c) for c, v in constants.items()]
            insert = self._insert(SourceImage).from_select([*rows[0], *constants], sa.select(*arrays, *fixed))
            insert = insert.on_conflict_do_nothing(index_elements=["uri"]).returning(SourceImage.uri)
            return set(connection.execute(insert).scalars())

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
        given = {
            "sha256": sha256,
            "size": size,
            "height": height,
            "width": width,
            "modality": modality,
            "view_position": view_position,
        }
        values = {k: v for k, v in given.items() if v is not None}
        return self._update_image(image_id, values, sync=sha256 is not None)

    def mark(
        self,
        image_id: int,
        status: ImageStatus,
        code: str | None = None,
        reason: str | None = None,
        *,
        owner: str | None = None,
        lease_s: float = 0.0,
        retry_at: datetime | None = None,
    ) -> SourceImage:
        """Move an image to ``status``; ``code``/``reason`` replace the stored ones.

        ``processing`` counts one more attempt and is leased to ``owner`` for
        ``lease_s`` seconds (renewed by ``renew_leases``); any other status ends the
        lease. ``failed`` with a ``retry_at`` is tried again then by the sweep
        (``failing_since`` remembers when the failures began); ``done`` forgets them.
        A refusal must carry a code.
        """
        status = ImageStatus(status)
        if status is ImageStatus.REFUSED and not code:
            raise ValueError("a refused image needs a refusal code")
        now = utcnow()
        values: dict[str, Any] = {
            "status": status,
            "refusal_code": code,
            "reason": reason,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if status is ImageStatus.PROCESSING:
            # Incremented in SQL so concurrent workers never lose a count.
            values["attempts"] = SourceImage.attempts + 1
            values.update(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
        if status is ImageStatus.FAILED:
            values["retry_at"] = retry_at
            values["failing_since"] = sa.func.coalesce(SourceImage.failing_since, now) if retry_at is not None else None
        if status in (ImageStatus.DONE, ImageStatus.REFUSED):
            values.update(retry_at=None, failing_since=None)
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
                raise NotFound(f"no image with id {image_id}")
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
                chunk = wanted[start : start + 500]
                condition = one_of(SourceImage.uri, chunk, self.engine.dialect.name)
                found.update((image.uri, image) for image in session.scalars(select(SourceImage).where(condition)))
        return found

    def images(self, filters: QueryFilters = QueryFilters(), limit: int = 100, offset: int = 0) -> list[SourceImage]:
        """A page of images in id order; only the image-level filters may be set."""
        if filters.segmentation_level:
            raise ValueError("images() takes only dataset, release, status and id_pattern filters")
        statement = (
            select(SourceImage).where(*image_conditions(filters)).order_by(SourceImage.id).limit(limit).offset(offset)
        )
        with self._session() as session:
            return list(session.scalars(statement))

    def images_missing_model(
        self, model_version: str, filters: QueryFilters = QueryFilters(), batch_size: int = 1000
    ) -> Iterator[SourceImage]:
        """Images with no segmentation by ``model_version``, in id order, streamed.

        Refused images are left out (a refusal is never retried); images whose
        sha256 is still unknown are included, since nothing proves they are done.
        Imported images (``chexmask:`` URIs) have no bytes to segment and are left
        out; so is a file whose dataset image id has an imported segmentation by
        ``model_version`` (the published mask stands for it).
        """
        if filters.segmentation_level:
            raise ValueError("images_missing_model() takes only image-level filters")
        done = sa.exists().where(
            Segmentation.image_sha256 == SourceImage.sha256,
            Segmentation.model_version == model_version,
        )
        published = aliased(SourceImage)
        imported = sa.exists().where(
            published.dataset_image_id == SourceImage.dataset_image_id,
            published.dataset == SourceImage.dataset,
            published.uri.like(f"{IMPORT_SCHEME}%"),
            Segmentation.image_id == published.id,
            Segmentation.model_version == model_version,
            Segmentation.pipeline_version.in_(IMPORT_PIPELINES),
        )
        statement = (
            select(SourceImage)
            .where(
                *image_conditions(filters),
                SourceImage.status != ImageStatus.REFUSED,
                ~done,
                ~SourceImage.uri.like(f"{IMPORT_SCHEME}%"),
                ~imported,
            )
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
            .where(*image_conditions(filters))
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
        landmark_std: Sequence[float] | None = None,
        uncertainty_samples: int | None = None,
        object_keys: Mapping[str, str] | None = None,
        timings: Mapping[str, float] | None = None,
        qc_owner: str | None = None,
        qc_lease_s: float = 0.0,
        measurements: Mapping[str, Any] | None = None,
    ) -> tuple[Segmentation, bool]:
        """Store a segmentation unless (sha256, model) has one; returns (row, created).

        ``rle``/``rle_1024`` map ``right_lung``, ``left_lung``, ``heart`` to CheXmask
        RLE strings at original and 1024 resolution. The model version is
        registered on first use. Its pending QC is held by ``qc_owner`` for
        ``qc_lease_s`` seconds, so a crash before QC leaves a lease that runs out.
        ``measurements``: the measurement columns (``Measurements.columns()``).
        ``landmark_std`` ([120], pixels of the 1024 frame, from ``uncertainty_samples``
        latent samples) is stored with its per-organ means.
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
            **_uncertainty(landmark_std, uncertainty_samples),
            "height": int(height),
            "width": int(width),
            **{f"rle_{organ}": value for organ, value in _organs(rle).items()},
            **{f"rle_{organ}_1024": value for organ, value in _organs(rle_1024).items()},
            "qc_status": QCStatus.PENDING,
            "object_keys": dict(object_keys or {}),
            "timings": None if timings is None else {k: float(v) for k, v in timings.items()},
            "created_at": utcnow(),
            "qc_lease_owner": qc_owner,
            "qc_lease_expires_at": utcnow() + timedelta(seconds=qc_lease_s),
            **dict(measurements or {}),
        }
        with self._session() as session:
            image = session.get(SourceImage, image_id)
            if image is None:
                raise NotFound(f"no image with id {image_id}")
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

    def segmentation_for(self, image_sha256: str, model_version: str) -> Segmentation | None:
        """The segmentation of this content by this model, if there is one."""
        with self._session() as session:
            return session.scalars(
                select(Segmentation).where(
                    Segmentation.image_sha256 == image_sha256,
                    Segmentation.model_version == model_version,
                )
            ).one_or_none()

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
            "dice_rca_mean": dice_rca_mean,
            "dice_rca_max": dice_rca_max,
            "dice_rca_mean_rl": dice_rca_mean_rl,
            "dice_rca_mean_ll": dice_rca_mean_ll,
            "dice_rca_mean_h": dice_rca_mean_h,
            "dice_rca_max_rl": dice_rca_max_rl,
            "dice_rca_max_ll": dice_rca_max_ll,
            "dice_rca_max_h": dice_rca_max_h,
            "shape_outlier_score": shape_outlier_score,
        }
        values = {k: None if v is None else float(v) for k, v in scores.items()}
        with self._session() as session:
            segmentation = session.scalars(
                sa.update(Segmentation)
                .where(Segmentation.id == segmentation_id)
                .values(
                    **values,
                    qc_status=QCStatus(status),
                    qc_flags=None if flags is None else list(flags),
                    qc_reason=reason or None,
                    qc_lease_owner=None,
                    qc_lease_expires_at=None,
                )
                .returning(Segmentation)
            ).one_or_none()
            if segmentation is None:
                raise NotFound(f"no segmentation with id {segmentation_id}")
            session.commit()
            return segmentation

    def add_object_keys(self, segmentation_id: int, keys: Mapping[str, str]) -> None:
        """Record artefacts written after the row (the DICOM SR, made once QC is done)."""
        with self._session() as session:
            segmentation = session.get(Segmentation, segmentation_id)
            if segmentation is None:
                raise NotFound(f"no segmentation with id {segmentation_id}")
            segmentation.object_keys = {**segmentation.object_keys, **keys}  # a new dict: JSON is not mutable-tracked
            session.commit()

    # --- leases and sweeps ------------------------------------------------------------

    def renew_leases(self, owner: str, lease_s: float) -> int:
        """Extend every lease ``owner`` holds (processing images, pending QCs); how many."""
        expires = utcnow() + timedelta(seconds=lease_s)
        with self._session() as session:
            images = session.execute(
                sa.update(SourceImage)
                .where(SourceImage.lease_owner == owner, SourceImage.status == ImageStatus.PROCESSING)
                .values(lease_expires_at=expires)
            ).rowcount
            qcs = session.execute(
                sa.update(Segmentation)
                .where(Segmentation.qc_lease_owner == owner, Segmentation.qc_status == QCStatus.PENDING)
                .values(qc_lease_expires_at=expires)
            ).rowcount
            session.commit()
        return images + qcs

    def processing_leases(self, limit: int = 10_000) -> list[Lease]:
        """Images in ``processing`` with their holders, oldest lease first."""
        statement = (
            sa.select(SourceImage.id, SourceImage.lease_owner, SourceImage.lease_expires_at)
            .where(SourceImage.status == ImageStatus.PROCESSING)
            .order_by(SourceImage.lease_expires_at.nulls_first(), SourceImage.id)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [Lease(*row) for row in connection.execute(statement)]

    def qc_leases(self, limit: int = 10_000) -> list[Lease]:
        """Segmentations whose QC is pending, with their holders, oldest lease first."""
        statement = (
            sa.select(Segmentation.id, Segmentation.qc_lease_owner, Segmentation.qc_lease_expires_at)
            .where(Segmentation.qc_status == QCStatus.PENDING)
            .order_by(Segmentation.qc_lease_expires_at.nulls_first(), Segmentation.id)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [Lease(*row) for row in connection.execute(statement)]

    def due_retries(self, limit: int = 10_000) -> list[Lease]:
        """Failed images whose automatic retry is due."""
        statement = (
            sa.select(SourceImage.id, SourceImage.lease_owner, SourceImage.retry_at)
            .where(SourceImage.status == ImageStatus.FAILED, SourceImage.retry_at <= utcnow())
            .order_by(SourceImage.retry_at)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [Lease(*row) for row in connection.execute(statement)]

    def requeue(self, lease: Lease, owner: str, lease_s: float, reset_attempts: bool = False) -> bool:
        """Take an image over from ``lease`` (it is still held as it says: nobody took it
        meanwhile) and put it back to ``queued``, held by ``owner`` for ``lease_s``;
        whether this caller won it."""
        values: dict[str, Any] = {
            "status": ImageStatus.QUEUED,
            "lease_owner": owner,
            "lease_expires_at": utcnow() + timedelta(seconds=lease_s),
            "updated_at": utcnow(),
        }
        if reset_attempts:
            values["attempts"] = 0
        same_holder = (
            SourceImage.lease_owner.is_(None) if lease.owner is None else SourceImage.lease_owner == lease.owner
        )
        with self._session() as session:
            won = session.execute(
                sa.update(SourceImage)
                .where(
                    SourceImage.id == lease.id,
                    same_holder,
                    SourceImage.status.in_([ImageStatus.PROCESSING, ImageStatus.FAILED]),
                )
                .values(**values)
            ).rowcount
            session.commit()
        return won == 1

    def take_qc(self, lease: Lease | int, owner: str | None, lease_s: float) -> bool:
        """Hold the pending QC of a segmentation for ``owner``: taken over from ``lease``
        (only if still held as it says), or unconditionally given a bare id; whether it was."""
        condition = [Segmentation.qc_status == QCStatus.PENDING]
        if isinstance(lease, Lease):
            condition.append(
                Segmentation.qc_lease_owner.is_(None)
                if lease.owner is None
                else Segmentation.qc_lease_owner == lease.owner
            )
        segmentation_id = lease.id if isinstance(lease, Lease) else lease
        with self._session() as session:
            won = session.execute(
                sa.update(Segmentation)
                .where(Segmentation.id == segmentation_id, *condition)
                .values(qc_lease_owner=owner, qc_lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            ).rowcount
            session.commit()
        return won == 1

    def requeue_ids(self, image_ids: Sequence[int]) -> None:
        """Put these images back to ``queued`` with fresh attempts (``reprocess``),
        leaving those in ``processing`` to their holders (or the sweep)."""
        with self._session() as session:
            for start in range(0, len(image_ids), 500):
                session.execute(
                    sa.update(SourceImage)
                    .where(
                        SourceImage.id.in_(image_ids[start : start + 500]), SourceImage.status != ImageStatus.PROCESSING
                    )
                    .values(
                        status=ImageStatus.QUEUED,
                        attempts=0,
                        lease_owner=None,
                        lease_expires_at=None,
                        retry_at=None,
                        failing_since=None,
                        updated_at=utcnow(),
                    )
                )
            session.commit()

    def retry_failed(self, filters: QueryFilters = QueryFilters()) -> list[int]:
        """Put every failed image of the filter back to ``queued`` with fresh attempts
        (``chexmask retry``); their ids."""
        with self._session() as session:
            ids = list(
                session.scalars(
                    sa.update(SourceImage)
                    .where(SourceImage.status == ImageStatus.FAILED, *image_conditions(filters))
                    .values(
                        status=ImageStatus.QUEUED,
                        attempts=0,
                        retry_at=None,
                        failing_since=None,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=utcnow(),
                    )
                    .returning(SourceImage.id)
                )
            )
            session.commit()
        return sorted(ids)

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
        never overlap. With ``compare_to`` each row carries its comparison with
        that model's mask (the agreement fields), in the same query.
        """
        statement = self.select_segmentations(filters, *SUMMARY_COLUMNS)
        if filters.compare_to is not None:
            statement = with_agreement(statement)
        statement = statement.order_by(*order_by(sort)).limit(limit).offset(offset)
        with self.engine.connect() as connection:
            return [SegmentationSummary(**row._mapping) for row in connection.execute(statement)]

    def select_segmentations(self, filters: QueryFilters, *columns: Any, join_images: bool = True) -> sa.Select:
        """``SELECT columns`` over the current segmentations joined to their images, filtered.

        ``join_images=False`` leaves the images out where neither the columns, the
        filters nor the caller's ORDER BY need them (every segmentation has its
        image, so the rows are the same): an index over segmentation columns then
        answers alone. ``compare_to`` joins each segmentation's comparison with that
        model's mask (``queries.AGREEMENT``, one row at most per segmentation).
        """
        # The dataset is matched on the segmentation so (dataset, Dice) is one index.
        image_filters = image_conditions(replace(filters, dataset=None))
        dataset = [] if filters.dataset is None else [Segmentation.dataset == canonical(filters.dataset)]
        statement = sa.select(*columns).select_from(Segmentation)
        if join_images or image_filters:
            statement = statement.join(SourceImage, Segmentation.image_id == SourceImage.id)
        if filters.compare_to is not None:
            statement = statement.join(AGREEMENT, agreement_on(filters))
        return statement.where(
            Segmentation.is_current.is_(True),
            *dataset,
            *image_filters,
            *segmentation_conditions(filters),
        )

    def stream(self, statement: sa.Select, batch_size: int = 2000) -> Iterator[Row[Any]]:
        """Rows of ``statement`` fetched ``batch_size`` at a time (a server-side cursor
        on PostgreSQL), so a result of any size runs in constant memory."""
        with self.engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(statement)
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


def _uncertainty(landmark_std: Sequence[float] | None, samples: int | None) -> dict[str, Any]:
    """The uncertainty columns of a segmentation: the per-landmark std and its organ means."""
    if landmark_std is None:
        return {}
    std = [float(v) for v in landmark_std]
    if len(std) != N_LANDMARKS:
        raise ValueError(f"landmark_std needs {N_LANDMARKS} values, got {len(std)}")
    means = {f"uncertainty_{k.lower()}": sum(std[rows]) / len(std[rows]) for k, rows in ORGAN_ROWS.items()}
    return {"landmark_std": std, "uncertainty_samples": samples, **means}
