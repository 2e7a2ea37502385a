"""optimize: decide per training sample whether to keep it and with which weight.

Subpackages by family (DESIGN.md layout): ``prune`` (``SELECTORS``), ``weight`` (``WEIGHTERS``).
Importing this package registers them.

The protocol the optimize stage relies on (a new family member only has to follow it):

- ``requires``: names of the ``fit`` keyword arguments; the stage loads exactly those
  (``labels``, ``embeddings``, ``signals``, ``p_clean``; a new input is one loader in
  ``dataopt.stages.optimize``).
- selectors are built with ``ratio`` and ``random_state`` and end with ``keep_`` (n,) bool;
  weighters end with ``weight_`` (n,) float.
- both end with ``reason_`` (n,) str (built vectorised; "" = nothing to say) and ``summary_`` (dict
  with ``counts``, copied into plan.json's ``steps``).
"""
from dataopt.optimize import prune, weight  # noqa: F401  (registers SELECTORS, WEIGHTERS)
