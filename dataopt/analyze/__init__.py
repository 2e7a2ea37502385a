"""analyze: model what perception measured (loss mixtures -> p_clean, label issues).

Modules: :mod:`.mixture` and :mod:`.confident` (the ``DETECTORS``), :mod:`.base` (shared helpers),
:mod:`.report` (tables and plots of the analyze stage)."""
