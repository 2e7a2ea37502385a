"""analyze: model what perception measured (loss mixtures -> p_clean, label issues).

Importing this package registers the ``DETECTORS``.
"""
from dataopt.analyze import confident, mixture  # noqa: F401  (registers the detectors)
