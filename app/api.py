"""The API process (``chexmask api``): the read-only API and web app of the storage
layer, with the DICOMweb STOW-RS routes of the ingest layer mounted on it, which
store and queue what hospitals post as the DICOM listener does."""

from __future__ import annotations

from fastapi import FastAPI

from chexmask.config import Settings
from chexmask.ingest.dicom_intake import DicomIntake
from chexmask.ingest.dicomweb import mount_stow
from chexmask.ingest.queue import Intake
from chexmask.storage.api import create_app
from chexmask.storage.objectstore import open_store


def create_api(
    settings: Settings, intake: Intake | None = None, *, dataset: str | None = None, release: str | None = None
) -> FastAPI:
    """The API app; with an ``intake``, STOW-RS at ``/dicomweb/studies`` too (images of
    ``dataset``, default generic, and ``release``)."""
    app = create_app(settings)
    if intake is not None:
        store = open_store(settings.store_url, settings.s3_endpoint_url)
        token = settings.api_token.get_secret_value() if settings.api_token else None
        received = DicomIntake(intake, store, dataset=dataset, release=release)
        mount_stow(app, received, token, settings.stow_max_bytes)
    return app
