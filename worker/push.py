"""Sending DICOM to the hospital's systems."""

from __future__ import annotations

# Media types of DICOMweb (PS3.18 8.7.3), here for the STOW-RS route of the ingest layer too.
DICOM_MEDIA_TYPE = "application/dicom"
DICOM_JSON_MEDIA_TYPE = "application/dicom+json"
