"""Which weights a run uses, and their identity.

Weights come from ``--weights``, else ``CHEXMASK_WEIGHTS``, else the default
model shipped in ``chexmask/weights`` (listed in its ``manifest.json`` with a
pinned sha256). A model version names results in the store and the index.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from chexmask.config import Settings
from chexmask.errors import WeightsError
from chexmask.worker.model import OFFICIAL_WEIGHTS_SHA256, HybridGNet, fetch_weights, file_sha256, load_model


@dataclass(frozen=True)
class ModelInfo:
    name: str            # e.g. "chexmask-jsrt-v2", "hybridgnet-official"
    version: str         # name plus the first 12 hex digits of the weights' sha256
    weights_sha256: str
    path: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def default_weights() -> tuple[Path, dict] | None:
    """The bundled default weights and their manifest entry, if this install has them."""
    folder = resources.files("chexmask") / "weights"
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    entry = json.loads(manifest.read_text())
    return Path(str(folder / entry["file"])), entry


def resolve_weights(source: str | None, settings: Settings) -> tuple[Path, ModelInfo]:
    """A local, checksum-verified weights file and its identity."""
    source = source or settings.weights
    if source is None:
        found = default_weights()
        if found is None:
            raise WeightsError(
                "no model weights: this install has no default weights; pass --weights FILE "
                "or set CHEXMASK_WEIGHTS to a HybridGNet checkpoint"
            )
        path, entry = found
        path = fetch_weights(str(path), entry["sha256"], settings.home / "weights")
        return path, ModelInfo(entry["name"], f"{entry['name']}-{entry['sha256'][:12]}", entry["sha256"], str(path))
    path = fetch_weights(source, settings.weights_sha256, settings.home / "weights")
    sha = file_sha256(path)
    name = "hybridgnet-official" if sha == OFFICIAL_WEIGHTS_SHA256 else Path(path).stem
    return path, ModelInfo(name, f"{name}-{sha[:12]}", sha, str(path))


def load(source: str | None, settings: Settings, device: str) -> tuple[HybridGNet, ModelInfo]:
    path, info = resolve_weights(source, settings)
    return load_model(path, device), info
