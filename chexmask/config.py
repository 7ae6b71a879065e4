"""Settings, all read from environment variables, with embedded defaults.

The defaults need no server: an SQLite index, a folder as object store and a
broker kept in an SQLite file, all under ``CHEXMASK_HOME`` (``./.chexmask``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from chexmask.errors import ConfigError


def _home() -> Path:
    return Path(os.environ.get("CHEXMASK_HOME", ".chexmask")).expanduser().resolve()


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    value = _env(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=_home)
    weights: str | None = None          # CHEXMASK_WEIGHTS: path or URL; None = bundled default
    weights_sha256: str | None = None   # CHEXMASK_WEIGHTS_SHA256: pin for weights given by URL/path
    database_url: str = ""              # CHEXMASK_DATABASE_URL
    store_url: str = ""                 # CHEXMASK_STORE_URL: file:///path or s3://bucket/prefix
    broker_url: str = ""                # CHEXMASK_BROKER_URL
    qc_bank: str | None = None          # CHEXMASK_QC_BANK: reference bank file for RCA
    device: str = "auto"                # CHEXMASK_DEVICE: auto, cpu, cuda
    batch_size: int = 2                 # CHEXMASK_BATCH_SIZE: images in the model at once, over its threads
    batch_wait_ms: int = 0              # CHEXMASK_BATCH_WAIT_MS: how long a model thread gathers a batch
    model_threads: int = 0              # CHEXMASK_MODEL_THREADS: images inferred at once; 0 = one per core
    api_token: str | None = None        # CHEXMASK_API_TOKEN: bearer token for the HTTP API
    visibility_timeout_s: int = 3600    # CHEXMASK_VISIBILITY_TIMEOUT: longer than the longest task
    scan_prefixes: str = ""             # CHEXMASK_SCAN_PREFIXES: "URI [DATASET [RELEASE]]; ..." for beat
    scan_interval_s: int = 3600         # CHEXMASK_SCAN_INTERVAL: seconds between beat scans
    max_pixels: int = 100_000_000       # CHEXMASK_MAX_PIXELS: larger images are refused from their header
    lease_s: int = 60                   # CHEXMASK_LEASE: seconds a dead worker's image or QC stays held
    retry_failed_for_s: int = 86_400    # CHEXMASK_RETRY_FAILED_FOR: seconds a transient failure is retried

    @classmethod
    def from_env(cls) -> "Settings":
        home = _home()
        return cls(
            home=home,
            weights=_env("CHEXMASK_WEIGHTS"),
            weights_sha256=_env("CHEXMASK_WEIGHTS_SHA256"),
            database_url=_env("CHEXMASK_DATABASE_URL", f"sqlite:///{home / 'index.db'}"),
            store_url=_env("CHEXMASK_STORE_URL", (home / "store").as_uri()),
            broker_url=_env("CHEXMASK_BROKER_URL", f"sqla+sqlite:///{home / 'broker.db'}"),
            qc_bank=_env("CHEXMASK_QC_BANK"),
            device=_env("CHEXMASK_DEVICE", "auto"),
            batch_size=_env_int("CHEXMASK_BATCH_SIZE", 2),
            batch_wait_ms=_env_int("CHEXMASK_BATCH_WAIT_MS", 0),
            model_threads=_env_int("CHEXMASK_MODEL_THREADS", 0),
            api_token=_env("CHEXMASK_API_TOKEN"),
            visibility_timeout_s=_env_int("CHEXMASK_VISIBILITY_TIMEOUT", 3600),
            scan_prefixes=_env("CHEXMASK_SCAN_PREFIXES", ""),
            scan_interval_s=_env_int("CHEXMASK_SCAN_INTERVAL", 3600),
            max_pixels=_env_int("CHEXMASK_MAX_PIXELS", 100_000_000),
            lease_s=max(1, _env_int("CHEXMASK_LEASE", 60)),
            retry_failed_for_s=_env_int("CHEXMASK_RETRY_FAILED_FOR", 86_400),
        )


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
