"""Expert review of the masks: grades (1-5, overall and per organ), the queue that
serves masks to grade, the CSV export, and how grades agree with Dice RCA and
with each other.

5 means no correction needed, 1 unusable. Several reviewers may grade a mask;
one reviewer may grade it again (every grade is kept, the newest counts in the
agreement numbers).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import combinations
from threading import Lock
from typing import Any

import numpy as np
import sqlalchemy as sa

from chexmask.datasets import canonical
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import GRADE_COLUMNS, Review, Segmentation, SourceImage, utcnow
from chexmask.storage.queries import QueryFilters

MAX_REVIEWER = 128
MAX_COMMENT = 4000
QUEUE_ORDERS = ("worst", "random")
# Per-organ Dice RCA (Mean) column that each organ grade is compared with.
ORGAN_DICE = {
    "overall": "dice_rca_mean",
    "right_lung": "dice_rca_mean_rl",
    "left_lung": "dice_rca_mean_ll",
    "heart": "dice_rca_mean_h",
}
EXPORT_COLUMNS = (
    "review_id",
    "segmentation_id",
    "dataset",
    "dataset_image_id",
    "uri",
    "model_version",
    "reviewer",
    *GRADE_COLUMNS,
    "comment",
    "created_at",
    "dice_rca_mean",
    "dice_rca_max",
    "dice_rca_mean_rl",
    "dice_rca_mean_ll",
    "dice_rca_mean_h",
)


class InvalidGrade(ValueError):
    """A review that cannot be stored: a grade outside 1-5, no reviewer, no such mask."""


def add_review(
    index: MaskIndex,
    segmentation_id: int,
    reviewer: str,
    grades: Mapping[str, int | None],
    comment: str | None = None,
) -> Review:
    """Store one reviewer's grades; ``grades["overall"]`` is required, organs optional."""
    values = _checked(reviewer, grades, comment)
    with index.engine.begin() as connection:
        if connection.execute(sa.select(Segmentation.id).where(Segmentation.id == segmentation_id)).first() is None:
            raise InvalidGrade(f"no segmentation with id {segmentation_id}")
        row = connection.execute(
            sa.insert(Review)
            .values(segmentation_id=segmentation_id, created_at=utcnow(), **values)
            .returning(*Review.__table__.columns)
        ).one()
    return Review(**row._mapping)


def _checked(reviewer: str, grades: Mapping[str, int | None], comment: str | None) -> dict[str, Any]:
    reviewer = (reviewer or "").strip()
    if not reviewer or len(reviewer) > MAX_REVIEWER:
        raise InvalidGrade(f"a reviewer name of 1-{MAX_REVIEWER} characters is required")
    unknown = set(grades) - set(GRADE_COLUMNS)
    if unknown:
        raise InvalidGrade(f"unknown grade(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {"reviewer": reviewer}
    for name in GRADE_COLUMNS:
        grade = grades.get(name)
        if grade is None and name == "overall":
            raise InvalidGrade("an overall grade is required")
        if grade is not None and (isinstance(grade, bool) or grade not in range(1, 6)):
            raise InvalidGrade(f"{name} must be a whole number from 1 to 5, not {grade!r}")
        values[name] = grade
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT:
        raise InvalidGrade(f"a comment has at most {MAX_COMMENT} characters")
    values["comment"] = comment or None
    return values


def reviews_of(index: MaskIndex, segmentation_id: int) -> list[Review]:
    """The grades of one mask, oldest first."""
    statement = sa.select(Review).where(Review.segmentation_id == segmentation_id).order_by(Review.id)
    with index.engine.connect() as connection:
        return [Review(**row._mapping) for row in connection.execute(statement)]


def reviewed_condition(reviewer: str | None = None) -> Any:
    """SQL: the segmentation has a review (by ``reviewer`` when given)."""
    condition = sa.exists().where(Review.segmentation_id == Segmentation.id)
    return condition.where(Review.reviewer == reviewer) if reviewer else condition


# --- the queue ------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueRequest:
    reviewer: str
    order: str = "worst"  # "worst": lowest Dice RCA (Mean) first; "random": a seeded sample
    dataset: str | None = None
    seed: int = 0


class ReviewQueue:
    """Serves the next mask a reviewer has not graded, in the chosen order.

    The random order is a seeded shuffle of the dataset's segmentation ids: every
    mask is equally likely at every position (an unbiased sample, reproducible from
    the seed). The shuffle is made once per (dataset, seed) and kept in memory.
    """

    CACHED = 8

    def __init__(self, index: MaskIndex):
        self.index = index
        self._orders: OrderedDict[tuple[str | None, int], list[int]] = OrderedDict()
        self._lock = Lock()

    def next(self, request: QueueRequest) -> int | None:
        if request.order not in QUEUE_ORDERS:
            raise ValueError(f"queue order must be one of {', '.join(QUEUE_ORDERS)}")
        if request.order == "worst":
            return self._worst(request)
        return self._random(request)

    def _worst(self, request: QueueRequest) -> int | None:
        statement = (
            self.index.select_segmentations(QueryFilters(dataset=request.dataset), Segmentation.id)
            .where(~reviewed_condition(request.reviewer))
            .order_by(Segmentation.dice_rca_mean.asc().nulls_first(), Segmentation.id.asc())
            .limit(1)
        )
        with self.index.engine.connect() as connection:
            return connection.execute(statement).scalar()

    def _random(self, request: QueueRequest) -> int | None:
        ids = self._shuffled(request.dataset, request.seed)
        # Checked in slices: one query per 500 candidates, not one per mask.
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            done = self._reviewed_by(request.reviewer, chunk)
            for segmentation_id in chunk:
                if segmentation_id not in done:
                    return segmentation_id
        return None

    def _reviewed_by(self, reviewer: str, ids: list[int]) -> set[int]:
        statement = sa.select(Review.segmentation_id).where(
            Review.reviewer == reviewer, Review.segmentation_id.in_(ids)
        )
        with self.index.engine.connect() as connection:
            return set(connection.execute(statement).scalars())

    def _shuffled(self, dataset: str | None, seed: int) -> list[int]:
        key = (canonical(dataset) if dataset else None, seed)
        with self._lock:
            if key in self._orders:
                self._orders.move_to_end(key)
                return self._orders[key]
        statement = self.index.select_segmentations(QueryFilters(dataset=dataset), Segmentation.id).order_by(
            Segmentation.id
        )
        with self.index.engine.connect() as connection:
            ids = list(connection.execute(statement).scalars())
        random.Random(seed).shuffle(ids)
        with self._lock:
            self._orders[key] = ids
            while len(self._orders) > self.CACHED:
                self._orders.popitem(last=False)
        return ids


# --- export and agreement -------------------------------------------------------------


def export_statement(index: MaskIndex) -> sa.Select:
    """Every review with its mask's identity and Dice RCA, oldest first."""
    return (
        sa.select(
            Review.id.label("review_id"),
            Review.segmentation_id,
            SourceImage.dataset,
            SourceImage.dataset_image_id,
            SourceImage.uri,
            Segmentation.model_version,
            Review.reviewer,
            *(getattr(Review, g) for g in GRADE_COLUMNS),
            Review.comment,
            Review.created_at,
            Segmentation.dice_rca_mean,
            Segmentation.dice_rca_max,
            Segmentation.dice_rca_mean_rl,
            Segmentation.dice_rca_mean_ll,
            Segmentation.dice_rca_mean_h,
        )
        .select_from(Review)
        .join(Segmentation, Review.segmentation_id == Segmentation.id)
        .join(SourceImage, Segmentation.image_id == SourceImage.id)
        .order_by(Review.id)
    )


def export_rows(index: MaskIndex, dataset: str | None = None) -> Iterator[dict[str, Any]]:
    statement = export_statement(index)
    if dataset:
        statement = statement.where(Segmentation.dataset == canonical(dataset))
    for row in index.stream(statement):
        record = dict(row._mapping)
        created = record["created_at"]
        record["created_at"] = created.isoformat() if isinstance(created, datetime) else created
        yield record


@dataclass(frozen=True)
class Correlation:
    grade: str
    dice: str
    n: int
    spearman: float | None
    p_value: float | None


@dataclass(frozen=True)
class ReviewerPair:
    first: str
    second: str
    n: int  # masks both graded
    exact: float | None  # share of equal overall grades
    within_one: float | None
    spearman: float | None


@dataclass(frozen=True)
class Agreement:
    reviews: int
    masks: int
    reviewers: int
    with_dice: list[Correlation]
    between_reviewers: list[ReviewerPair]
    points: list[tuple[float, int]]  # (Dice RCA Mean, overall grade), for the scatter plot


def agreement(index: MaskIndex, dataset: str | None = None) -> Agreement:
    """Spearman correlation of grades with Dice RCA, and agreement between reviewers
    (the newest grade of each reviewer for each mask)."""
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for row in export_rows(index, dataset):
        latest[(row["segmentation_id"], row["reviewer"])] = row  # ordered by id: newest wins
    rows = list(latest.values())
    correlations = [_correlation(rows, grade, dice) for grade, dice in ORGAN_DICE.items()]
    points = [(r["dice_rca_mean"], r["overall"]) for r in rows if r["dice_rca_mean"] is not None]
    return Agreement(
        reviews=len(rows),
        masks=len({r["segmentation_id"] for r in rows}),
        reviewers=len({r["reviewer"] for r in rows}),
        with_dice=correlations,
        between_reviewers=_pairs(rows),
        points=points,
    )


def _correlation(rows: list[dict[str, Any]], grade: str, dice: str) -> Correlation:
    pairs = [(r[grade], r[dice]) for r in rows if r[grade] is not None and r[dice] is not None]
    rho, p = _spearman([g for g, _ in pairs], [d for _, d in pairs])
    return Correlation(grade, dice, len(pairs), rho, p)


def _spearman(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    from scipy.stats import spearmanr

    # Undefined with under three pairs or when either side is constant.
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None, None
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def _pairs(rows: list[dict[str, Any]]) -> list[ReviewerPair]:
    by_reviewer: dict[str, dict[int, int]] = {}
    for r in rows:
        by_reviewer.setdefault(r["reviewer"], {})[r["segmentation_id"]] = r["overall"]
    pairs = []
    for first, second in combinations(sorted(by_reviewer), 2):
        shared = sorted(by_reviewer[first].keys() & by_reviewer[second].keys())
        a = np.array([by_reviewer[first][s] for s in shared])
        b = np.array([by_reviewer[second][s] for s in shared])
        n = len(shared)
        rho, _ = _spearman(a.tolist(), b.tolist())
        pairs.append(
            ReviewerPair(
                first,
                second,
                n,
                float(np.mean(a == b)) if n else None,
                float(np.mean(np.abs(a - b) <= 1)) if n else None,
                rho,
            )
        )
    return pairs


def plot_agreement(result: Agreement) -> bytes:
    """Scatter of overall grade against Dice RCA (Mean), as PNG bytes."""
    from chexmask.storage.plots import figure_png, new_figure

    figure, ax = new_figure(6, 4)
    if result.points:
        dice, grades = zip(*result.points, strict=True)
        # A little vertical jitter so equal grades do not hide each other.
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(grades))
        ax.scatter(dice, np.array(grades) + jitter, s=14, alpha=0.6, color="#1f5fa8")
    ax.set_xlim(0, 1)
    ax.set_ylim(0.5, 5.5)
    ax.set_yticks([1, 2, 3, 4, 5])
    ax.set_xlabel("Dice RCA (Mean)")
    ax.set_ylabel("overall grade (5 = no correction)")
    ax.set_title(f"{len(result.points)} graded masks")
    return figure_png(figure)
