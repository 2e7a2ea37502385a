"""The offline embedders: ``pixels`` (standardised pixels + PCA) and ``proxy`` (a SmallCNN's features, plus
out-of-fold class probabilities from K fold models).

Both fit on the train split only and need no downloaded weights, so they run on every machine.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits
from sklearn.preprocessing import StandardScaler

from dataopt.embed.base import Embedder, torch_device
from dataopt.errors import ConfigError, DataError
from dataopt.registry import EMBEDDERS
from dataopt.train.loop import FitConfig, fit, images_to_tensor, predict_features, predict_logits, seeded
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


def _fold_seed(seed: int, fold: int) -> int:
    """An independent seed per (seed, fold) pair, as ``dataopt.perceive.dynamics.fold_seed``."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


_FOLD_PREFIX = "fold_models/"  # state keys of the fold models: fold_models/<k>/<parameter name>
_FOLD_OF_TRAIN = "fold_of_train"


@EMBEDDERS.register("proxy")
class ProxyEmbedder(Embedder):
    """Penultimate features of a :class:`SmallCNN` trained on the train split, rows L2-normalised, and
    out-of-fold class probabilities from K fold models.

    The embedding model trains on every train row (one coherent feature space for all rows), so its
    train-row features are in-sample (recorded in ``info_``). With ``folds`` = K >= 2, K more models
    (same ``epochs``, ``width``, ``lr``, ``batch_size``) train on a stratified K-fold split of the train
    rows; :meth:`class_probs` then scores every train row with the one fold model that held it out, and
    every other row (the test split) with the mean of the K fold models' probabilities. Training costs
    about K times one full-split run (the full model plus K models on (K-1)/K of the rows each; at most
    (K + 1)x); ``folds`` 0 or 1 turns the fold models off.

    Parameters
    ----------
    epochs, width, lr, batch_size : training of every proxy network (``batch_size`` = training batch).
    folds : int
        K fold models for out-of-fold probabilities; 0 or 1 = none.
    transform_batch_size : int
        Rows embedded (and scored) per block.
    device : "auto" | "cpu" | "cuda"
    random_state : int
        Seeds the full model (``random_state``), the fold split and each fold model
        (``SeedSequence([random_state, k])``, as perceive's K-fold).
    """

    requires = ("images", "labels")

    def __init__(
        self,
        epochs: int = 5,
        width: int = 32,
        lr: float = 0.05,
        batch_size: int = 128,
        folds: int = 4,
        transform_batch_size: int = 512,
        device: str = "auto",
        random_state: int = 0,
    ):
        self.epochs = epochs
        self.width = width
        self.lr = lr
        self.batch_size = batch_size
        self.folds = folds
        self.transform_batch_size = transform_batch_size
        self.device = device
        self.random_state = random_state

    def _train(self, x: torch.Tensor, y: torch.Tensor, seed: int, desc: str) -> tuple[SmallCNN, list[dict]]:
        """A SmallCNN initialised and shuffled from ``seed``, trained on ``x`` ``(n, C, H, W)`` uint8."""
        with seeded(seed):
            model = SmallCNN(**self.net_)
        model = model.to(x.device)
        cfg = FitConfig(epochs=int(self.epochs), batch_size=int(self.batch_size), lr=float(self.lr),
                        seed=int(seed), progress=False, desc=desc)
        return model, fit(model, x, y, cfg)

    def fit(
        self, images: np.ndarray, labels: Optional[np.ndarray] = None, n_classes: Optional[int] = None
    ) -> "ProxyEmbedder":
        if labels is None:
            raise DataError("the 'proxy' embedder trains on labels; none were given")
        folds = int(self.folds)
        if folds < 0:
            raise ConfigError(f"embed.kwargs.folds must be 0 (off), 1 (off) or >= 2, got {self.folds}")
        labels = np.asarray(labels, dtype=np.int64)
        n_classes = int(n_classes if n_classes is not None else labels.max() + 1)
        dev = torch_device(self.device)
        x = images_to_tensor(np.asarray(images), dev)
        y = torch.from_numpy(labels).to(dev)
        self.net_ = {"n_classes": n_classes, "in_channels": int(x.shape[1]), "width": int(self.width),
                     "image_size": int(min(x.shape[2], x.shape[3]))}
        model, history = self._train(x, y, int(self.random_state), "embed proxy")
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
        self.fold_models_: list[SmallCNN] = []
        self.fold_of_train_: Optional[np.ndarray] = None
        if folds >= 2:
            self._fit_folds(x, y, labels, folds)
        return self

    def _fit_folds(self, x: torch.Tensor, y: torch.Tensor, labels: np.ndarray, folds: int) -> None:
        """Train one model per stratified fold (held-out rows never seen by it): ``fold_models_``,
        ``fold_of_train_`` ``(n_train,)`` int64."""
        n = len(labels)
        if n < folds:
            raise DataError(f"the 'proxy' embedder with folds={folds} needs at least {folds} train rows; "
                            f"got {n} (set embed.kwargs.folds lower, or 0 to turn the fold models off)")
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(self.random_state))
        with warnings.catch_warnings():
            # a class with fewer rows than folds is legal (e.g. a rare label); sklearn warns
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            try:
                splits = list(skf.split(np.zeros(n), labels))
            except ValueError as e:
                raise DataError(f"the 'proxy' embedder cannot split the train rows into folds={folds}: {e}")
        fold = np.empty(n, np.int64)
        losses = []
        for k, (tr, te) in enumerate(splits):
            fold[te] = k
            tr_t = torch.from_numpy(tr).to(x.device)
            model, history = self._train(x[tr_t], y[tr_t], _fold_seed(int(self.random_state), k),
                                         f"embed proxy fold {k + 1}/{folds}")
            self.fold_models_.append(model)
            losses.append(history[-1]["loss"])
        self.fold_of_train_ = fold
        self.info_["proxy_probs"] = {
            "folds": folds,
            "probs": "train rows: the fold model that held the row out (out-of-fold); "
                     "other rows: mean of the fold models' probabilities",
            "fold_train_loss": losses,
            "training_cost": f"{folds} fold models on {folds - 1}/{folds} of the train rows each, "
                             "plus the full-split model",
        }

    def _embed(self, block: np.ndarray) -> np.ndarray:
        dev = next(self.model_.parameters()).device
        feats = predict_features(self.model_, images_to_tensor(block, dev), batch_size=len(block))
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def class_probs(self, images: np.ndarray, train_idx: np.ndarray) -> Optional[dict[str, np.ndarray]]:
        """Out-of-fold probabilities of the train rows and fold-ensemble probabilities of the others.

        Parameters
        ----------
        images : (N, H, W, 3) uint8, every row (may be memory-mapped); scored in blocks
        train_idx : (n_train,) int64 positions of the train rows, in the order ``fit`` saw them

        Returns
        -------
        None when ``folds`` < 2, else ``probs`` (N, C) float32, ``fold`` (N,) int64 (-1 outside the
        train rows), ``out_of_fold`` (N,) bool (True for the train rows).
        """
        if not getattr(self, "fold_models_", None):
            return None
        train_idx = np.asarray(train_idx, np.int64)
        if len(train_idx) != len(self.fold_of_train_):
            raise DataError(f"the proxy fold models were fitted on {len(self.fold_of_train_)} train rows, "
                            f"but {len(train_idx)} were given: rerun the 'embed' stage")
        fold = np.full(len(images), -1, np.int64)
        fold[train_idx] = self.fold_of_train_
        probs = self._fold_probs(images, fold)
        return {"probs": probs, "fold": fold, "out_of_fold": fold >= 0}

    def predict_proba(self, images: np.ndarray) -> Optional[np.ndarray]:
        """``(n, C)`` float32: the mean of the fold models' probabilities (as :meth:`class_probs` scores a
        test row); None when ``folds`` < 2."""
        if not getattr(self, "fold_models_", None):
            return None
        return self._fold_probs(images, np.full(len(images), -1, np.int64))

    def _fold_probs(self, images: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """Row i scored by fold model ``fold[i]``, or by the mean of every fold model when ``fold[i] < 0``."""
        n, n_folds = len(images), len(self.fold_models_)
        probs = np.empty((n, int(self.net_["n_classes"])), np.float32)
        dev = next(self.model_.parameters()).device
        step = max(1, int(self.transform_batch_size))
        for s in range(0, n, step):
            x = images_to_tensor(np.array(images[s : s + step]), dev)
            fb = torch.from_numpy(fold[s : s + step]).to(dev)
            outside = fb < 0
            acc = torch.zeros((len(x), probs.shape[1]), device=dev)
            for k, model in enumerate(self.fold_models_):
                # a train row only by the model that held it out; a row outside the folds by every model
                rows = torch.nonzero((fb == k) | outside).squeeze(1)
                if len(rows):
                    acc[rows] += torch.softmax(predict_logits(model, x[rows], batch_size=len(rows)), dim=1)
            acc[outside] /= n_folds
            probs[s : s + step] = acc.cpu().numpy()
        return probs

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {k: v.detach().cpu().numpy() for k, v in self.model_.state_dict().items()}
        for k, model in enumerate(getattr(self, "fold_models_", [])):
            arrays.update({f"{_FOLD_PREFIX}{k}/{name}": v.detach().cpu().numpy()
                           for name, v in model.state_dict().items()})
        if getattr(self, "fold_of_train_", None) is not None:
            arrays[_FOLD_OF_TRAIN] = self.fold_of_train_
        return arrays, {"net": self.net_, "info": self.info_, "folds": len(getattr(self, "fold_models_", []))}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "ProxyEmbedder":
        dev = torch_device(self.device)

        def load(weights: dict[str, np.ndarray]) -> SmallCNN:
            model = SmallCNN(**meta["net"])
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
            return model.to(dev).eval()

        def fold_weights(k: int) -> dict[str, np.ndarray]:
            prefix = f"{_FOLD_PREFIX}{k}/"
            return {name[len(prefix):]: v for name, v in arrays.items() if name.startswith(prefix)}

        self.model_ = load({k: v for k, v in arrays.items()
                            if not k.startswith(_FOLD_PREFIX) and k != _FOLD_OF_TRAIN})
        self.fold_models_ = [load(fold_weights(k)) for k in range(int(meta.get("folds", 0)))]
        self.fold_of_train_ = (np.array(arrays[_FOLD_OF_TRAIN], np.int64) if self.fold_models_ else None)
        self.net_ = dict(meta["net"])
        self.dim_ = self.model_.feature_dim
        self.device_ = str(dev)
        self.info_ = dict(meta["info"])
        return self
