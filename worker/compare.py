"""Compare two models' masks of the same images: per-organ Dice and Hausdorff
distance, and how well their Dice RCA values agree.

Images are paired by dataset and dataset image id, which is how an imported
(published) row and our segmentation of the real file find each other. Masks
are decoded from the stored RLE in the original frame when both rows hold it,
else at 1024 (an imported 1024-level file has no original frame).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from scipy.spatial.distance import directed_hausdorff
from scipy.stats import pearsonr, spearmanr
from sqlalchemy.orm import aliased

from chexmask.anatomy import ORGANS
from chexmask.datasets import canonical
from chexmask.storage.comparisons import Agreement, save_comparisons
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import IMPORT_PIPELINE_1024, Segmentation, SourceImage
from chexmask.worker.metrics import dice
from chexmask.worker.postprocess import rle_decode


@dataclass(frozen=True)
class Pair:
    image_id: str
    segmentations: tuple[int, int]  # ids of model A's and model B's segmentation
    frame: str  # "original" or "1024"
    dice: dict[str, float]  # by organ
    hausdorff: dict[str, float]  # pixels of the frame, by organ
    rca_mean: tuple[float | None, float | None]  # (model A, model B)


@dataclass
class Comparison:
    models: tuple[str, str]
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image id, why not compared)

    def organ_summary(self) -> dict[str, dict[str, float]]:
        """Per organ: mean and median Dice and Hausdorff over the pairs."""
        summary = {}
        for organ in ORGANS:
            d = np.array([p.dice[organ] for p in self.pairs])
            h = np.array([p.hausdorff[organ] for p in self.pairs])
            finite = h[np.isfinite(h)]
            summary[organ] = {
                "dice_mean": float(d.mean()) if d.size else float("nan"),
                "dice_median": float(np.median(d)) if d.size else float("nan"),
                "hausdorff_mean": float(finite.mean()) if finite.size else float("nan"),
                "hausdorff_median": float(np.median(finite)) if finite.size else float("nan"),
            }
        return summary

    def rca_agreement(self) -> dict[str, float | int]:
        """Pearson, Spearman and mean absolute difference of Dice RCA (Mean) where both have it."""
        both = [(a, b) for a, b in (p.rca_mean for p in self.pairs) if a is not None and b is not None]
        result: dict[str, float | int] = {"n": len(both)}
        if not both:
            return result
        a, b = (np.array(v, dtype=float) for v in zip(*both, strict=True))
        result["mae"] = float(np.abs(a - b).mean())
        if len(both) >= 2 and a.std() > 0 and b.std() > 0:  # undefined for constant inputs
            result["pearson"] = float(pearsonr(a, b)[0])
            result["spearman"] = float(spearmanr(a, b)[0])
        return result


def boundary_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between two masks' pixel sets; 0 when both are
    empty, infinite when only one is. The boundary pixels suffice (a mask's farthest
    point from another set lies on its boundary) and keep large masks cheap."""
    pa, pb = _boundary(a), _boundary(b)
    if len(pa) == 0 or len(pb) == 0:
        return 0.0 if len(pa) == len(pb) else float("inf")
    return float(max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0]))


def _boundary(mask: np.ndarray) -> np.ndarray:
    inside = mask.astype(bool)
    interior = inside.copy()
    interior[1:-1, 1:-1] &= inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    interior[[0, -1], :] = False
    interior[:, [0, -1]] = False
    return np.argwhere(inside & ~interior)


def compare(
    index: MaskIndex, dataset: str, model_a: str, model_b: str, limit: int | None = None, store: bool = True
) -> Comparison:
    """Compare ``model_a`` with ``model_b`` on every image of ``dataset`` both have segmented;
    ``store``: keep each image's result in the index (replacing an earlier one), which is
    what query filters on agreement read."""
    result = Comparison((model_a, model_b))
    for row in _pairs(index, dataset, model_a, model_b, limit):
        try:
            result.pairs.append(_compare_row(row))
        except ValueError as exc:
            result.skipped.append((row[2], str(exc)))
    if store:
        save_comparisons(
            index,
            (Agreement(p.segmentations, (model_a, model_b), p.frame, p.dice, p.hausdorff) for p in result.pairs),
        )
    return result


def _pairs(index: MaskIndex, dataset: str, model_a: str, model_b: str, limit: int | None) -> Iterator[sa.Row]:
    seg_a, seg_b = aliased(Segmentation), aliased(Segmentation)
    image_a, image_b = aliased(SourceImage), aliased(SourceImage)
    columns = [seg_a.id, seg_b.id, image_a.dataset_image_id]
    for seg in (seg_a, seg_b):
        columns += [
            seg.pipeline_version,
            seg.height,
            seg.width,
            seg.dice_rca_mean,
            *(getattr(seg, f"rle_{o}") for o in ORGANS),
            *(getattr(seg, f"rle_{o}_1024") for o in ORGANS),
        ]
    name = canonical(dataset)
    statement = (
        sa.select(*columns)
        .select_from(seg_a)
        .join(image_a, seg_a.image_id == image_a.id)
        .join(
            image_b, sa.and_(image_b.dataset_image_id == image_a.dataset_image_id, image_b.dataset == image_a.dataset)
        )
        .join(seg_b, seg_b.image_id == image_b.id)
        .where(
            seg_a.dataset == name,
            seg_a.model_version == model_a,
            seg_b.model_version == model_b,
            seg_a.is_current.is_(True),
            seg_b.is_current.is_(True),
        )
        .order_by(seg_a.id)
        .limit(limit)
    )
    yield from index.stream(statement, batch_size=100)


def _compare_row(row: sa.Row) -> Pair:
    id_a, id_b, image_id, *rest = row
    half = len(rest) // 2
    a, b = rest[:half], rest[half:]
    # The original frame when both rows hold it; a 1024 import forces the 1024 frame.
    at_1024 = IMPORT_PIPELINE_1024 in (a[0], b[0])
    if not at_1024 and (a[1], a[2]) != (b[1], b[2]):
        # e.g. the official MIMIC back-projection's transposed canvas (SPEC 9.4)
        raise ValueError(f"the rows disagree on the image size ({a[1]}x{a[2]} and {b[1]}x{b[2]})")
    masks = [_masks(side, at_1024) for side in (a, b)]
    return Pair(
        image_id=image_id,
        segmentations=(id_a, id_b),
        frame="1024" if at_1024 else "original",
        dice={o: dice(masks[0][o], masks[1][o]) for o in ORGANS},
        hausdorff={o: boundary_hausdorff(masks[0][o], masks[1][o]) for o in ORGANS},
        rca_mean=(a[3], b[3]),
    )


def _masks(side: list, at_1024: bool) -> dict[str, np.ndarray]:
    _, height, width, _, *rle = side
    texts = rle[len(ORGANS) :] if at_1024 else rle[: len(ORGANS)]
    size = (1024, 1024) if at_1024 else (height, width)
    return {organ: rle_decode(text, *size) == 255 for organ, text in zip(ORGANS, texts, strict=True)}


def plot_comparison(result: Comparison, out: str | Path) -> None:
    """Histograms of per-organ Dice between the models, and their Dice RCA (Mean) scatter."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display
    axes = fig.subplots(1, 2)
    for organ in ORGANS:
        axes[0].hist([p.dice[organ] for p in result.pairs], bins=40, range=(0, 1), alpha=0.5, label=organ)
    axes[0].set(xlabel=f"Dice {result.models[0]} vs {result.models[1]}", ylabel="images")
    axes[0].legend()
    both = [(a, b) for a, b in (p.rca_mean for p in result.pairs) if a is not None and b is not None]
    if both:
        axes[1].scatter(*zip(*both, strict=True), s=4)
    axes[1].set(
        xlabel=f"Dice RCA (Mean) {result.models[0]}",
        ylabel=f"Dice RCA (Mean) {result.models[1]}",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
