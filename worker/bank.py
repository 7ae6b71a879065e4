"""The QC reference bank: annotated images in the form RCA and the plausibility
checks need them, in one compressed .npz file (a few MB for 200 references).

Per reference: the image at the registration size (area-averaged from the 1024
frame), its ground-truth landmarks (1024-frame pixels; the masks are their
polygon fills, drawn on demand) and, when built with a model, the HybridGNet
encoder's latent, which picks each new image's nearest references. The bank also
carries the statistical shape model of the references' landmarks.

Latents are only comparable between identical weights: the bank records the
weights' sha256, and loading it for other weights drops the latents, so the
references are then picked by image similarity instead. The bundled bank has no
latents on purpose: picking by image works the same with any weights.

A bank can also carry what makes its estimates honest (``qc_commands.calibrate``):
the monotone calibration of raw Dice RCA against true Dice on held-out cases, and
per image-check flag (``inverted``, ``occluded``, ``not_frontal``) a cap on the
estimate. ``view_threshold`` is the lowest thumbnail correlation with the nearest
reference that a frontal chest X-ray is expected to reach.

Which bank serves (``resolve``): ``CHEXMASK_QC_BANK`` when set (``none`` switches QC
off), else the bank bundled in ``chexmask/weights`` (``qc_bank.json``, sha256 pinned).
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from chexmask.anatomy import FRAME
from chexmask.errors import ChexmaskError, ConfigError
from chexmask.worker.model import HybridGNet, segment_batch
from chexmask.worker.plausibility import ShapeModel
from chexmask.worker.rca import Calibration, working_image
from chexmask.worker.train import list_ids, load_landmarks
from chexmask.worker.weights import file_sha256

log = logging.getLogger(__name__)

BANK_FORMAT = 1
THUMBNAIL = 32  # side of the thumbnails compared when there are no latents
OFF = ("none", "off")  # CHEXMASK_QC_BANK values that switch QC off


@dataclass
class ReferenceBank:
    ids: list[str]
    images: np.ndarray  # uint8 [N,size,size]
    landmarks: np.ndarray  # float32 [N,120,2], ground truth in the 1024 frame
    latents: np.ndarray | None  # float32 [N,64] encoder means, or None
    shape_model: ShapeModel
    weights_sha256: str = ""  # the weights that produced the latents
    calibration: Calibration | None = None  # raw Dice RCA -> true Dice
    flag_caps: dict[str, float] = field(default_factory=dict)  # image-check flag -> cap on the estimate
    view_threshold: float = 0.0  # best thumbnail correlation below it: not a frontal chest X-ray
    _thumbnails: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(
        cls,
        images_dir: Path,
        landmarks_dir: Path,
        ids: list[str] | None = None,
        model: HybridGNet | None = None,
        weights_sha256: str = "",
        size: int = 96,
        batch_size: int = 4,
    ) -> ReferenceBank:
        """A bank of the images ``<id>.png`` (1024x1024 grey) with landmarks
        ``{RL,LL,H}/<id>.npy``; latents when a HybridGNet ``model`` is given."""
        ids = list_ids(images_dir, landmarks_dir) if ids is None else list(ids)
        if not ids:
            raise ChexmaskError(f"no annotated images in {images_dir} with landmarks in {landmarks_dir}")
        small: list[np.ndarray] = []
        latents: list[np.ndarray] = []
        for start in range(0, len(ids), batch_size):
            batch = np.stack([_read_1024(images_dir / f"{i}.png") for i in ids[start : start + batch_size]])
            small.extend(working_image(image, size) for image in batch)
            if model is not None:
                latents.append(segment_batch(model, batch)[1])
            log.info("bank: %d/%d images", min(start + batch_size, len(ids)), len(ids))
        landmarks = np.stack([load_landmarks(landmarks_dir, i) for i in ids]).astype(np.float32)
        bank = cls(
            ids=ids,
            images=np.stack(small),
            landmarks=landmarks,
            latents=np.concatenate(latents).astype(np.float32) if latents else None,
            shape_model=ShapeModel.fit(landmarks),
            weights_sha256=weights_sha256 if latents else "",
        )
        bank.view_threshold = bank.fit_view_threshold()
        return bank

    def fit_view_threshold(self) -> float:
        """Half the lowest leave-one-out correlation of a reference with its nearest
        other reference: frontal chest X-rays from other sources correlate less than
        JSRT with JSRT, but far more than a lateral view or another picture does."""
        correlation = np.abs(self.correlations(self.images))
        np.fill_diagonal(correlation, 0)
        return float(correlation.max(1).min() / 2)

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.int64(BANK_FORMAT),
            "ids": np.array(self.ids),
            "images": self.images,
            "landmarks": self.landmarks,
            "weights_sha256": np.array(self.weights_sha256),
            **self.shape_model.to_arrays(),
        }
        if self.latents is not None:
            arrays["latents"] = self.latents
        if self.calibration is not None:
            arrays |= self.calibration.to_arrays()
        arrays["flag_caps"] = np.array(json.dumps(self.flag_caps, sort_keys=True))
        arrays["view_threshold"] = np.float64(self.view_threshold)
        tmp = path.with_name(path.name + ".part")
        _write_npz(tmp, arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, weights_sha256: str | None = None) -> ReferenceBank:
        """Read a bank. With ``weights_sha256`` (the serving weights), latents made by
        other weights are dropped: their distances would mean nothing."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"QC reference bank {path} is not readable: {exc}") from exc
        if int(arrays.get("format", -1)) != BANK_FORMAT:
            raise ConfigError(f"{path} is not a QC reference bank of format {BANK_FORMAT}")
        missing = {"ids", "images", "landmarks", "weights_sha256"} - set(arrays)
        if missing:
            raise ConfigError(f"QC reference bank {path} lacks {', '.join(sorted(missing))}")
        bank = cls(
            ids=[str(i) for i in arrays["ids"]],
            images=arrays["images"],
            landmarks=arrays["landmarks"],
            latents=arrays.get("latents"),
            shape_model=ShapeModel.from_arrays(arrays),
            weights_sha256=str(arrays["weights_sha256"]),
            calibration=Calibration.from_arrays(arrays),
            flag_caps=json.loads(str(arrays.get("flag_caps", "{}"))),
            view_threshold=float(arrays.get("view_threshold", 0.0)),
        )
        if weights_sha256 and bank.latents is not None and weights_sha256 != bank.weights_sha256:
            log.warning("QC bank %s was built with other weights; picking references by image", path)
            bank.latents, bank.weights_sha256 = None, ""
        return bank

    def nearest(self, images: np.ndarray, latents: np.ndarray | None, k: int) -> np.ndarray:
        """Rows [B,k] of the k references nearest to each image [B,size,size] uint8:
        by latent (each dimension scaled by its spread in the bank) when both sides
        have latents, else by the absolute correlation of 32x32 thumbnails (absolute:
        an inverted image must still find its look-alikes)."""
        k = min(k, len(self))
        if latents is not None and self.latents is not None:
            scale = self.latents.std(0) + 1e-6
            d = np.linalg.norm((np.asarray(latents)[:, None] - self.latents[None]) / scale, axis=-1)
        else:
            d = -np.abs(self.correlations(images))
        return np.argsort(d, axis=1, kind="stable")[:, :k]

    def correlations(self, images: np.ndarray) -> np.ndarray:
        """Signed correlations [B,N] of images' [B,size,size] thumbnails with the references'."""
        if self._thumbnails is None:
            self._thumbnails = _thumbnails(self.images)
        return _thumbnails(images) @ self._thumbnails.T


def _read_1024(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None or image.shape != (FRAME, FRAME):
        raise ChexmaskError(f"{path}: expected a 1024x1024 grey image in the model frame")
    return image


def _thumbnails(images: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm flattened thumbnails [B, 32*32]."""
    flat = np.stack([cv2.resize(i, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA) for i in images])
    flat = flat.reshape(len(images), -1).astype(np.float64)
    flat -= flat.mean(1, keepdims=True)
    return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-9)


def _write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """np.savez_compressed with fixed member timestamps, so that the same arrays
    always make the same bytes (the bundled bank's sha256 is pinned)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(
                zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                buffer.getvalue(),
                compress_type=zipfile.ZIP_DEFLATED,
            )


# ---------------------------------------------------------------------------
# Which bank serves


def bundled_bank() -> tuple[Path, dict] | None:
    """The bank shipped in chexmask/weights and its manifest entry, if this install has them."""
    manifest = resources.files("chexmask") / "weights" / "qc_bank.json"
    if not manifest.is_file():
        return None
    entry = json.loads(manifest.read_text())
    return Path(str(resources.files("chexmask") / "weights" / entry["file"])), entry


def resolve(setting: str | None, weights_sha256: str | None = None) -> tuple[ReferenceBank | None, str]:
    """The bank QC uses and a one-line description, or None and why QC is off.

    Raises ConfigError when the configured or bundled bank cannot be used: a
    misconfiguration, to be reported once at start rather than per image."""
    if setting is not None and setting.strip().lower() in OFF:
        return None, f"QC switched off (CHEXMASK_QC_BANK={setting})"
    if setting:
        bank = ReferenceBank.load(Path(setting), weights_sha256)
        return bank, f"QC bank {setting} ({len(bank)} references)"
    found = bundled_bank()
    if found is None:
        return None, "no reference bank: this install has none bundled and CHEXMASK_QC_BANK is not set"
    path, entry = found
    if not path.is_file():
        raise ConfigError(f"the bundled QC bank {path} is missing (reinstall, or set CHEXMASK_QC_BANK)")
    if (sha := file_sha256(path)) != entry["sha256"]:
        raise ConfigError(f"the bundled QC bank {path} has sha256 {sha}, expected {entry['sha256']}")
    bank = ReferenceBank.load(path, weights_sha256)
    return bank, f"QC bank {entry['name']} (bundled, {len(bank)} references)"
