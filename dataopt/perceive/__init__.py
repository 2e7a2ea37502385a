"""perceive: out-of-fold training dynamics and per-sample signals (``SIGNALS`` registry)."""
from dataopt.perceive.dynamics import Dynamics, OOFDynamics
from dataopt.perceive.signals import Signal, SignalInputs, compute_signals, out_of_fold_signals
from dataopt.perceive.diversity import vendi_score
from dataopt.perceive.summary import class_table, confident_joint_noise_rate, corpus_summary
from dataopt.perceive.run import PerceiveResult, perceive, signal_catalogue
from dataopt.perceive.valuation import diva_loo_gradient, knn_shapley_values, ridge_loo_predictions

__all__ = ["Dynamics", "OOFDynamics", "PerceiveResult", "Signal", "SignalInputs", "class_table", "compute_signals",
           "confident_joint_noise_rate", "corpus_summary", "diva_loo_gradient", "knn_shapley_values",
           "out_of_fold_signals", "perceive", "ridge_loo_predictions", "signal_catalogue", "vendi_score"]
