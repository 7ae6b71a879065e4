"""Logging: one handler on the root logger, text or one JSON object per line.

Every line logged while an image is processed carries that image's id, its
dataset and, in a Celery task, the task id: the code that handles one image
opens ``image_context(image_id=..., dataset=..., task_id=...)``, code further
down adds what it learns with ``bind(...)``, and ``ContextFilter`` copies the
fields onto each record (the fields are context variables, so threads and
tasks never see each other's).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, TextIO

# The context fields, in the order they are shown.
FIELDS = ("image_id", "dataset", "task_id", "segmentation_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Never mutated in place: image_context and bind set a new dict each time.
_context: ContextVar[dict[str, Any]] = ContextVar("chexmask_log_context", default={})  # noqa: B039


@contextmanager
def image_context(**fields: Any) -> Iterator[None]:
    """Within the block, log lines carry ``fields`` (None values are left out) on top
    of those of any enclosing block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the innermost ``image_context`` (they go when it ends)."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def current() -> dict[str, Any]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the context fields onto each record (as attributes, and all of them as
    ``record.context``); lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        record.context = context
        for name, value in context.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    context = getattr(record, "context", None) or {}
    ordered = {name: context[name] for name in FIELDS if name in context}
    return {**ordered, **{k: v for k, v in context.items() if k not in ordered}}


class TextFormatter(logging.Formatter):
    """The classic line, with the context appended: ``... [image_id=12 dataset=nih]``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        suffix = " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        head, sep, rest = line.partition("\n")  # after the message, before a traceback
        return head + suffix + sep + rest


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields
    and, when there is one, the exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r} (text or json)")


def level_for(verbosity: int) -> int:
    """0: warnings, 1 (-v): info, 2 (-vv): debug."""
    return logging.WARNING - 10 * min(max(verbosity, 0), 2)


class _Handler(logging.StreamHandler):
    """Ours, so that configuring again replaces it rather than adding a second one.
    Without a stream of its own it writes to whatever ``sys.stderr`` is at the time."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream)
        self._own_stream = stream is not None

    @property
    def stream(self) -> TextIO:
        return self.__dict__["_stream"] if self._own_stream else sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        self.__dict__["_stream"] = value


def configure(
    verbosity: int = 0, fmt: str = "text", *, level: int | str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Log to ``stream`` (stderr) at the level of ``verbosity`` (or ``level``) in
    ``fmt`` (text or json), with the image context on every line."""
    handler = _Handler(stream)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(
        level_for(verbosity)
        if level is None
        else (logging.getLevelName(level.upper()) if isinstance(level, str) else level)
    )
    return handler
