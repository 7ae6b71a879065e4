"""HybridGNet weights: which a run uses, their identity, and reading and writing them.

Weights come from ``--weights``, else ``CHEXMASK_WEIGHTS``, else the default
model shipped in ``chexmask/weights`` (listed in its ``manifest.json`` with a
pinned sha256). A model version names results in the store and the index.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from chexmask.config import Settings
from chexmask.errors import WeightsError
from chexmask.official import OFFICIAL_WEIGHTS_SHA256  # noqa: F401  (re-exported)
from chexmask.worker import cpu_kernels
from chexmask.worker.model import HybridGNet, HybridGNetConfig
from chexmask.worker.reframe import Framing

REFRAMED_SUFFIX = "-reframed"  # of a model's name when its results are re-framed (worker/reframe.py)


@dataclass(frozen=True)
class ModelInfo:
    name: str  # e.g. "chexmask-jsrt-v2", "hybridgnet-official"
    version: str  # name plus the first 12 hex digits of the weights' sha256
    weights_sha256: str
    path: str
    # The bundled model's training framing when re-framing is on (CHEXMASK_REFRAME): results
    # then differ, so the name says so ("chexmask-jsrt-v2-reframed") and the version differs.
    framing: Framing | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "weights_sha256": self.weights_sha256, "path": self.path}


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
        if "logvar" in entry:  # the fitted fc_logvar beside compact weights: pinned too
            fetch_weights(str(logvar_file(path)), entry["logvar"]["sha256"], settings.home / "weights")
        framing = Framing.from_json(entry["framing"]) if settings.reframe and "framing" in entry else None
        name = entry["name"] + (REFRAMED_SUFFIX if framing else "")
        return path, ModelInfo(name, f"{name}-{entry['sha256'][:12]}", entry["sha256"], str(path), framing)
    path = fetch_weights(source, settings.weights_sha256, settings.home / "weights")
    sha = file_sha256(path)
    name = "hybridgnet-official" if sha == OFFICIAL_WEIGHTS_SHA256 else Path(path).stem
    return path, ModelInfo(name, f"{name}-{sha[:12]}", sha, str(path))


def load(source: str | None, settings: Settings, device: str) -> tuple[HybridGNet, ModelInfo]:
    path, info = resolve_weights(source, settings)
    return load_model(path, device), info


# ---------------------------------------------------------------------------
# Reading and writing checkpoints


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights(source: str, sha256: str | None, cache_dir: Path) -> Path:
    """A local path for ``source`` (a path, file:// or http(s):// URL), checked
    against the pinned ``sha256`` when one is given."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        if not sha256:
            raise WeightsError(f"weights URL {source} needs a pinned sha256 (CHEXMASK_WEIGHTS_SHA256)")
        path = cache_dir / f"{sha256}.pt"
        if not path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            try:
                urllib.request.urlretrieve(source, tmp)
            except OSError as exc:
                raise WeightsError(f"could not download weights from {source}: {exc}") from exc
            tmp.replace(path)
    else:
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else source).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"model weights not found at {path}. Pass --weights FILE or set CHEXMASK_WEIGHTS "
            "(the official HybridGNet checkpoint or this project's default weights)."
        )
    if sha256 and (actual := file_sha256(path)) != sha256:
        raise WeightsError(f"weights {path} have sha256 {actual}, expected {sha256}")
    return path


LOGVAR_KEYS = ("encoder.fc_logvar.weight", "encoder.fc_logvar.bias")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A checkpoint expanded to the official float32 layout, and whether it stored
    ``encoder.fc_logvar`` (compact files may leave it out; it is then zeros)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    state = {k: v.float() for k, v in state.items()}
    stored_logvar = all(k in state for k in LOGVAR_KEYS)
    ref = HybridGNet().state_dict()
    for key in LOGVAR_KEYS:
        state.setdefault(key, torch.zeros_like(ref[key]))
    wrong = sorted(set(ref) ^ set(state)) + [k for k in ref if k in state and ref[k].shape != state[k].shape]
    if wrong:
        raise WeightsError(f"{path} is not a HybridGNet checkpoint (unexpected or missing keys: {wrong[:5]})")
    return state, stored_logvar


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint: the official ``torch.save(state_dict)`` file, or a compact one
    (fp16 and/or without ``encoder.fc_logvar``), expanded to the official layout in float32."""
    return read_checkpoint(path)[0]


def compact_state_dict(model: HybridGNet, keep_logvar: bool = False) -> dict[str, torch.Tensor]:
    """The weights in fp16, without ``encoder.fc_logvar`` unless ``keep_logvar`` (it is
    needed only for training and for uncertainty). ``load_state_dict`` expands it back."""
    return {
        k: v.detach().half()
        for k, v in model.state_dict().items()
        if keep_logvar or not k.startswith("encoder.fc_logvar")
    }


def logvar_file(weights: Path) -> Path:
    """Where the separately fitted ``encoder.fc_logvar`` of a compact checkpoint lives:
    beside it, ``<stem>.logvar.pt`` (made by scripts/fit_logvar.py)."""
    return weights.with_name(f"{weights.stem}.logvar.pt")


def read_logvar(path: Path) -> dict[str, torch.Tensor]:
    """A fitted fc_logvar (``weight``, ``bias``) as ``encoder.fc_logvar.*`` state in float32."""
    try:
        head = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(f"{path} is not a readable fc_logvar file: {exc}") from exc
    ref = HybridGNet().encoder.fc_logvar.state_dict()
    if not isinstance(head, dict) or set(head) != set(ref) or any(head[k].shape != ref[k].shape for k in ref):
        raise WeightsError(f"{path} is not an fc_logvar of HybridGNet (keys {sorted(head)[:4]})")
    return {f"encoder.fc_logvar.{k}": v.float() for k, v in head.items()}


def load_model(path: Path, device: str = "cpu", cfg: HybridGNetConfig = HybridGNetConfig()) -> HybridGNet:
    """The network of a checkpoint; a compact one without fc_logvar takes the fitted one
    beside it (``logvar_file``) when there is one, so that uncertainty can be sampled."""
    model = HybridGNet(cfg)
    state, stored_logvar = read_checkpoint(path)
    if not stored_logvar and logvar_file(path).is_file():
        state.update(read_logvar(logvar_file(path)))
        stored_logvar = True
    model.load_state_dict(state)
    model.has_logvar = stored_logvar
    if cfg.fast_kernels and torch.device(device).type == "cpu":
        cpu_kernels.exact_here()  # compile and check the kernel now, not on the first image
    return model.to(device).eval()
