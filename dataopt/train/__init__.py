"""Training: networks, the shared loop, and the train stage's logic."""
from dataopt.train import nets  # noqa: F401  (registers MODELS)
from dataopt.train.checkpoint import load_model, save_model  # noqa: F401
