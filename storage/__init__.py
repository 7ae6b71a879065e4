"""Where results live and how they are found again.

- ``objectstore``: artefacts (record, RLE masks, PNGs) in a folder or S3 bucket.
- ``models`` / ``index``: the mask index (SQLite or PostgreSQL, Alembic migrations).
- ``export``: the CheXmask CSV layout (or Parquet), streamed.
- ``stats``: quality numbers per dataset and release.
- ``api``: the read-only HTTP API; ``commands``: the ``chexmask`` subcommands.
- ``bench``: the index benchmark (``python -m chexmask.storage.bench``).
"""
