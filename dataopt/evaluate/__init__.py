"""Evaluation: metrics on the held-out split (:mod:`.metrics`), the evaluate step as one call
(:func:`.run.evaluate`) and the evaluate stage's plots (:mod:`.plots`)."""
