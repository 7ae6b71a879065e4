"""One image from bytes to a CheXmask segmentation, and many images overlapped.

``prepare`` (decode + preprocess), the model and ``finish`` (landmarks -> masks,
RLE, overlay, files) of one image run one after the other in one thread. The
``Segmenter`` is the one engine for all callers: ``Segmenter.run`` keeps every
core busy by segmenting several images at once in its own threads (``chexmask
segment``), and ``Segmenter.segment`` serves callers that bring their own
threads (the embedded server, Celery workers), each image in the caller's thread.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from chexmask import PIPELINE_VERSION
from chexmask.anatomy import (
    CSV_MASK_COLUMNS,
    FRAME,
    LANDMARK_STD_COLUMN,
    ORGAN_NAMES,
    ORGAN_ROWS,
    UNCERTAINTY_COLUMNS,
)
from chexmask.errors import RefusedInput
from chexmask.worker.decode import DEFAULT_MAX_PIXELS, decode_image
from chexmask.worker.measure import Measurements, measure, spacing_of
from chexmask.worker.memory import keep_freed_memory
from chexmask.worker.model import HybridGNet, check_uncertainty, segment_batch, segment_with_uncertainty
from chexmask.worker.postprocess import (
    csv_landmarks_original,
    landmarks_to_pixels,
    organ_masks,
    overlay_jpeg,
    rle_encode,
    to_original,
)
from chexmask.worker.preprocess import Padding, preprocess
from chexmask.worker.reframe import segment_reframed
from chexmask.worker.weights import ModelInfo

log = logging.getLogger(__name__)


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
    # Per-landmark standard deviation [120] (pixels, 1024 frame) over this many latent
    # samples, when uncertainty was asked for.
    landmark_std: np.ndarray | None = None
    uncertainty_samples: int = 0
    # With re-framing (worker/reframe.py): the first pass's latent distance from the
    # training images; above the model's threshold the image was segmented again, re-framed.
    latent_distance: float | None = None
    landmarks_1024: np.ndarray = field(init=False)  # int, half-to-even rounding
    landmarks_original: np.ndarray = field(init=False)  # int, original frame
    rle: dict[str, str] = field(init=False)  # organ -> RLE at original resolution
    rle_1024: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        p = self.prepared.padding
        self.landmarks_1024 = landmarks_to_pixels(self.landmarks / FRAME)
        self.landmarks_original = to_original(self.landmarks, p)
        self.masks_original = organ_masks(self.landmarks_original, p.height, p.width)
        self.masks_1024 = organ_masks(self.landmarks_1024, FRAME, FRAME)
        self.rle = {k: rle_encode(m) for k, m in self.masks_original.items()}
        self.rle_1024 = {k: rle_encode(m) for k, m in self.masks_1024.items()}
        self.measurements: Measurements = measure(
            self.landmarks_original, self.masks_original, spacing_of(self.prepared.source)
        )

    def organ_std(self) -> dict[str, float] | None:
        """Mean landmark standard deviation per organ (RL, LL, H), pixels of the 1024 frame."""
        if self.landmark_std is None:
            return None
        return {k: float(self.landmark_std[rows].mean()) for k, rows in ORGAN_ROWS.items()}

    def uncertainty(self) -> dict | None:
        """The uncertainty part of the record: samples, per-organ mean and per-landmark std."""
        organs = self.organ_std()
        if organs is None or self.landmark_std is None:
            return None
        return {
            "samples": self.uncertainty_samples,
            "organ_mean_std": {ORGAN_NAMES[k]: round(v, 4) for k, v in organs.items()},
            "landmark_std": np.round(self.landmark_std, 4).tolist(),
        }

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
            "rle": self.rle_by_name()[0],
            "preprocessing": p.padding.to_dict(),
            "source": p.source,
            "measurements": self.measurements.columns(),
            "model": self.model.to_dict(),
            "pipeline_version": PIPELINE_VERSION,
            "seconds": {k: round(v, 4) for k, v in p.seconds.items()},
            **({"uncertainty": u} if (u := self.uncertainty()) else {}),
            **({"framing": f} if (f := self.framing()) else {}),
        }

    def framing(self) -> dict | None:
        """Whether the image was re-framed, and the latent distance that decided it."""
        if self.latent_distance is None or self.model.framing is None:
            return None
        threshold = self.model.framing.threshold
        return {
            "latent_distance": round(self.latent_distance, 4),
            "threshold": round(threshold, 4),
            "reframed": self.latent_distance > threshold,
        }

    def rle_by_name(self) -> tuple[dict[str, str], dict[str, str]]:
        """RLE by organ name (``right_lung``, ...), at original resolution and at 1024."""
        return ({ORGAN_NAMES[k]: v for k, v in self.rle.items()}, {ORGAN_NAMES[k]: v for k, v in self.rle_1024.items()})

    def pictures(self) -> dict[str, bytes]:
        """Pictures by file name: a PNG mask per organ at original resolution and a JPEG overlay at 1024."""
        files = {f"{ORGAN_NAMES[k]}.png": _png(m) for k, m in self.masks_original.items()}
        files["overlay.jpg"] = overlay_jpeg(self.prepared.image, self.masks_1024, self.landmarks_1024)
        return files

    def csv_row(self) -> dict[str, object]:
        """A row of the CheXmask layout at original resolution (Dice columns empty until QC)."""
        row: dict[str, object] = {"Dice RCA (Mean)": "", "Dice RCA (Max)": ""}
        row["Landmarks"] = csv_landmarks_original(self.landmarks_original)
        row.update({col: self.rle[organ] for col, organ in CSV_MASK_COLUMNS.items()})
        row.update({"Height": self.prepared.padding.height, "Width": self.prepared.padding.width})
        if (organs := self.organ_std()) is not None and self.landmark_std is not None:
            row.update(uncertainty_columns(organs, self.landmark_std.tolist()))
        return row


def uncertainty_columns(organ_std: dict[str, float], landmark_std: list[float]) -> dict[str, object]:
    """The extra CSV columns (after the CheXmask ones) of a segmentation with uncertainty."""
    row: dict[str, object] = {col: round(organ_std[k], 4) for col, k in UNCERTAINTY_COLUMNS.items()}
    row[LANDMARK_STD_COLUMN] = ",".join(f"{v:.3f}" for v in landmark_std)
    return row


def _png(mask: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", mask)
    if not ok:
        raise ValueError("OpenCV could not encode a mask as PNG")
    return data.tobytes()


def prepare(data: bytes, name: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Decode and preprocess one upload. Raises ``RefusedInput`` for bad input
    (``too_large`` above ``max_pixels``, Settings.max_pixels)."""
    started = time.perf_counter()
    decoded = decode_image(data, name=name, max_pixels=max_pixels)
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
    """What happened to one input: a segmentation, a refusal (bad input) or an error
    (anything else that went wrong with it), each with its reason."""

    name: str
    segmentation: Segmentation | None = None
    refusal: RefusedInput | None = None
    error: Exception | None = None
    key: str = ""  # unique output name within a run; the file name's stem when not given

    def __post_init__(self) -> None:
        self.key = self.key or Path(self.name).stem

    @property
    def ok(self) -> bool:
        return self.segmentation is not None

    def error_record(self) -> dict:
        if self.refusal is not None:
            return {
                "image_id": self.key,
                "name": self.name,
                "status": "refused",
                "code": self.refusal.code,
                "reason": self.refusal.message,
            }
        return {
            "image_id": self.key,
            "name": self.name,
            "status": "failed",
            "code": INTERNAL_ERROR,
            "reason": f"{type(self.error).__name__}: {self.error}"[:2000],
        }


# The code of an input that failed for a reason other than a refusal (a decoder crash,
# an unreadable file, a full disk): recorded so one bad file never stops a run.
INTERNAL_ERROR = "internal_error"


class Segmenter:
    """A loaded model plus the CPU work around it.

    ``workers`` images are segmented at the same time, each in its own thread with
    ``cores // workers`` torch threads. A batch-of-1 forward pass runs only ~1.4x
    faster on two cores than on one; two images side by side, one core each, gave
    1.4x the throughput of one image on both, and the decoding and mask drawing of
    one image fill the gaps of the other. Results do not depend on the number of
    threads (see ``Encoder._mu_exact``).
    """

    def __init__(
        self,
        model: HybridGNet,
        info: ModelInfo,
        batch_size: int = 2,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        together: bool = False,
        uncertainty: int = 0,
    ):
        self.model, self.info = model, info
        # Latent samples per image for the per-landmark uncertainty; 0: none. Checked
        # here so that weights without fc_logvar stop the run before any image.
        self.uncertainty = uncertainty
        if uncertainty:
            check_uncertainty(model, uncertainty)
        self.together = together  # one forward pass per batch (a device path; see segment_batch)
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.max_pixels = max_pixels
        self._thread = threading.local()
        keep_freed_memory()

    @property
    def thread_batch(self) -> int:
        """Images per model call in each thread: ``batch_size`` is shared by the threads."""
        return max(1, self.batch_size // self.workers)

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for each of the ``workers`` threads."""
        return max(1, (os.cpu_count() or 1) // self.workers)

    def segment(self, items: list[Prepared]) -> list[Segmentation]:
        """Infer one batch and post-process it, in the calling thread (which gets
        ``torch_threads`` intra-op threads on its first call)."""
        if getattr(self._thread, "torch_threads", None) != self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # a per-thread setting
            self._thread.torch_threads = self.torch_threads
        started = time.perf_counter()
        images = np.stack([p.image for p in items])
        stds: list[np.ndarray | None] = [None] * len(items)
        distances: list[float | None] = [None] * len(items)
        if self.info.framing is not None:
            landmarks, latents, std, first = segment_reframed(
                self.model, images, self.info.framing, self.uncertainty, self.together
            )
            stds = list(std) if std is not None else stds
            distances = [float(d) for d in first]
        elif self.uncertainty:
            landmarks, latents, std = segment_with_uncertainty(self.model, images, self.uncertainty)
            stds = list(std)
        else:
            landmarks, latents = segment_batch(self.model, images, self.together)
        per_image = (time.perf_counter() - started) / len(items)
        for p in items:
            p.seconds["inference"] = per_image
        return [
            Segmentation(p, lm * FRAME, z, self.info, s, self.uncertainty if s is not None else 0, d)
            for p, lm, z, s, d in zip(items, landmarks, latents, stds, distances, strict=True)
        ]

    def run(
        self,
        sources: Iterable[tuple[str, Callable[[], bytes]]],
        finish: Callable[[Outcome], None] | None = None,
        keys: list[str] | None = None,
    ) -> Iterator[Outcome]:
        """Segment ``(name, read)`` pairs, yielding outcomes in input order; ``keys``
        name their outputs (default: each name's stem).

        Each of ``workers`` threads takes ``thread_batch`` sources at a time and reads,
        decodes, infers and finishes them (``finish``, e.g. writing files); torch,
        OpenCV and the decoders release the GIL for their heavy parts. Whatever goes
        wrong with one input becomes its outcome (a refusal or an error); the others go on.
        """
        items = [
            (name, read, key) for (name, read), key in zip(sources, keys or itertools.repeat(""), strict=False)
        ]  # keys may be endless
        size = self.thread_batch
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="chexmask-segment") as pool:
            running: deque[Future[list[Outcome]]] = deque()
            for chunk in chunks:
                running.append(pool.submit(self._run_chunk, chunk, finish))
                if len(running) > 2 * self.workers:  # bound the images held in memory
                    yield from running.popleft().result()
            while running:
                yield from running.popleft().result()

    def _run_chunk(
        self, chunk: list[tuple[str, Callable[[], bytes], str]], finish: Callable[[Outcome], None] | None
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        prepared: dict[int, Prepared] = {}
        for name, read, key in chunk:
            outcome = Outcome(name, key=key)
            try:
                prepared[len(outcomes)] = prepare(read(), name, self.max_pixels)
            except RefusedInput as exc:
                outcome.refusal = exc
            except Exception as exc:  # one bad file must not stop the run: it gets an error record
                log.warning("%s: %s: %s", name, type(exc).__name__, exc)
                outcome.error = exc
            outcomes.append(outcome)
        for position, segmentation in self._segment_each(prepared).items():
            if isinstance(segmentation, Exception):
                outcomes[position].error = segmentation
            else:
                outcomes[position].segmentation = segmentation
        for outcome in outcomes:
            if finish is not None:
                self._finish(outcome, finish)
        return outcomes

    def _segment_each(self, prepared: dict[int, Prepared]) -> dict[int, Segmentation | Exception]:
        """The batch segmented; if it fails, each image alone, so only the culprit errs."""
        if not prepared:
            return {}
        try:
            return dict(zip(prepared, self.segment(list(prepared.values())), strict=True))
        except Exception as exc:
            if len(prepared) == 1:
                return {position: exc for position in prepared}
        return {position: _caught(self._segment_one, p) for position, p in prepared.items()}

    def _segment_one(self, prepared: Prepared) -> Segmentation:
        return self.segment([prepared])[0]

    @staticmethod
    def _finish(outcome: Outcome, finish: Callable[[Outcome], None]) -> None:
        try:
            finish(outcome)
        except Exception as exc:  # e.g. the output folder is full: record it, then try the error record
            log.warning("%s: writing outputs failed: %s: %s", outcome.name, type(exc).__name__, exc)
            outcome.segmentation, outcome.refusal, outcome.error = None, None, exc
            try:
                finish(outcome)
            except Exception:
                log.exception("%s: could not write its error record either", outcome.name)


def _caught(work: Callable[[Prepared], Segmentation], prepared: Prepared) -> Segmentation | Exception:
    try:
        return work(prepared)
    except Exception as exc:
        return exc


def write_outputs(outcome: Outcome, out: Path) -> None:
    """``<key>.json``, mask PNGs and overlay for a segmentation; ``<key>.error.json``
    for a refusal or an error."""
    if outcome.segmentation is None:
        (out / f"{outcome.key}.error.json").write_text(json.dumps(outcome.error_record(), indent=1))
        return
    seg = outcome.segmentation
    record = seg.record()
    record["image_id"] = outcome.key
    (out / f"{outcome.key}.json").write_text(json.dumps(record))
    for filename, data in seg.pictures().items():
        (out / f"{outcome.key}_{filename}").write_bytes(data)
