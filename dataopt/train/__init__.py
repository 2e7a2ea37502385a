"""Training: the shared loop (:mod:`.loop`), the networks (:mod:`.nets`, ``MODELS``), losses, checkpoints,
the train stage's logic (:mod:`.trainer`, :mod:`.head`) and what decides the data during training:
dynamic data selection (:mod:`.dynamic_selection`, ``DYNAMIC_SELECTORS``) and adaptive augmentation
(:mod:`.adaaugment`)."""
