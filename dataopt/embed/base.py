"""What every embedder shares: the fit/transform contract, row normalisation and the finiteness check.

An embedder maps uint8 images ``(N, H, W, 3)`` to float32 features ``(N, d)`` whose rows have unit L2
norm. ``fit`` sees the train split only (so that test rows never shape the representation);
``transform`` embeds any rows, block by block so that memory stays bounded. A new backend (OpenCLIP,
an out-of-fold proxy) subclasses :class:`Embedder`, registers itself in ``EMBEDDERS`` and records what
a user must know about its features in ``info_`` (copied into ``embed/meta.json``).

The fitted state round-trips through plain arrays (``get_state`` / ``set_state``) so that the embed
stage can cache it beside its shards (``dataopt.embed.shards``, safetensors, no pickle): a resumed run or
a remote worker embeds with exactly the state the first run fitted.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from dataopt.errors import ConfigError, DataError


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (an all-zero row stays zero).

    Parameters
    ----------
    x : (N, d) float array

    Returns
    -------
    (N, d) array of the same dtype.
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps).astype(x.dtype)


def describe_ids(ids: np.ndarray, limit: int = 10) -> str:
    """``"3, 17, 42 (and 5 more)"``: a short, readable list of sample ids for an error message."""
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f" (and {len(ids) - limit} more)" if len(ids) > limit else "")


def check_finite(x: np.ndarray, sample_ids: np.ndarray, what: str = "embeddings") -> None:
    """Raise :class:`DataError` naming the sample ids whose row of ``x`` holds NaN or inf.

    Parameters
    ----------
    x : (N, d) array
    sample_ids : (N,) int64 array, ``sample_ids[i]`` names row i.
    """
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        ids = np.asarray(sample_ids)[bad]
        raise DataError(
            f"{what}: {len(ids)} row(s) are not finite (NaN or inf); sample_id {describe_ids(ids)}"
        )


def torch_device(device: str, key: str = "embed.device") -> torch.device:
    """``"auto" | "cpu" | "cuda"`` -> a torch device; ``"cuda"`` without a GPU is a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'")
    return torch.device(device)


class Embedder:
    """Base of the ``EMBEDDERS`` backends (scikit-learn style).

    Subclasses store keyword hyper-parameters in ``__init__`` and implement ``fit`` and ``_embed``.
    Fitted state: ``dim_`` (feature dimension), ``device_`` (where it ran), ``info_`` (facts for
    ``meta.json``, e.g. which rows the representation was trained on).
    """

    requires: tuple[str, ...] = ("images",)
    transform_batch_size: int = 512

    @classmethod
    def resolve_kwargs(cls, kwargs: dict[str, Any], resolve: Callable[[str], Any]) -> dict[str, Any]:
        """User kwargs with project-relative paths made absolute (``resolve`` = ``Paths.resolve``).

        Called by the stage before building the embedder, so that shard workers get absolute paths.
        """
        return dict(kwargs)

    def identity(self) -> dict[str, Any]:
        """Facts beyond the hyper-parameters that determine the features (e.g. a checkpoint hash).

        Part of the shard fingerprint; must be cheap relative to embedding and JSON-serialisable.
        """
        return {}

    def get_state(self) -> Optional[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """The fitted state as ``(arrays, meta)`` (numpy arrays + JSON-able facts), or None.

        None means the state cannot be stored; the stage then re-fits (deterministically) to resume.
        """
        return None

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "Embedder":
        """Restore what :meth:`get_state` returned (on this instance's ``device``); returns self."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore a stored state")

    def fit(
        self, images: np.ndarray, labels: Optional[np.ndarray] = None, n_classes: Optional[int] = None
    ) -> "Embedder":
        """Fit on the train rows ``images`` ``(n, H, W, 3)`` uint8 with ``labels`` ``(n,)``."""
        raise NotImplementedError

    def _embed(self, block: np.ndarray) -> np.ndarray:
        """``(b, H, W, 3)`` uint8 -> ``(b, d)`` float32 raw features."""
        raise NotImplementedError

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Embed ``images`` ``(N, H, W, 3)`` uint8 (may be memory-mapped) in blocks.

        Returns
        -------
        (N, dim_) float32 array with L2-normalised rows.
        """
        n = len(images)
        out = np.empty((n, self.dim_), dtype=np.float32)
        step = max(1, int(self.transform_batch_size))
        for s in range(0, n, step):
            # np.array copies the (possibly read-only memory-mapped) block: torch needs it writable
            out[s : s + step] = self._embed(np.array(images[s : s + step]))
        return l2_normalise(out)

    def info(self) -> dict[str, Any]:
        """Facts about the fitted features for ``meta.json``."""
        return dict(getattr(self, "info_", {}))

    def class_probs(self, images: np.ndarray, train_idx: np.ndarray) -> Optional[dict[str, np.ndarray]]:
        """Optional extra output: class probabilities of every row, or None (the default: none).

        Called by the embed stage once the embedder is fitted (or restored from its stored state), with
        ``images`` ``(N, H, W, 3)`` uint8 (every row of ``samples.parquet``, possibly memory-mapped)
        and ``train_idx`` the positions of the train rows, in the order ``fit`` saw them. A backend
        that returns something must return the same arrays after :meth:`set_state` as after
        :meth:`fit` (a resumed run writes the same file).

        Returns
        -------
        None, or a dict with ``probs`` ``(N, C)`` float32 (rows sum to 1), ``fold`` ``(N,)`` int64
        (the K-fold fold a train row was held out of; -1 for a row outside the folds, e.g. a test row)
        and ``out_of_fold`` ``(N,)`` bool (True: a train row scored only by the model of the fold
        that held it out). The stage writes it as ``embed/proxy_probs.npz``.
        """
        return None

    def predict_proba(self, images: np.ndarray) -> Optional[np.ndarray]:
        """Class probabilities ``(n, C)`` float32 of rows outside the fitted train rows (new data), scored
        as :meth:`class_probs` scores its rows outside the folds; None (the default) when the backend
        gives none."""
        return None
