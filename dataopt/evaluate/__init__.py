"""Evaluation: metrics on the held-out split and the plots of the evaluate stage."""
from dataopt.evaluate.metrics import (  # noqa: F401
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    ece,
    macro_f1,
    nll,
    per_class_accuracy,
    reliability,
)
