"""The web app: browse, check and grade the masks, served by ``chexmask api``.

Server-rendered pages (Jinja2) with a little dependency-free JavaScript for the
keyboard and the organ/landmark layers; figures are PNGs drawn on the server.
It reads the index and the store; its only writes are grades (the ``review``
table) and thumbnails stored beside the overlays they shrink.

Token rules are those of the API (see ``auth``): pages need the token when one
is set, given once as ``?token=`` (it becomes a cookie) or as a bearer header.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chexmask.anatomy import N_LANDMARKS, ORGAN_ROWS
from chexmask.errors import NotFound, TransientError
from chexmask.quality import GOOD_DICE
from chexmask.status import ImageStatus
from chexmask.storage import browse, plots, reviews
from chexmask.storage.auth import COOKIE, COOKIE_MAX_AGE, authorized, bearer, csrf_value, same
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import GRADE_COLUMNS, Segmentation
from chexmask.storage.objectstore import ObjectStore
from chexmask.storage.queries import SORT_KEYS, QueryFilters

HERE = Path(__file__).parent
SORTS = {
    "dice_rca_mean": "Dice RCA (Mean), worst first",
    "-dice_rca_mean": "Dice RCA (Mean), best first",
    "dice_rca_max": "Dice RCA (Max), worst first",
    "-created_at": "newest first",
    "created_at": "oldest first",
    "id": "id",
    "dataset_image_id": "dataset image id",
}
REVIEWER_COOKIE = "chexmask_reviewer"
# Content-addressed keys never change, so a thumbnail may be cached for long.
THUMB_CACHE = "private, max-age=31536000, immutable"
FIGURE_CACHE = "private, max-age=60"
LIST_KEYS = ("after", "before", "token")


class PageUnauthorized(Exception):
    """A page asked for without the token: answered with a page that says how to give it."""


class BadFilter(Exception):
    """Gallery filters that cannot be applied: answered with a page that says why (422)."""


class GalleryQuery(BaseModel):
    """The gallery's query string: the index filters, the web-only ones, sort and cursor."""

    model_config = ConfigDict(extra="ignore")
    dataset: str | None = None
    release: str | None = None
    model: str | None = None
    status: ImageStatus | None = None
    min_dice_mean: float | None = Field(None, ge=0, le=1)
    max_dice_mean: float | None = Field(None, ge=0, le=1)
    min_dice_max: float | None = Field(None, ge=0, le=1)
    max_dice_max: float | None = Field(None, ge=0, le=1)
    created_after: datetime | None = None
    created_before: datetime | None = None
    id_pattern: str | None = None
    compare_to: str | None = None
    min_agreement_dice: float | None = Field(None, ge=0, le=1)
    max_agreement_dice: float | None = Field(None, ge=0, le=1)
    flag: str | None = None
    reviewed: bool | None = None
    sort: str = "dice_rca_mean"
    limit: int = Field(48, ge=1, le=200)
    after: int | None = None
    before: int | None = None

    def filters(self) -> browse.GalleryFilters:
        base = QueryFilters(**self.model_dump(include=set(QueryFilters.__dataclass_fields__)))
        return browse.GalleryFilters(base, self.flag, self.reviewed)


def gallery_query(request: Request) -> GalleryQuery:
    # Empty form fields mean "no constraint", not an invalid number.
    values = {k: v for k, v in request.query_params.items() if v != ""}
    try:
        query = GalleryQuery.model_validate(values)
    except ValidationError as exc:
        raise BadFilter(*(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    if query.sort.removeprefix("-") not in SORT_KEYS:
        raise BadFilter(f"cannot sort by {query.sort!r}")
    try:
        query.filters()
    except ValueError as exc:  # an agreement bound without a model to compare to
        raise BadFilter(str(exc)) from None
    return query


def carried(request: Request, drop: tuple[str, ...] = LIST_KEYS) -> str:
    """The request's query string without the cursor and the token, for links."""
    return urlencode([(k, v) for k, v in request.query_params.multi_items() if k not in drop and v != ""])


def mount_web(app: FastAPI, index: MaskIndex, store: ObjectStore, token: str | None) -> None:
    """Add the pages, the static files and the grade route to ``app``."""
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(
        good_dice=GOOD_DICE, sorts=SORTS, statuses=[s.value for s in ImageStatus], csrf=csrf_value(token)
    )
    queue = reviews.ReviewQueue(index)

    def page_guard(request: Request) -> None:
        given = request.query_params.get("token")
        if token is not None and given is not None:
            if not same(given, token):
                raise PageUnauthorized()
            # Swap the token in the address for a cookie, so it leaves the history and the logs.
            rest = carried(request, drop=("token",))
            location = request.url.path + (f"?{rest}" if rest else "")
            headers = {"Location": location, "Set-Cookie": _cookie(request, COOKIE, token, http_only=True)}
            raise HTTPException(HTTPStatus.SEE_OTHER, "token accepted", headers=headers)
        if not authorized(request, token):
            raise PageUnauthorized()

    router = APIRouter(dependencies=[Depends(page_guard)], include_in_schema=False)

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("reviewer", request.cookies.get(REVIEWER_COOKIE, ""))
        return templates.TemplateResponse(request, template, context, status_code=status_code)

    @app.exception_handler(PageUnauthorized)
    def unauthorized(request: Request, _exc: PageUnauthorized) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            "unauthorized.html",
            {"reviewer": ""},
            status_code=HTTPStatus.UNAUTHORIZED,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(BadFilter)
    def bad_filter(request: Request, exc: BadFilter) -> HTMLResponse:
        return render(request, "bad_filter.html", HTTPStatus.UNPROCESSABLE_ENTITY, reasons=exc.args)

    @router.get("/", response_class=HTMLResponse)
    def gallery(request: Request, query: Annotated[GalleryQuery, Depends(gallery_query)]) -> HTMLResponse:
        try:
            result = browse.page(index, query.filters(), query.sort, query.limit, query.after, query.before)
        except NotFound:
            raise HTTPException(HTTPStatus.NOT_FOUND, "the page cursor names no segmentation") from None
        return render(
            request,
            "gallery.html",
            page=result,
            query=query,
            carried=carried(request),
            datasets=browse.datasets(index),
            compared=browse.compared_models(index, query.model),
        )

    @router.get("/thumbs/{segmentation_id}.jpg", name="thumbnail")
    def thumbnail(segmentation_id: int, request: Request) -> Response:
        overlay = _overlay_key(index, segmentation_id)
        etag = '"' + hashlib.sha256(browse.thumbnail_key(overlay).encode()).hexdigest()[:20] + '"'
        headers = {"ETag": etag, "Cache-Control": THUMB_CACHE}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=HTTPStatus.NOT_MODIFIED, headers=headers)
        try:
            data = browse.thumbnail(store, overlay)
        except NotFound:
            raise HTTPException(HTTPStatus.NOT_FOUND, "the overlay is not in the store") from None
        except TransientError as exc:
            raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from exc
        return Response(data, media_type="image/jpeg", headers=headers)

    @router.get("/image/{segmentation_id}", response_class=HTMLResponse, name="image")
    def image(
        segmentation_id: int, request: Request, query: Annotated[GalleryQuery, Depends(gallery_query)]
    ) -> HTMLResponse:
        context = _image_context(index, segmentation_id, query.compare_to)
        previous, following = browse.neighbours(index, query.filters(), query.sort, segmentation_id)
        rest = carried(request)
        # After a grade, on to the next image of the same list (or back here at its end).
        next_url = f"/image/{following if following is not None else segmentation_id}?{rest}"
        return render(
            request,
            "image.html",
            **context,
            previous=previous,
            following=following,
            carried=rest,
            mode="browse",
            next_url=next_url,
        )

    @router.get("/queue", response_class=HTMLResponse)
    def review_queue(request: Request, order: str = "worst", dataset: str | None = None, seed: int = 0) -> HTMLResponse:
        reviewer = request.cookies.get(REVIEWER_COOKIE, "")
        settings = {"order": order, "dataset": dataset or "", "seed": seed}
        if order not in reviews.QUEUE_ORDERS:
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, "order must be worst or random")
        if not reviewer:
            return render(request, "queue.html", queue=settings, datasets=browse.datasets(index))
        found = queue.next(reviews.QueueRequest(reviewer, order, dataset or None, seed))
        if found is None:
            return render(request, "queue.html", queue=settings, done=True, datasets=browse.datasets(index))
        here = "/queue?" + urlencode({k: v for k, v in settings.items() if v != ""})
        return render(
            request,
            "image.html",
            **_image_context(index, found),
            previous=None,
            following=None,
            carried="",
            mode="queue",
            next_url=here,
            queue=settings,
        )

    @router.post("/review/{segmentation_id}")
    def grade(
        segmentation_id: int,
        request: Request,
        reviewer: Annotated[str, Form()],
        overall: Annotated[str, Form()] = "",
        right_lung: Annotated[str, Form()] = "",
        left_lung: Annotated[str, Form()] = "",
        heart: Annotated[str, Form()] = "",
        comment: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
        next_url: Annotated[str, Form(alias="next")] = "/",
    ) -> Response:
        # A cookie rides along on requests other sites make; the form value they cannot know.
        if token is not None and not same(bearer(request), token) and not same(csrf, csrf_value(token)):
            raise HTTPException(HTTPStatus.FORBIDDEN, "a write needs the page's form token")
        grades = {"overall": overall, "right_lung": right_lung, "left_lung": left_lung, "heart": heart}
        try:
            reviews.add_review(index, segmentation_id, reviewer, _grades(grades), comment)
        except reviews.InvalidGrade as exc:
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        response = RedirectResponse(_local(next_url), status_code=HTTPStatus.SEE_OTHER)
        response.headers.append("Set-Cookie", _cookie(request, REVIEWER_COOKIE, reviewer.strip(), http_only=False))
        return response

    @router.post("/queue/reviewer")
    def set_reviewer(
        request: Request,
        reviewer: Annotated[str, Form(max_length=reviews.MAX_REVIEWER)],
        next_url: Annotated[str, Form(alias="next")] = "/queue",
    ) -> Response:
        response = RedirectResponse(_local(next_url), status_code=HTTPStatus.SEE_OTHER)
        response.headers.append("Set-Cookie", _cookie(request, REVIEWER_COOKIE, reviewer.strip(), http_only=False))
        return response

    @router.get("/problems", response_class=HTMLResponse)
    def problems(
        request: Request,
        status: ImageStatus = ImageStatus.REFUSED,
        code: str | None = None,
        dataset: str | None = None,
        after: int | None = None,
    ) -> HTMLResponse:
        if status not in browse.PROBLEM_STATUSES:
            raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, "status must be refused or failed")
        rows = browse.problems(index, status, dataset or None, code or None, limit=101, after=after)
        return render(
            request,
            "problems.html",
            rows=rows[:100],
            status=status.value,
            code=code or "",
            dataset=dataset or "",
            codes=browse.problem_codes(index, status),
            next_after=rows[99]["id"] if len(rows) > 100 else None,
            carried=carried(request),
        )

    @router.get("/datasets", response_class=HTMLResponse)
    def datasets(request: Request) -> HTMLResponse:
        return render(request, "datasets.html", datasets=browse.datasets(index))

    @router.get("/datasets/{name}", response_class=HTMLResponse)
    def dataset(request: Request, name: str) -> HTMLResponse:
        from chexmask.storage.stats import compute_stats

        groups = compute_stats(index, dataset=name)
        return render(
            request,
            "dataset.html",
            name=name,
            groups=groups,
            flags=browse.flag_counts(index, name),
            statuses=[s for s in ImageStatus],
        )

    @router.get("/datasets/{name}/dice.png")
    def dice_png(name: str) -> Response:
        return _png(plots.dice_histograms(browse.dice_values(index, name)))

    @router.get("/datasets/{name}/throughput.png")
    def throughput_png(name: str) -> Response:
        buckets, unit = browse.throughput(index, name)
        return _png(plots.throughput(buckets, unit))

    @router.get("/agreement", response_class=HTMLResponse)
    def agreement(request: Request, dataset: str | None = None) -> HTMLResponse:
        return render(
            request,
            "agreement.html",
            result=reviews.agreement(index, dataset or None),
            dataset=dataset or "",
            datasets=browse.datasets(index),
        )

    @router.get("/agreement.png")
    def agreement_png(dataset: str | None = None) -> Response:
        return _png(reviews.plot_agreement(reviews.agreement(index, dataset or None)))

    @router.get("/reviews.csv")
    def reviews_csv(dataset: str | None = None) -> StreamingResponse:
        rows = reviews.export_rows(index, dataset or None)
        return StreamingResponse(
            _csv_lines(rows),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="reviews.csv"'},
        )

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def _overlay_key(index: MaskIndex, segmentation_id: int) -> str:
    segmentation = index.get_segmentation(segmentation_id)
    if segmentation is None or "overlay" not in segmentation.object_keys:
        raise HTTPException(HTTPStatus.NOT_FOUND, "no overlay for this segmentation")
    return segmentation.object_keys["overlay"]


def _image_context(index: MaskIndex, segmentation_id: int, compare_to: str | None = None) -> dict[str, Any]:
    segmentation = index.get_segmentation(segmentation_id)
    if segmentation is None:
        raise HTTPException(HTTPStatus.NOT_FOUND, "no such segmentation")
    image = index.get_image(segmentation.image_id)
    points = segmentation.landmarks_1024
    organs = {code: points[rows] for code, rows in ORGAN_ROWS.items()}
    agreements = browse.agreements(index, segmentation_id)
    # The outline drawn beside ours: the model of the gallery's compare filter, else the first compared.
    shown = next((a for a in agreements if a["other_model"] == compare_to), agreements[0] if agreements else None)
    other = _other_landmarks(segmentation, shown) if shown is not None else None
    outlined = None if shown is None or other is None else shown["other_model"]
    return {
        "seg": segmentation,
        "img": image,
        "organs_json": json.dumps(organs),
        "agreements": agreements,
        "outlined": outlined,
        "other_json": "" if other is None else json.dumps({c: other[rows].tolist() for c, rows in ORGAN_ROWS.items()}),
        "reviews": reviews.reviews_of(index, segmentation_id),
        "grade_columns": GRADE_COLUMNS,
    }


def _other_landmarks(ours: Segmentation, agreement: dict[str, Any]) -> np.ndarray | None:
    """The other mask's landmarks in the 1024 frame, to draw over our picture.

    An import at the original resolution holds no 1024 landmarks: they are mapped
    with the frame of our own mask of the image (scale and padding per axis, fitted
    on our landmarks in both frames). None when neither is possible.
    """
    if len(agreement["landmarks_1024"]) == N_LANDMARKS:
        return np.asarray(agreement["landmarks_1024"], dtype=float)
    original = np.asarray(agreement["landmarks_original"], dtype=float)
    ours_1024, ours_original = (np.asarray(p, dtype=float) for p in (ours.landmarks_1024, ours.landmarks_original))
    if not len(original) == len(ours_1024) == len(ours_original) == N_LANDMARKS:
        return None
    mapped = np.empty_like(original)
    for axis in (0, 1):
        # original = scale * frame + shift on each axis
        scale, shift = np.polyfit(ours_1024[:, axis], ours_original[:, axis], 1)
        if abs(scale) < 1e-9:
            return None
        mapped[:, axis] = (original[:, axis] - shift) / scale
    return np.round(mapped, 1)


def _grades(form: dict[str, str]) -> dict[str, int | None]:
    grades: dict[str, int | None] = {}
    for name, text in form.items():
        text = text.strip()
        if text and not text.isdigit():
            raise reviews.InvalidGrade(f"{name} must be a whole number from 1 to 5, not {text!r}")
        grades[name] = int(text) if text else None
    return grades


def _local(url: str) -> str:
    """Only a path on this site: a form must not send the browser elsewhere."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"


def _cookie(request: Request, name: str, value: str, http_only: bool) -> str:
    from http.cookies import SimpleCookie

    cookie: SimpleCookie = SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel.update({"path": "/", "max-age": str(COOKIE_MAX_AGE), "samesite": "Strict"})
    morsel["httponly"] = http_only
    morsel["secure"] = request.url.scheme == "https"
    return morsel.OutputString()


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": FIGURE_CACHE})


def _csv_lines(rows: Any) -> Any:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=reviews.EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
        if buffer.tell() > 1 << 16:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
