"""The application layer: what wires storage, worker and ingest into programs.

``cli`` (the ``chexmask`` command and its subcommands, thin layers over the
library), ``serve`` (the embedded all-in-one server) and ``reprocess``.
Nothing below imports from here.
"""
