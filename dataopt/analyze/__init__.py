"""analyze: model what perception measured (loss mixtures -> p_clean, label issues).

Importing this package registers the ``DETECTORS``.
"""
from dataopt.analyze import confident, mixture  # noqa: F401  (registers the detectors)
from dataopt.analyze.run import (FLAG_COLUMNS, SIGNAL_COLUMNS, AnalysisResult, analyze,
                                 detect_label_issues, outlier_scores, write_plots)

__all__ = ["FLAG_COLUMNS", "SIGNAL_COLUMNS", "AnalysisResult", "analyze", "detect_label_issues",
           "outlier_scores", "write_plots"]
