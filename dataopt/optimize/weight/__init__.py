"""Per-sample loss weights (``WEIGHTERS`` in :mod:`.weighters`)."""
