"""One image from bytes to a CheXmask segmentation, and many images overlapped.

``prepare`` (decode + preprocess) and ``finish`` (landmarks -> masks, RLE,
overlay) run on the CPU beside the model; ``Segmenter.run`` keeps the model busy
by preparing the next images and finishing the previous ones in a thread pool
while the current batch is inferred.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from chexmask import PIPELINE_VERSION
from chexmask.errors import RefusedInput
from chexmask.worker.decode import decode_image
from chexmask.worker.model import HybridGNet, segment_batch
from chexmask.worker.postprocess import (
    csv_landmarks_original,
    landmarks_to_pixels,
    organ_masks,
    overlay_png,
    rle_encode,
    to_original,
)
from chexmask.worker.preprocess import Padding, preprocess
from chexmask.worker.weights import ModelInfo

log = logging.getLogger(__name__)

# CheXmask CSV names of the organs, in its column order.
CSV_ORGANS = {"Left Lung": "LL", "Right Lung": "RL", "Heart": "H"}
MASK_FILES = {"RL": "right_lung", "LL": "left_lung", "H": "heart"}


@dataclass
class Prepared:
    """An image decoded and brought to the model's 1024 frame."""

    name: str
    sha256: str
    size: int
    image: np.ndarray  # uint8 1024x1024
    padding: Padding
    source: dict  # decoder provenance and flags
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Segmentation:
    """Everything we keep about one segmented image."""

    prepared: Prepared
    landmarks: np.ndarray  # [120,2] float pixels of the 1024 frame
    latent: np.ndarray  # [64]
    model: ModelInfo
    landmarks_1024: np.ndarray = field(init=False)  # int, half-to-even rounding
    landmarks_original: np.ndarray = field(init=False)  # int, original frame
    rle: dict[str, str] = field(init=False)  # organ -> RLE at original resolution
    rle_1024: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        p = self.prepared.padding
        self.landmarks_1024 = landmarks_to_pixels(self.landmarks / 1024)
        self.landmarks_original = to_original(self.landmarks, p)
        self.masks_original = organ_masks(self.landmarks_original, p.height, p.width)
        self.masks_1024 = organ_masks(self.landmarks_1024, 1024, 1024)
        self.rle = {k: rle_encode(m) for k, m in self.masks_original.items()}
        self.rle_1024 = {k: rle_encode(m) for k, m in self.masks_1024.items()}

    @property
    def image_id(self) -> str:
        return Path(self.prepared.name).stem or self.prepared.sha256[:16]

    def record(self) -> dict:
        """The JSON record of ``chexmask segment`` and of the object store."""
        p = self.prepared
        return {
            "image_id": self.image_id,
            "sha256": p.sha256,
            "height": p.padding.height,
            "width": p.padding.width,
            "landmarks": np.round(self.landmarks, 4).tolist(),
            "landmarks_1024": self.landmarks_1024.tolist(),
            "landmarks_original": self.landmarks_original.tolist(),
            "latent": self.latent.astype(float).tolist(),
            "rle": {MASK_FILES[k]: v for k, v in self.rle.items()},
            "preprocessing": p.padding.to_dict(),
            "source": p.source,
            "model": self.model.to_dict(),
            "pipeline_version": PIPELINE_VERSION,
            "seconds": {k: round(v, 4) for k, v in p.seconds.items()},
        }

    def pictures(self) -> dict[str, bytes]:
        """PNG files: one mask per organ at original resolution and an overlay at 1024."""
        files = {f"{MASK_FILES[k]}.png": _png(m) for k, m in self.masks_original.items()}
        files["overlay.png"] = overlay_png(self.prepared.image, self.masks_1024, self.landmarks_1024)
        return files

    def csv_row(self) -> dict[str, object]:
        """A row of the CheXmask layout at original resolution (Dice columns empty until QC)."""
        row: dict[str, object] = {"Dice RCA (Mean)": "", "Dice RCA (Max)": ""}
        row["Landmarks"] = csv_landmarks_original(self.landmarks_original)
        row.update({col: self.rle[organ] for col, organ in CSV_ORGANS.items()})
        row.update({"Height": self.prepared.padding.height, "Width": self.prepared.padding.width})
        return row


def _png(mask: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", mask)
    if not ok:
        raise ValueError("OpenCV could not encode a mask as PNG")
    return data.tobytes()


def prepare(data: bytes, name: str = "") -> Prepared:
    """Decode and preprocess one upload. Raises ``RefusedInput`` for bad input."""
    started = time.perf_counter()
    decoded = decode_image(data, name=name)
    decoded_at = time.perf_counter()
    pre = preprocess(decoded)
    source = dict(decoded.provenance, format=decoded.format, flags=list(decoded.flags))
    return Prepared(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        image=pre.image,
        padding=pre.padding,
        source=source,
        seconds={"decode": decoded_at - started, "preprocess": time.perf_counter() - decoded_at},
    )


@dataclass
class Outcome:
    """What happened to one input: a segmentation, or a refusal with its reason."""

    name: str
    segmentation: Segmentation | None = None
    refusal: RefusedInput | None = None

    @property
    def ok(self) -> bool:
        return self.segmentation is not None

    def error_record(self) -> dict:
        assert self.refusal is not None
        return {"image_id": Path(self.name).stem, "name": self.name, "status": "refused",
                "code": self.refusal.code, "reason": self.refusal.message}


class Segmenter:
    """A loaded model plus the CPU work around it."""

    def __init__(self, model: HybridGNet, info: ModelInfo, batch_size: int = 4, threads: int | None = None):
        self.model, self.info = model, info
        self.batch_size = max(1, batch_size)
        self.threads = max(1, threads or os.cpu_count() or 1)

    def segment(self, items: list[Prepared]) -> list[Segmentation]:
        """Infer one batch and post-process it."""
        started = time.perf_counter()
        landmarks, latents = segment_batch(self.model, np.stack([p.image for p in items]))
        per_image = (time.perf_counter() - started) / len(items)
        for p in items:
            p.seconds["inference"] = per_image
        return [Segmentation(p, lm * 1024, z, self.info) for p, lm, z in zip(items, landmarks, latents)]

    def run(self, sources: Iterable[tuple[str, Callable[[], bytes]]],
            finish: Callable[[Outcome], None] | None = None) -> Iterator[Outcome]:
        """Segment ``(name, read)`` pairs, yielding outcomes in input order.

        Reading, decoding and preprocessing of upcoming images and ``finish``
        (e.g. writing files) of finished ones run in a thread pool while the
        model works; OpenCV, numpy and torch release the GIL for their heavy parts.
        """
        sources = list(sources)
        with ThreadPoolExecutor(self.threads) as pool:
            ahead = self.batch_size * 2
            pending: list[tuple[str, Future]] = []
            finishing: list[tuple[Outcome, Future | None]] = []
            queue = iter(sources)

            def top_up() -> None:
                for name, read in queue:
                    pending.append((name, pool.submit(lambda r=read, n=name: prepare(r(), n))))
                    if len(pending) >= ahead:
                        break

            top_up()
            while pending:
                batch, outcomes = [], []
                while pending and len(batch) < self.batch_size:
                    name, future = pending.pop(0)
                    try:
                        batch.append(future.result())
                        outcomes.append(None)
                    except RefusedInput as exc:
                        outcomes.append(Outcome(name, refusal=exc))
                top_up()
                segmented = iter(self.segment(batch)) if batch else iter(())
                for i, outcome in enumerate(outcomes):
                    if outcome is None:
                        seg = next(segmented)
                        outcomes[i] = Outcome(seg.prepared.name, segmentation=seg)
                for outcome in outcomes:
                    finishing.append((outcome, pool.submit(finish, outcome) if finish else None))
                while finishing and (finishing[0][1] is None or finishing[0][1].done() or len(finishing) > ahead):
                    outcome, future = finishing.pop(0)
                    if future is not None:
                        future.result()
                    yield outcome
            for outcome, future in finishing:
                if future is not None:
                    future.result()
                yield outcome


def write_outputs(outcome: Outcome, out: Path) -> None:
    """``<id>.json``, mask PNGs and overlay for a segmentation; ``<id>.error.json`` for a refusal."""
    if outcome.segmentation is None:
        stem = Path(outcome.name).stem
        (out / f"{stem}.error.json").write_text(json.dumps(outcome.error_record(), indent=1))
        return
    seg = outcome.segmentation
    (out / f"{seg.image_id}.json").write_text(json.dumps(seg.record()))
    for filename, data in seg.pictures().items():
        (out / f"{seg.image_id}_{filename}").write_bytes(data)

