"""ingest: read a source, quarantine bad inputs, decode to one uint8 RGB array, split, add label noise.

Modules: :mod:`.sources` (the ``SOURCES``: sklearn_digits, imagefolder, parquet, csv), :mod:`.decode`,
:mod:`.labels`, :mod:`.pipeline` (the ingest stage's library call)."""
