"""perceive: out-of-fold training dynamics (:mod:`.dynamics`) and per-sample signals (:mod:`.signals`,
``SIGNALS``), with valuation, diversity and corpus summaries."""
