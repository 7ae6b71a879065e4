"""The per-dataset quality report the CheXmask paper gives for each database, as one
self-contained HTML file (``chexmask stats --report FILE.html``): counts by status,
Dice RCA (Mean) and (Max) histograms overall and per organ, the share at or above
0.7, the QC flags, the refusal codes, and the worst masks with their overlays.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from chexmask.datasets import canonical
from chexmask.errors import NotFound
from chexmask.quality import GOOD_DICE
from chexmask.status import ImageStatus
from chexmask.storage import browse, plots
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import Segmentation
from chexmask.storage.objectstore import ObjectStore
from chexmask.storage.queries import QueryFilters

WORST = 8  # masks shown per dataset, lowest Dice RCA (Mean) first
MAX_ORGAN_COLUMNS = {
    "overall": Segmentation.dice_rca_max,
    "right lung": Segmentation.dice_rca_max_rl,
    "left lung": Segmentation.dice_rca_max_ll,
    "heart": Segmentation.dice_rca_max_h,
}


def write_report(index: MaskIndex, store: ObjectStore, out: str | os.PathLike[str], dataset: str | None = None) -> int:
    """Write the report of ``dataset`` (or every dataset) to ``out``; how many datasets it covers."""
    names = [canonical(dataset)] if dataset else browse.datasets(index)
    sections = [_section(index, store, name) for name in names]
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(sections) or "<p>The index holds no images yet.</p>"
    Path(out).write_text(_PAGE.format(made=made, body=body), encoding="utf-8")
    return len(names)


def _section(index: MaskIndex, store: ObjectStore, dataset: str) -> str:
    counts: dict[str, int] = {}
    for by_status in index.status_counts(QueryFilters(dataset=dataset)).values():
        for status, n in by_status.items():
            counts[status.value] = counts.get(status.value, 0) + n
    means = browse.dice_values(index, dataset)
    maxes = _max_values(index, dataset)
    parts = [
        f"<h2>{html.escape(dataset)}</h2>",
        _table(["status", "images"], [[s.value, counts.get(s.value, 0)] for s in ImageStatus]),
        _table(["Dice RCA", "masks", "mean", f"share >= {GOOD_DICE}"], _summary_rows(means, maxes)),
        _image(plots.dice_histograms(means, "Dice RCA (Mean)"), f"Dice RCA (Mean) histograms of {dataset}"),
        _image(plots.dice_histograms(maxes, "Dice RCA (Max)"), f"Dice RCA (Max) histograms of {dataset}"),
        "<h3>QC flags</h3>",
        _table(["flag", "masks"], browse.flag_counts(index, dataset).most_common()) or "<p>none</p>",
        "<h3>Refused and failed images</h3>",
        _table(["status", "code", "images"], _problem_rows(index, dataset)) or "<p>none</p>",
        "<h3>Worst masks</h3>",
        _worst(index, store, dataset),
    ]
    return "<section>\n" + "\n".join(parts) + "\n</section>"


def _max_values(index: MaskIndex, dataset: str) -> dict[str, np.ndarray]:
    statement = index.select_segmentations(QueryFilters(dataset=dataset), *MAX_ORGAN_COLUMNS.values())
    rows = [[np.nan if v is None else v for v in row] for row in index.stream(statement, batch_size=20_000)]
    columns = np.array(rows, dtype=float).reshape(-1, len(MAX_ORGAN_COLUMNS)).T
    return dict(zip(MAX_ORGAN_COLUMNS, columns, strict=True))


def _summary_rows(means: dict[str, np.ndarray], maxes: dict[str, np.ndarray]) -> list[list[object]]:
    rows: list[list[object]] = []
    for kind, series in (("Mean", means), ("Max", maxes)):
        for organ, values in series.items():
            scored = values[~np.isnan(values)]
            share = f"{np.mean(scored >= GOOD_DICE):.1%}" if scored.size else "-"
            rows.append([f"{kind}, {organ}", scored.size, f"{scored.mean():.3f}" if scored.size else "-", share])
    return rows


def _problem_rows(index: MaskIndex, dataset: str) -> list[list[object]]:
    rows: list[list[object]] = []
    for status in (ImageStatus.REFUSED, ImageStatus.FAILED):
        codes: dict[str, int] = {}
        for image in browse.problems(index, status, dataset=dataset, limit=100_000):
            code = image.get("refusal_code") or ""
            codes[code] = codes.get(code, 0) + 1
        rows += [[status.value, code or "(none)", n] for code, n in sorted(codes.items())]
    return rows


def _worst(index: MaskIndex, store: ObjectStore, dataset: str) -> str:
    rows = index.query(QueryFilters(dataset=dataset, min_dice_mean=0.0), sort="dice_rca_mean", limit=WORST)
    if not rows:
        return "<p>no scored masks</p>"
    cards = []
    for row in rows:
        segmentation = index.get_segmentation(row.id)
        overlay = segmentation.object_keys.get("overlay") if segmentation else None
        try:
            picture = _image(browse.thumbnail(store, overlay), f"overlay of {row.dataset_image_id}") if overlay else ""
        except NotFound:
            picture = "<p>(overlay missing)</p>"
        flags = ", ".join(row.qc_flags or []) or "no flags"
        caption = f"{html.escape(row.dataset_image_id or row.uri)}: Dice RCA mean {row.dice_rca_mean:.3f}, {flags}"
        cards.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    return '<div class="cards">' + "".join(cards) + "</div>"


def _table(header: list[str], rows: Iterable[Iterable[object]]) -> str:
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    if not body:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(data: bytes, alt: str) -> str:
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg"
    return f'<img alt="{html.escape(alt)}" src="data:image/{kind};base64,{base64.b64encode(data).decode()}">'


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chexmask-stream quality report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #111; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1rem; }}
td, th {{ border: 1px solid #999; padding: 0.2rem 0.6rem; text-align: left; }}
img {{ max-width: 100%; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
figure {{ width: 256px; margin: 0; }}
figcaption {{ font-size: 0.8rem; }}
</style></head><body>
<h1>Quality report</h1>
<p>Made {made}. Dice RCA estimates each mask's Dice by Reverse Classification Accuracy;
CheXmask counts a mask with Dice RCA (Mean) at or above 0.7 as usable.</p>
{body}
</body></html>
"""
