"""dataopt: perceive, analyse and optimise the data a deep network is trained on.

The library imports numpy, pyarrow, torch, scikit-learn and faiss, never Prefect, DVC or MLflow;
``tasks/`` and ``flows/`` add orchestration and tracking around it.
"""
__version__ = "0.1.0"
