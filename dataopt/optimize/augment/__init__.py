"""Augmentation (``AUGMENTERS``): which policy trains the model, and how strongly per sample.

Modules: :mod:`.augmenters` (the registered methods), :mod:`.batch` (the per-batch torchvision policies
the train loop applies), :mod:`.features` (feature-space augmentations for head-only training). The image
kernels (crop, flip, normalisation) shared with the train loop and AdaAugment are in
:mod:`dataopt.image_kernels`."""
