"""Static pruning (``SELECTORS``): keep a fixed share of the training set.

Every selector is sklearn-style: ``__init__(ratio=None, n_keep=None, per_class=False,
random_state=0, ...)`` stores hyper-parameters; ``fit(<requires>..., keep=None)`` chooses exactly
``n_keep`` (or ``round(ratio * n)``, n = the rows passed, i.e. the original train set) samples among
the incoming ``keep`` rows (all kept when fewer remain; the reason says so) and sets ``keep_`` (n,)
bool, ``score_`` (n,) float or None (nan for non-candidates), ``reason_`` (n,) str and ``summary_``
(dict with ``counts``, for plan.json). Without ``ratio`` / ``n_keep`` a selector keeps every
candidate, except the threshold rules (``noise_filter``, ``semantic_dedup``).

Modules: :mod:`.scores` (none, random, moderate, ``<signal>_{easy,hard,moderate}``, coverage,
noise_filter), :mod:`.geometric` (herding, kcenter, semantic_dedup), :mod:`.semantic`
(clip_selection, density_consistency), :mod:`.base` (budget, quotas, shared plumbing).
"""
