"""ingest: read a source, quarantine bad inputs, decode to one uint8 RGB array, split, add label noise.

Importing this package registers the sources (``sklearn_digits``, ``imagefolder``, ``parquet``, ``csv``)
in :data:`dataopt.registry.SOURCES`.
"""
from dataopt.ingest import sources  # noqa: F401  (registers the sources)
