"""Settings: every ``CHEXMASK_*`` variable is read here, and nowhere else.

One typed ``Settings`` (pydantic-settings): each field ``name`` comes from
``CHEXMASK_NAME`` in the environment, else from a ``.env`` file in the working
directory, else its default. Keyword arguments win over both, so tests and
library callers build one directly: ``Settings(home=tmp, database_url=...)``.

The defaults need no server: an SQLite index, a folder as object store and a
broker kept in an SQLite file, all under ``CHEXMASK_HOME`` (``./.chexmask``).
A malformed value raises ``ConfigError`` naming the variable. Secrets are
``SecretStr`` (never printed); a URL is echoed only through ``mask_url``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chexmask.errors import ConfigError

ENV_PREFIX = "CHEXMASK_"


def _env(name: str, default: Any) -> Any:
    """A field read from ``CHEXMASK_<name>`` rather than from its field name."""
    return Field(default, validation_alias=AliasChoices(ENV_PREFIX + name))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,  # CHEXMASK_X= (empty) means "not set", as it always did
        extra="ignore",  # other variables in .env are none of our business
        frozen=True,
    )

    home: Path = Path(".chexmask")  # CHEXMASK_HOME: the embedded index, store, broker and caches
    weights: str | None = None  # CHEXMASK_WEIGHTS: path or URL; None = bundled default
    weights_sha256: str | None = None  # CHEXMASK_WEIGHTS_SHA256: pin for weights given by URL/path
    database_url: str = ""  # CHEXMASK_DATABASE_URL (default: SQLite under home)
    store_url: str = ""  # CHEXMASK_STORE_URL: file:///path or s3://bucket/prefix (default: home/store)
    broker_url: str = ""  # CHEXMASK_BROKER_URL (default: an SQLite file under home)
    s3_endpoint_url: str | None = None  # CHEXMASK_S3_ENDPOINT_URL: S3-compatible server (else boto3's AWS_ENDPOINT_URL)
    qc_bank: str | None = None  # CHEXMASK_QC_BANK: reference bank file for RCA
    device: str = "auto"  # CHEXMASK_DEVICE: auto, cpu, cuda
    batch_size: int = 2  # CHEXMASK_BATCH_SIZE: images in the model at once, over its threads
    model_threads: int = 0  # CHEXMASK_MODEL_THREADS: images inferred at once; 0 = one per core
    uncertainty_samples: int = Field(
        0, ge=0
    )  # CHEXMASK_UNCERTAINTY_SAMPLES: latent samples for per-landmark uncertainty; 0 = none
    # CHEXMASK_REFRAME: segment again, re-framed, images the bundled model did not understand (worker/reframe.py)
    reframe: bool = True
    api_token: SecretStr | None = None  # CHEXMASK_API_TOKEN: bearer token for the HTTP API
    visibility_timeout_s: int = _env(
        "VISIBILITY_TIMEOUT", 3600
    )  # CHEXMASK_VISIBILITY_TIMEOUT: longer than the longest task
    scan_prefixes: str = ""  # CHEXMASK_SCAN_PREFIXES: "URI [DATASET [RELEASE]]; ..." for beat
    scan_interval_s: int = _env("SCAN_INTERVAL", 3600)  # CHEXMASK_SCAN_INTERVAL: seconds between beat scans
    events_redis_url: str = "redis://localhost:6379/0"  # CHEXMASK_EVENTS_REDIS_URL: `chexmask listen --redis-list`
    webhook_token: SecretStr | None = None  # CHEXMASK_WEBHOOK_TOKEN: token MinIO's webhook sends
    dicom_port: int | None = None  # CHEXMASK_DICOM_PORT: `listen`/`serve` receive DICOM C-STORE on it
    dicom_ae_title: str = Field("CHEXMASK", min_length=1, max_length=16)  # CHEXMASK_DICOM_AE_TITLE: our AE title
    dicom_processes: int = Field(1, ge=1)  # CHEXMASK_DICOM_PROCESSES: `listen` SCP processes sharing the port
    stow_max_bytes: int = Field(1 << 30, ge=1)  # CHEXMASK_STOW_MAX_BYTES: largest STOW-RS request body
    # Where the DICOM SEG and SR of DICOM inputs are sent once stored (worker/push.py):
    dicom_destination: str | None = None  # CHEXMASK_DICOM_DESTINATION: a C-STORE SCP, AET@host:port
    stow_destination: str | None = None  # CHEXMASK_STOW_DESTINATION: a STOW-RS URL (http(s)://.../studies)
    stow_destination_token: SecretStr | None = None  # CHEXMASK_STOW_DESTINATION_TOKEN: its bearer token
    log_format: Literal["text", "json"] = "text"  # CHEXMASK_LOG_FORMAT: json = one JSON object per line
    max_pixels: int = 100_000_000  # CHEXMASK_MAX_PIXELS: larger images are refused from their header
    fault: str | None = None  # CHEXMASK_FAULT: a test hook, see faults.py (unset in production)
    lease_s: int = Field(
        60, ge=1, validation_alias=AliasChoices(ENV_PREFIX + "LEASE")
    )  # CHEXMASK_LEASE: seconds a dead worker's image or QC stays held
    retry_failed_for_s: int = _env(
        "RETRY_FAILED_FOR", 86_400
    )  # CHEXMASK_RETRY_FAILED_FOR: seconds a transient failure is retried

    def __init__(self, **values: Any):
        # Keyword arguments go by field name, also for the fields read under another
        # variable name (CHEXMASK_SCAN_INTERVAL is scan_interval_s=...).
        for name in list(values):
            if name in _RENAMED:
                values[_RENAMED[name]] = values.pop(name)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def from_env(cls) -> Settings:
        """The settings of this process: environment, then ``.env``, then defaults."""
        return cls()

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @field_validator("dicom_destination")
    @classmethod
    def _dicom_destination(cls, value: str | None) -> str | None:
        if value is not None:
            DicomDestination.parse(value)
        return value

    @field_validator("stow_destination")
    @classmethod
    def _stow_destination(cls, value: str | None) -> str | None:
        if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @property
    def push_destinations(self) -> list[str]:
        """The configured destinations of the DICOM outputs, as the index names them:
        ``dicom:AET@host:port`` and ``stow:URL``."""
        named = [("dicom", self.dicom_destination), ("stow", self.stow_destination)]
        return [f"{kind}:{value}" for kind, value in named if value]

    @property
    def broker_configured(self) -> bool:
        """Whether a broker was named (CHEXMASK_BROKER_URL), i.e. Celery workers do the
        work; otherwise ``serve`` runs alone and the index is its queue."""
        return "broker_url" in self.model_fields_set and bool(self.broker_url)

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        # The one place the embedded defaults are spelled out; an explicit value
        # (even "", as tests give broker_url="") is kept.
        derived = {
            "database_url": f"sqlite:///{self.home / 'index.db'}",
            "store_url": (self.home / "store").as_uri(),
            "broker_url": f"sqla+sqlite:///{self.home / 'broker.db'}",
        }
        for name, default in derived.items():
            if name not in self.model_fields_set:
                object.__setattr__(self, name, default)
        return self


@dataclass(frozen=True)
class DicomDestination:
    """A C-STORE SCP to send to, written ``AET@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DicomDestination:
        match = _DICOM_DESTINATION.fullmatch(text.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError("must be AET@host:port (an AE title of 1-16 characters)")
        return cls(match["aet"].strip(), match["host"].strip("[]"), int(match["port"]))


_DICOM_DESTINATION = re.compile(r"(?P<aet>[^@\\]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\s]+):(?P<port>\d{1,5})")

# field name -> the variable it is read from, where that is not CHEXMASK_<FIELD>
_RENAMED = {
    name: str(info.validation_alias.choices[0])
    for name, info in Settings.model_fields.items()
    if isinstance(info.validation_alias, AliasChoices)
}


def _variable(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    if alias:
        return str(alias)
    return ENV_PREFIX + field.upper()


def _describe(exc: ValidationError) -> str:
    """``CHEXMASK_SCAN_INTERVAL: must be a whole number, got 'soon'``, one line per error."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = _variable(field) if field in Settings.model_fields else field.upper()
        got = error.get("input")
        secret = field in ("api_token", "webhook_token", "stow_destination_token")
        shown = "" if secret or isinstance(got, dict) else f", got {got!r}"
        message = "must be a whole number" if error["type"].startswith("int_") else error["msg"]
        message = message.removeprefix("Value error, ")  # our validators' sentences, as written
        lines.append(f"{name}: {message}{shown}")
    return "; ".join(lines)


def mask_url(url: str | None) -> str:
    """``url`` with its password replaced by ``***`` (``postgresql://u:***@host/db``),
    for every place a URL is printed or logged. Other URLs come back unchanged."""
    if not url:
        return url or ""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
