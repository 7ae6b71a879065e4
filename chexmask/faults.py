"""Crash injection for the recovery tests: ``CHEXMASK_FAULT=<point>`` makes the
process kill itself (SIGKILL: no cleanup, no exception handler, no atexit) when
it reaches that point of the pipeline, as a power cut or the OOM killer would.

Points, in pipeline order: ``after_fetch`` (source read), ``after_decode``
(decoded and preprocessed), ``after_store_write`` (artefacts in the store, no
index row), ``after_index_insert`` (segmentation row, image not yet done),
``before_qc``, ``after_qc`` (QC written). Unset in production: one cached
lookup per point.
"""

from __future__ import annotations

import os
import signal
from functools import cache

from chexmask.config import Settings

POINTS = ("after_fetch", "after_decode", "after_store_write", "after_index_insert", "before_qc", "after_qc")


def fault_point(name: str) -> None:
    """Die here, at once, if ``CHEXMASK_FAULT`` names this point."""
    if _armed() == name:
        os.kill(os.getpid(), signal.SIGKILL)


@cache
def _armed() -> str | None:
    return Settings.from_env().fault
