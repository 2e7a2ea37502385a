"""Training: networks, the shared loop, and the train stage's logic."""
from dataopt.train import nets  # noqa: F401  (registers MODELS)
