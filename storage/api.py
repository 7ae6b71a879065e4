"""Read-only HTTP API over the index and the object store.

When a token is configured (``CHEXMASK_API_TOKEN``) every data route needs
``Authorization: Bearer <token>`` (or the web app's cookie, see ``auth``);
``/health`` and the OpenAPI docs stay open. The web app (``web``) is served by
the same app.
Only segmentation artefacts (keys under ``segmentations/``) are served, so
whatever else shares the store, such as source images, is never exposed.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from chexmask import __version__
from chexmask.config import Settings, mask_url
from chexmask.errors import NotFound, TransientError
from chexmask.status import ImageStatus
from chexmask.storage.auth import api_guard
from chexmask.storage.index import MaskIndex
from chexmask.storage.objectstore import check_key, open_store
from chexmask.storage.queries import SORT_KEYS, QueryFilters, SegmentationSummary
from chexmask.storage.stats import compute_stats
from chexmask.storage.web import mount_web

log = logging.getLogger(__name__)

MAX_PAGE = 1000
# Database integers are 64-bit: larger offsets and ids are answered 422, not a 500
# from the driver (an offset leaves room for the page added to it).
MAX_ID = 2**63 - 1
MAX_OFFSET = 2**62
MAX_KEY_CHARS = 1024  # object keys are made by us and far shorter; longer ones are not ours
SERVED_PREFIX = "segmentations/"
_SORT_PATTERN = "^-?(" + "|".join(SORT_KEYS) + ")$"
log = logging.getLogger(__name__)


class Page(BaseModel):
    """A page of segmentations; each one's full record is at ``/segmentations/{id}``."""

    items: list[SegmentationSummary]
    limit: int
    offset: int
    next_offset: int | None  # None on the last page


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    index = MaskIndex(settings.database_url)
    store = open_store(settings.store_url, settings.s3_endpoint_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        index.close()

    app = FastAPI(title="chexmask-stream", version=__version__, lifespan=lifespan)
    token = settings.api_token.get_secret_value() if settings.api_token else None
    guarded = [Depends(api_guard(token))]

    @app.get("/health")
    def health() -> dict[str, Any]:
        try:
            revision = index.current_revision()
        except Exception as exc:  # any database failure makes us unhealthy, never a 500
            # The driver's message names the host, port and user: for the log, not the client.
            log.warning(
                "health: index %s unreachable: %s",
                mask_url(settings.database_url),
                _without_secrets(str(exc), settings.database_url),
            )
            raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE, "index unreachable") from exc
        return {"status": "ok", "schema_revision": revision}

    @app.get("/segmentations", dependencies=guarded, response_model=Page)
    def list_segmentations(
        filters: Annotated[QueryFilters, Depends(_filters)],
        sort: Annotated[str, Query(pattern=_SORT_PATTERN)] = "id",
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> Page:
        """Segmentations matching the filters. With ``compare_to`` only those ``chexmask
        compare`` paired with that model's mask of the same image, each carrying the
        comparison (the ``other_*``, ``agreement_*`` and ``compared_at`` fields)."""
        # One extra row tells whether a next page exists without a COUNT(*) over the set.
        rows = index.query(filters, sort=sort, limit=limit + 1, offset=offset)
        return Page(
            items=rows[:limit], limit=limit, offset=offset, next_offset=offset + limit if len(rows) > limit else None
        )

    @app.get("/segmentations/{segmentation_id}", dependencies=guarded)
    def get_segmentation(
        segmentation_id: Annotated[int, PathParam(ge=1, le=MAX_ID)], request: Request
    ) -> dict[str, Any]:
        segmentation = index.get_segmentation(segmentation_id)
        if segmentation is None:
            raise HTTPException(HTTPStatus.NOT_FOUND, "no such segmentation")
        record = segmentation.model_dump(mode="json")
        record["objects"] = {
            name: str(request.url_for("get_object", key=key)) for name, key in segmentation.object_keys.items()
        }
        return record

    @app.get("/objects/{key:path}", dependencies=guarded, name="get_object")
    def get_object(key: str) -> StreamingResponse:
        try:
            if len(key) > MAX_KEY_CHARS or not check_key(key).startswith(SERVED_PREFIX):
                raise NotFound(key)
            chunks = store.stream(key)
        except (NotFound, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise HTTPException(HTTPStatus.NOT_FOUND, "no such object") from None
        except TransientError as exc:
            raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from exc
        media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        return StreamingResponse(chunks, media_type=media_type)

    @app.get("/stats", dependencies=guarded)
    def stats(dataset: str | None = None, release: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        groups = compute_stats(index, dataset=dataset, release=release, model=model)
        return [group.as_dict() for group in groups]

    mount_web(app, index, store, token)
    return app


def _filters(
    dataset: str | None = None,
    release: str | None = None,
    model: str | None = None,
    status: ImageStatus | None = None,
    min_dice_mean: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_dice_mean: Annotated[float | None, Query(ge=0, le=1)] = None,
    min_dice_max: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_dice_max: Annotated[float | None, Query(ge=0, le=1)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    id_pattern: str | None = None,
    min_ctr: Annotated[float | None, Query(ge=0)] = None,
    max_ctr: Annotated[float | None, Query(ge=0)] = None,
    compare_to: str | None = None,
    min_agreement_dice: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_agreement_dice: Annotated[float | None, Query(ge=0, le=1)] = None,
) -> QueryFilters:
    try:
        return QueryFilters(
            dataset=dataset,
            release=release,
            model=model,
            status=status,
            min_dice_mean=min_dice_mean,
            max_dice_mean=max_dice_mean,
            min_dice_max=min_dice_max,
            max_dice_max=max_dice_max,
            created_after=created_after,
            created_before=created_before,
            id_pattern=id_pattern,
            min_ctr=min_ctr,
            max_ctr=max_ctr,
            compare_to=compare_to,
            min_agreement_dice=min_agreement_dice,
            max_agreement_dice=max_agreement_dice,
        )
    except ValueError as exc:  # an agreement bound without compare_to
        raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None


def _without_secrets(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (should a driver repeat it) masked."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text
