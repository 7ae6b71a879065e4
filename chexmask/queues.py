"""The Celery queues and task names, and which queue each task goes to.

Producers (watchers, listeners, scanners, ``reprocess``) send tasks by these
names; only the worker process imports the task code. Nothing heavy is
imported here.

- ``ingest``: cheap: read the source, hash it, register it, drop duplicates;
  also the periodic release scans;
- ``segment``: the model (GPU workers);
- ``qc``: reverse-classification-accuracy scores, and sending the DICOM outputs
  on to the configured destinations again (a push is first tried by the QC task).
"""

from __future__ import annotations

INGEST_QUEUE, SEGMENT_QUEUE, QC_QUEUE = "ingest", "segment", "qc"
QUEUES = (INGEST_QUEUE, SEGMENT_QUEUE, QC_QUEUE)

INGEST_TASK = "chexmask.ingest"
SEGMENT_TASK = "chexmask.segment"
QC_TASK = "chexmask.qc"
SCAN_TASK = "chexmask.scan"
PUSH_TASK = "chexmask.push"

ROUTES: dict[str, dict[str, str]] = {
    INGEST_TASK: {"queue": INGEST_QUEUE},
    SCAN_TASK: {"queue": INGEST_QUEUE},
    SEGMENT_TASK: {"queue": SEGMENT_QUEUE},
    QC_TASK: {"queue": QC_QUEUE},
    PUSH_TASK: {"queue": QC_QUEUE},
}
