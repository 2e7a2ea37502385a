"""Evaluation: metrics on the held-out split (:mod:`.metrics`) and the evaluate stage's plots
(:mod:`.plots`)."""
