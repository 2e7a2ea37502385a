"""optimize: decide, per training sample, whether it is kept, how much it weighs, how often it is
drawn, how strongly it is augmented and with which label it is trained - and record why.

Subpackages by family (DESIGN.md layout), each with a named module that fills its registry on import
(:mod:`dataopt.plugins` imports them all): ``prune`` (``SELECTORS``: ``scores``, ``geometric``,
``semantic``), ``weight`` (``WEIGHTERS``: ``weighters``), ``resample`` (``RESAMPLERS``: ``resamplers``),
``perturb`` (``PERTURBERS``: ``perturbers``), ``augment`` (``AUGMENTERS``: ``augmenters``). :mod:`dataopt.optimize.plan` composes an ordered list
of steps across the families into one plan.

The protocol every method follows (issue 5 contract):

- ``requires``: names of the ``fit`` keyword arguments; the optimize stage loads exactly those
  (:data:`dataopt.stages.optimize.INPUT_NAMES`; a new input is one loader there). ``fit`` may also
  take ``keep`` ((n,) bool, the rows still kept before this step).
- fitted state by family: prune ``keep_`` (n,) bool; weight ``weight_`` (n,) float >= 0; resample
  ``sampling_weight_`` (n,) float >= 0; perturb ``new_label_`` (n,) int and/or ``train_`` dict of
  training directives; augment ``augment_magnitude_`` (n,) in [0, 1] and/or ``augment_`` dict.
- ``reason_`` (n,) str built vectorised ("" = nothing to say) and ``summary_`` (dict, with ``counts``,
  copied into plan.json ``steps``); both optional (the plan writes a generic reason without them).
"""
