"""The offline embedders: ``pixels`` (standardised pixels + PCA) and ``proxy`` (a SmallCNN's features).

Both fit on the train split only and need no downloaded weights, so they run on every machine.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from dataopt.embed.base import Embedder, torch_device
from dataopt.errors import ConfigError, DataError
from dataopt.registry import EMBEDDERS
from dataopt.train.loop import FitConfig, fit, images_to_tensor, predict_features, seeded
from dataopt.train.nets import SmallCNN


def _flat(images: np.ndarray) -> np.ndarray:
    """``(b, H, W, C)`` uint8 -> ``(b, H*W*C)`` float32."""
    return np.asarray(images, dtype=np.float32).reshape(len(images), -1)


@EMBEDDERS.register("pixels")
class PixelsEmbedder(Embedder):
    """Standardised pixels projected on their top principal components, rows L2-normalised.

    Parameters
    ----------
    dim : int
        Number of principal components (clipped to ``min(n_train, H*W*3)``; the clip is recorded).
    transform_batch_size : int
        Rows embedded per block.
    random_state : int
        Seed of the randomized SVD.
    """

    requires = ("images",)

    def __init__(self, dim: int = 64, transform_batch_size: int = 512, random_state: int = 0):
        self.dim = dim
        self.transform_batch_size = transform_batch_size
        self.random_state = random_state

    def fit(
        self, images: np.ndarray, labels: Optional[np.ndarray] = None, n_classes: Optional[int] = None
    ) -> "PixelsEmbedder":
        if int(self.dim) < 1:
            raise ConfigError(f"embed.kwargs.dim must be >= 1, got {self.dim}")
        x = _flat(images)
        self.scaler_ = StandardScaler().fit(x)
        x = self.scaler_.transform(x).astype(np.float32, copy=False)
        n_components = min(int(self.dim), x.shape[0], x.shape[1])
        self.pca_ = PCA(n_components, svd_solver="randomized", random_state=self.random_state).fit(x)
        self.dim_ = n_components
        self.device_ = "cpu"
        self.info_ = {
            "features": "standardised pixels projected on PCA components fitted on the train split",
            "fitted_on": "train",
            "explained_variance": float(self.pca_.explained_variance_ratio_.sum()),
        }
        if n_components < int(self.dim):
            self.info_["dim_clipped_from"] = int(self.dim)
        return self

    def _embed(self, block: np.ndarray) -> np.ndarray:
        x = self.scaler_.transform(_flat(block)).astype(np.float32, copy=False)
        return self.pca_.transform(x).astype(np.float32, copy=False)


@EMBEDDERS.register("proxy")
class ProxyEmbedder(Embedder):
    """Penultimate features of a :class:`SmallCNN` trained on the train split, rows L2-normalised.

    The network sees the train rows' labels while training, so train-row features are in-sample
    (recorded in ``info_``); out-of-fold features are a later extension.

    Parameters
    ----------
    epochs, width, lr, batch_size : training of the proxy network (``batch_size`` = training batch).
    transform_batch_size : int
        Rows embedded per block.
    device : "auto" | "cpu" | "cuda"
    random_state : int
        Seeds the model initialisation and the shuffling.
    """

    requires = ("images", "labels")

    def __init__(
        self,
        epochs: int = 5,
        width: int = 32,
        lr: float = 0.05,
        batch_size: int = 128,
        transform_batch_size: int = 512,
        device: str = "auto",
        random_state: int = 0,
    ):
        self.epochs = epochs
        self.width = width
        self.lr = lr
        self.batch_size = batch_size
        self.transform_batch_size = transform_batch_size
        self.device = device
        self.random_state = random_state

    def fit(
        self, images: np.ndarray, labels: Optional[np.ndarray] = None, n_classes: Optional[int] = None
    ) -> "ProxyEmbedder":
        if labels is None:
            raise DataError("the 'proxy' embedder trains on labels; none were given")
        labels = np.asarray(labels, dtype=np.int64)
        n_classes = int(n_classes if n_classes is not None else labels.max() + 1)
        dev = torch_device(self.device)
        x = images_to_tensor(np.asarray(images), dev)
        y = torch.from_numpy(labels).to(dev)
        with seeded(self.random_state):
            model = SmallCNN(n_classes, in_channels=x.shape[1], width=int(self.width),
                             image_size=min(x.shape[2], x.shape[3]))
        model = model.to(dev)
        cfg = FitConfig(epochs=int(self.epochs), batch_size=int(self.batch_size), lr=float(self.lr),
                        seed=int(self.random_state), progress=False, desc="embed proxy")
        history = fit(model, x, y, cfg)
        self.model_ = model
        self.dim_ = model.feature_dim
        self.device_ = str(dev)
        self.info_ = {
            "features": "penultimate layer of a SmallCNN trained on the train split "
                        "(in-sample for train rows, not out-of-fold)",
            "fitted_on": "train",
            "train_loss": history[-1]["loss"],
            "train_epochs": len(history),
        }
        return self

    def _embed(self, block: np.ndarray) -> np.ndarray:
        dev = next(self.model_.parameters()).device
        feats = predict_features(self.model_, images_to_tensor(block, dev), batch_size=len(block))
        return feats.cpu().numpy().astype(np.float32, copy=False)
