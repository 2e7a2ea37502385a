"""perceive: out-of-fold training dynamics and per-sample signals (``SIGNALS`` registry)."""
from dataopt.perceive.dynamics import Dynamics, OOFDynamics
from dataopt.perceive.signals import Signal, SignalInputs, compute_signals
from dataopt.perceive.summary import class_table, corpus_summary

__all__ = ["Dynamics", "OOFDynamics", "Signal", "SignalInputs", "class_table", "compute_signals",
           "corpus_summary"]
