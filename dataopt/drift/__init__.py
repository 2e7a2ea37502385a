"""Drift between a reference and a new batch: two-sample and shift tests (registered in
:data:`dataopt.registry.DRIFT_TESTS`), the overall verdict, and shift generators (:mod:`.shifts`).

The API every test shares is described in :mod:`dataopt.drift.result`."""
from dataopt.drift.result import DriftResult, Verdict, benjamini_hochberg, holm, verdict

__all__ = ["DriftResult", "Verdict", "benjamini_hochberg", "holm", "verdict"]
