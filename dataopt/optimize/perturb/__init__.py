"""Label and logit perturbation (``PERTURBERS`` in :mod:`.perturbers`)."""
