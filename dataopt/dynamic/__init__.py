"""Dynamic data optimisation during training: per-epoch data selection and adaptive augmentation."""
from dataopt.dynamic import selectors  # noqa: F401  (registers DYNAMIC_SELECTORS)
