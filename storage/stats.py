"""How good is the mask set: per dataset and release, image counts by status and
Dice RCA (Mean)/(Max) summaries, plus a histogram figure like the CheXmask paper's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chexmask.quality import GOOD_DICE
from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import Segmentation, SourceImage
from chexmask.storage.queries import QueryFilters

QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)


@dataclass(frozen=True)
class DiceSummary:
    n: int
    mean: float
    q05: float
    q25: float
    q50: float
    q75: float
    q95: float
    frac_good: float  # fraction >= GOOD_DICE

    @classmethod
    def of(cls, values: np.ndarray) -> DiceSummary | None:
        """Summary of the non-missing values; ``None`` when there are none."""
        values = values[~np.isnan(values)]
        if values.size == 0:
            return None
        q05, q25, q50, q75, q95 = (float(q) for q in np.quantile(values, QUANTILES))
        return cls(
            n=int(values.size),
            mean=float(values.mean()),
            q05=q05,
            q25=q25,
            q50=q50,
            q75=q75,
            q95=q95,
            frac_good=float(np.mean(values >= GOOD_DICE)),
        )


@dataclass(frozen=True)
class GroupStats:
    dataset: str
    release: str | None
    status_counts: dict[ImageStatus, int]
    segmentations: int
    dice_mean: DiceSummary | None
    dice_max: DiceSummary | None
    dice_mean_values: np.ndarray = field(repr=False, compare=False)

    @property
    def images(self) -> int:
        return sum(self.status_counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "release": self.release,
            "images": self.images,
            "status_counts": {s.value: self.status_counts.get(s, 0) for s in ImageStatus},
            "segmentations": self.segmentations,
            "dice_rca_mean": None if self.dice_mean is None else vars(self.dice_mean),
            "dice_rca_max": None if self.dice_max is None else vars(self.dice_max),
        }


def compute_stats(
    index: MaskIndex,
    *,
    dataset: str | None = None,
    release: str | None = None,
    model: str | None = None,
) -> list[GroupStats]:
    """Stats for every (dataset, release), sorted. Dice values come from the
    segmentations of ``model``, or of all models when it is ``None``."""
    images = QueryFilters(dataset=dataset, release=release)
    counts = index.status_counts(images)
    dice = _dice_values(index, QueryFilters(dataset=dataset, release=release, model=model))
    groups = []
    for key in sorted(counts.keys() | dice.keys(), key=lambda k: (k[0], k[1] or "")):
        means, maxes = dice.get(key, (np.empty(0), np.empty(0)))
        groups.append(
            GroupStats(
                dataset=key[0],
                release=key[1],
                status_counts=counts.get(key, {}),
                segmentations=int(means.size),
                dice_mean=DiceSummary.of(means),
                dice_max=DiceSummary.of(maxes),
                dice_mean_values=means,
            )
        )
    return groups


def _dice_values(
    index: MaskIndex, filters: QueryFilters
) -> dict[tuple[str, str | None], tuple[np.ndarray, np.ndarray]]:
    statement = index.select_segmentations(
        filters,
        SourceImage.dataset,
        SourceImage.release,
        Segmentation.dice_rca_mean,
        Segmentation.dice_rca_max,
    )
    values: dict[tuple[str, str | None], tuple[list[float], list[float]]] = {}
    nan = float("nan")
    for dataset, release, mean, max_ in index.stream(statement, batch_size=20_000):
        means, maxes = values.setdefault((dataset, release), ([], []))
        means.append(nan if mean is None else mean)
        maxes.append(nan if max_ is None else max_)
    return {key: (np.array(m, dtype=float), np.array(x, dtype=float)) for key, (m, x) in values.items()}


def plot_dice_histograms(groups: list[GroupStats], path: str | os.PathLike[str]) -> None:
    """One histogram of Dice RCA (Mean) per dataset (releases pooled), stacked."""
    # The Agg canvas directly: no pyplot, so no global backend switch in a library.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_dataset: dict[str, list[np.ndarray]] = {}
    for group in groups:
        by_dataset.setdefault(group.dataset, []).append(group.dice_mean_values)
    datasets = sorted(by_dataset) or ["(no data)"]
    figure = Figure(figsize=(7, 1.9 * len(datasets) + 0.6), layout="constrained")
    axes = figure.subplots(len(datasets), 1, sharex=True, squeeze=False)[:, 0]
    bins = np.linspace(0, 1, 51)
    for ax, name in zip(axes, datasets, strict=True):
        values = np.concatenate(by_dataset.get(name, [np.empty(0)]))
        values = values[~np.isnan(values)]
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
        ax.axvline(GOOD_DICE, color="tab:red", linestyle="--", linewidth=1)
        good = f", {np.mean(values >= GOOD_DICE):.1%} >= {GOOD_DICE}" if values.size else ""
        ax.set_title(f"{name} (n={values.size}{good})", fontsize=10)
        ax.set_ylabel("images")
    axes[-1].set_xlabel("Dice RCA (Mean)")
    axes[-1].set_xlim(0, 1)
    FigureCanvasAgg(figure).print_png(os.fspath(path))
