"""The offline embedders: ``pixels`` (standardised pixels + PCA) and ``proxy`` (a SmallCNN's features).

Both fit on the train split only and need no downloaded weights, so they run on every machine.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits
from sklearn.preprocessing import StandardScaler

from dataopt.embed.base import Embedder, torch_device
from dataopt.errors import ConfigError, DataError
from dataopt.registry import EMBEDDERS
from dataopt.train.loop import FitConfig, fit, images_to_tensor, predict_features, seeded
from dataopt.train.nets import SmallCNN


def _flat(images: np.ndarray) -> np.ndarray:
    """``(b, H, W, C)`` uint8 -> ``(b, H*W*C)`` float32."""
    return np.asarray(images, dtype=np.float32).reshape(len(images), -1)


def _one_blas_thread():
    """BLAS rounding depends on its thread count (a Dask worker runs with OMP_NUM_THREADS=1): one
    thread makes the PCA fit and projection bit-identical wherever a shard runs."""
    return threadpool_limits(limits=1, user_api="blas")


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
        scaler = StandardScaler().fit(x)
        x = scaler.transform(x).astype(np.float32, copy=False)
        n_components = min(int(self.dim), x.shape[0], x.shape[1])
        with _one_blas_thread():
            pca = PCA(n_components, svd_solver="randomized", random_state=self.random_state).fit(x)
        # plain arrays, applied by _embed: they can be stored (get_state) and restored bit for bit
        self.mean_ = scaler.mean_.astype(np.float32)
        self.scale_ = scaler.scale_.astype(np.float32)
        self.components_ = pca.components_.astype(np.float32)
        self.pca_mean_ = pca.mean_.astype(np.float32)
        self.dim_ = n_components
        self.device_ = "cpu"
        self.info_ = {
            "features": "standardised pixels projected on PCA components fitted on the train split",
            "fitted_on": "train",
            "explained_variance": float(pca.explained_variance_ratio_.sum()),
        }
        if n_components < int(self.dim):
            self.info_["dim_clipped_from"] = int(self.dim)
        return self

    def _embed(self, block: np.ndarray) -> np.ndarray:
        x = (_flat(block) - self.mean_) / self.scale_
        with _one_blas_thread():
            return (x - self.pca_mean_) @ self.components_.T

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"mean": self.mean_, "scale": self.scale_, "components": self.components_,
                  "pca_mean": self.pca_mean_}
        return arrays, {"info": self.info_}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "PixelsEmbedder":
        self.mean_, self.scale_ = arrays["mean"], arrays["scale"]
        self.components_, self.pca_mean_ = arrays["components"], arrays["pca_mean"]
        self.dim_ = int(self.components_.shape[0])
        self.device_ = "cpu"
        self.info_ = dict(meta["info"])
        return self


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
        self.net_ = {"n_classes": n_classes, "in_channels": int(x.shape[1]), "width": int(self.width),
                     "image_size": int(min(x.shape[2], x.shape[3]))}
        with seeded(self.random_state):
            model = SmallCNN(**self.net_)
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

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {k: v.detach().cpu().numpy() for k, v in self.model_.state_dict().items()}
        return arrays, {"net": self.net_, "info": self.info_}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "ProxyEmbedder":
        dev = torch_device(self.device)
        model = SmallCNN(**meta["net"])
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        self.model_ = model.to(dev).eval()
        self.net_ = dict(meta["net"])
        self.dim_ = model.feature_dim
        self.device_ = str(dev)
        self.info_ = dict(meta["info"])
        return self
