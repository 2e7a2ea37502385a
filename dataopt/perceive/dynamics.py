"""Out-of-fold training dynamics: per-epoch loss, probability, probability and logit margins, correctness,
error norm, penultimate-feature norm and class-centre distance of every train row, each scored by a model
that never trained on it.

Stratified K-fold over the train rows; for every fold a fresh model trains on the other folds with
:func:`dataopt.train.loop.fit`, and its ``on_epoch`` callback scores the held-out fold after every epoch
(survey 000 §V-A "dynamic" perception: loss, margin and forgetting per epoch).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold

from dataopt.embed.base import torch_device
from dataopt.errors import ConfigError, DataError
from dataopt.io import save_npz
from dataopt.registry import MODELS
from dataopt.image_kernels import normalise
from dataopt.train.loop import FitConfig, fit, images_to_tensor, predict_features, seeded
from dataopt.train.nets import Head, build_model  # nets also fills MODELS (the image networks)


@dataclass
class Dynamics:
    """Out-of-fold training dynamics of ``n`` train rows over ``E`` completed epochs.

    Attributes
    ----------
    sample_id : (n,) int64
    fold : (n,) int64, the fold in which the row was held out
    loss : (E, n) float32, cross-entropy of the given label
    p_label : (E, n) float32, probability of the given label
    margin : (E, n) float32, ``p_label`` minus the largest other class probability
    correct : (E, n) bool, argmax equals the given label
    logit_margin : (E, n) float32, logit of the given label minus the largest other logit (AUM)
    error_norm : (E, n) float32, ``||p - onehot(label)||_2`` (EL2N at every epoch)
    feature_norm : (E, n) float32, ``||h||_2`` of the penultimate features ``h`` the final linear layer
        reads (the standardised embedding for a linear head); with ``error_norm`` it gives GraNd's
        last-layer closed form without storing the features
    center_distance : (E, n) float32, ``||h_i - c_{y_i}||_2``: the distance of the row's penultimate
        features (L2-normalised) to the mean normalised features of the held-out rows of its fold that
        carry its given label, all in the feature space of the fold model that held them out (paper
        002 §3's score on an extractor that never trained on the row, so a mislabeled row stays near
        its true class)
    probs : (n, C) float32, probabilities at the last completed epoch
    epochs_completed : int, E (the minimum over folds)
    epochs_per_fold : (folds,) int64, epochs each fold completed before its time budget ran out
    """

    sample_id: np.ndarray
    fold: np.ndarray
    loss: np.ndarray
    p_label: np.ndarray
    margin: np.ndarray
    correct: np.ndarray
    logit_margin: np.ndarray
    error_norm: np.ndarray
    feature_norm: np.ndarray
    center_distance: np.ndarray
    probs: np.ndarray
    epochs_completed: int
    epochs_per_fold: np.ndarray

    def save(self, path: str | Path) -> None:
        save_npz(path, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> "Dynamics":
        with np.load(path, allow_pickle=False) as z:
            missing = [f.name for f in fields(cls) if f.name not in z.files]
            if missing:
                raise DataError(f"{path} lacks {missing} (written by an older dataopt): "
                                "rerun the 'perceive' stage")
            kw = {f.name: z[f.name] for f in fields(cls)}
        kw["epochs_completed"] = int(kw["epochs_completed"])
        return cls(**kw)


@torch.no_grad()
def features_and_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024,
                        features: bool = False) -> tuple[torch.Tensor, ...]:
    """``(N,)`` float32 norms of the penultimate features and ``(N, C)`` float32 logits, in one pass;
    with ``features``, also the ``(N, d)`` float32 features themselves.

    ``model`` ends in a linear ``fc`` (:class:`Head`, every ``MODELS`` network). The logits are the
    model's own output (so a scaled head, e.g. airbench's ``fc(h) / 9``, or flip test-time augmentation
    is honoured); the features are what ``fc`` reads, caught by a forward hook (averaged over the
    calls when the model calls ``fc`` more than once, as flip TTA does: the norm is the mean of the
    calls' norms, the features the mean of the calls' features). As
    :func:`dataopt.train.loop.predict_logits`, bfloat16 autocast on CUDA.
    """
    model.eval()
    use_amp = x.device.type == "cuda"
    seen: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].float()))
    norms, logits, feats = [], [], []
    try:
        for s in range(0, len(x), batch_size):
            seen.clear()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits.append(model(normalise(x[s : s + batch_size])).float())
            norms.append(torch.stack([h.norm(dim=1) for h in seen]).mean(0))
            if features:
                feats.append(torch.stack(seen).mean(0))
    finally:
        hook.remove()
    if not logits:
        empty = (torch.zeros(0, device=x.device), torch.zeros((0, model.fc.out_features), device=x.device))
        return (*empty, torch.zeros((0, model.fc.in_features), device=x.device)) if features else empty
    out = (torch.cat(norms), torch.cat(logits))
    return (*out, torch.cat(feats)) if features else out


def center_distance(h: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(N,)`` distance of every row of ``h`` ``(N, d)``, L2-normalised, to the mean of the normalised
    rows with its label ``y`` ``(N,)`` (paper 002 §3: ``d_i = ||z_i - c_{y_i}||_2``).

    Rows are normalised as the embed stage's are: the norm of a network's pooled features grows with
    its confidence, which the moderate band would otherwise read as distance from the class. On the
    bench's 10k CIFAR-10N ``random_label1`` rows (4-fold airbench, width 16, 10 epochs, CPU) the
    distance ranks the mislabeled rows with AUC 0.86 normalised against 0.80 raw.
    """
    h = F.normalize(h, dim=1)
    sums = torch.zeros((n_classes, h.shape[1]), dtype=h.dtype, device=h.device).index_add_(0, y, h)
    counts = torch.bincount(y, minlength=n_classes).clamp_min(1).to(h.dtype)
    return (h - (sums / counts[:, None])[y]).norm(dim=1)


def fold_seed(seed: int, fold: int) -> int:
    """An independent seed per (seed, fold) pair (``seed + fold`` would collide across seeds)."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def resolve_model(model: str) -> str:
    """The network behind a ``perceive.model`` value: ``"head"``, or a ``MODELS`` name (``"cnn"`` is
    the historical alias of ``"small_cnn"``). Unknown names raise a ConfigError listing the valid ones."""
    name = IMAGE_ALIASES.get(model, model)
    if name == "head":
        return name
    if name not in MODELS:
        raise ConfigError(f"unknown perceive model {model!r}; valid: {', '.join(perceive_models())}")
    return name


def perceive_models() -> list[str]:
    """Every valid ``perceive.model``: head, the aliases, and the registered image ``MODELS``."""
    return ["head", *IMAGE_ALIASES, *MODELS.names()]


IMAGE_ALIASES = {"cnn": "small_cnn"}


class OOFDynamics:
    """Record out-of-fold training dynamics with a ``head`` (on embeddings) or an image network.

    Parameters
    ----------
    model : "head" | "cnn" | a ``MODELS`` name
        ``head``: a linear (or one-hidden-layer) head on the embeddings. Otherwise an image network built
        by :func:`dataopt.train.trainer.build_model` (``cnn`` = ``small_cnn``; ``airbench``,
        ``resnet18`` for a strong proxy on a GPU).
    hidden : int
        Head only: width of one hidden layer (0 = linear).
    width : int
        Image networks: width (ignored by networks without one).
    folds, epochs, batch_size, lr, momentum, weight_decay : the K-fold training runs.
    augment : "none" | "crop" | "flip_crop"
        Image networks: per-batch augmentation of :func:`dataopt.train.loop.fit`; with ``flip_crop``
        the network also averages its logits over the mirror image when it supports it (``flip_tta``).
    translate : int or None
        Largest random shift of the crop in px (None = :class:`~dataopt.train.loop.FitConfig`'s default).
    lookahead : bool
        Train with airbench's lookahead weight EMA.
    label_smoothing : float
        Label smoothing of the training loss (the recorded losses are plain cross-entropy).
    max_seconds : float or None
        Budget per fold; a fold stops after the epoch that crosses it. Only the epochs every fold
        completed are kept, so all rows are scored at the same epochs.
    device : "auto" | "cpu" | "cuda"
    random_state : int
        Seeds the folds, every model initialisation and every shuffle.
    keep_features : bool
        Also set ``features_``: the penultimate features of every row by the first fold's model, one
        feature space for all rows (a kNN over them compares like with like; the out-of-fold rows each
        come from another model's space). That model trained on the other folds' rows.
    """

    requires = ("features", "labels")

    def __init__(
        self,
        model: str = "head",
        hidden: int = 0,
        width: int = 16,
        folds: int = 4,
        epochs: int = 12,
        batch_size: int = 128,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        augment: str = "none",
        label_smoothing: float = 0.0,
        translate: Optional[int] = None,
        lookahead: bool = False,
        max_seconds: Optional[float] = None,
        device: str = "auto",
        random_state: int = 0,
        keep_features: bool = False,
    ):
        self.model = model
        self.hidden = hidden
        self.width = width
        self.folds = folds
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.augment = augment
        self.label_smoothing = label_smoothing
        self.translate = translate
        self.lookahead = lookahead
        self.max_seconds = max_seconds
        self.device = device
        self.random_state = random_state
        self.keep_features = keep_features

    def _inputs(self, x: np.ndarray, dev: torch.device) -> torch.Tensor:
        if self.model_ == "head":
            if x.ndim != 2:
                raise DataError(f"perceive model 'head' needs (n, d) embeddings, got shape {x.shape}")
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
        if x.ndim != 4 or x.dtype != np.uint8:
            raise DataError(
                f"perceive model {self.model!r} needs uint8 (n, H, W, 3) images, got {x.dtype} {x.shape}"
            )
        return images_to_tensor(np.array(x), dev)

    def _build(self, x: torch.Tensor, n_classes: int, seed: int) -> torch.nn.Module:
        if self.model_ == "head":
            with seeded(seed):
                return Head(x.shape[1], n_classes, hidden=int(self.hidden))
        model, _ = build_model(self.model_, seed, n_classes, in_channels=x.shape[1], width=int(self.width),
                               image_size=min(x.shape[2], x.shape[3]),
                               flip_tta=self.augment == "flip_crop")
        return model

    def fit(self, features: np.ndarray, labels: np.ndarray, n_classes: int,
            sample_id: Optional[np.ndarray] = None) -> "OOFDynamics":
        """Train ``folds`` models and score every row out of fold after every epoch.

        Parameters
        ----------
        features : (n, d) float embeddings (model "head") or (n, H, W, 3) uint8 images (image networks)
        labels : (n,) int64 given labels in ``[0, n_classes)``
        n_classes : int
        sample_id : (n,) int64, stored in ``dynamics_`` (default ``arange(n)``)

        Sets ``dynamics_`` (:class:`Dynamics`), ``history_`` (per fold, per epoch rows of ``fit``),
        ``model_`` (the network's resolved name), ``device_`` and, with ``keep_features``,
        ``features_`` ((n, d) float32).
        """
        self.model_ = resolve_model(self.model)
        if self.augment not in ("none", "crop", "flip_crop"):
            raise ConfigError(f"unknown perceive augment {self.augment!r}; valid: none, crop, flip_crop")
        labels = np.asarray(labels, dtype=np.int64)
        n = len(labels)
        if n < self.folds:
            raise DataError(f"perceive needs at least folds={self.folds} train rows; got {n}")
        dev = torch_device(self.device, key="perceive.device")
        self.device_ = str(dev)
        x = self._inputs(features, dev)
        y = torch.from_numpy(labels).to(dev)
        E, C = int(self.epochs), int(n_classes)
        loss = np.zeros((E, n), np.float32)
        p_label = np.zeros((E, n), np.float32)
        margin = np.zeros((E, n), np.float32)
        correct = np.zeros((E, n), bool)
        logit_margin = np.zeros((E, n), np.float32)
        error_norm = np.zeros((E, n), np.float32)
        feature_norm = np.zeros((E, n), np.float32)
        centre_dist = np.zeros((E, n), np.float32)
        # without a time budget every fold completes E epochs and only the last epoch's probabilities
        # are needed; with one, the kept epoch is known only after the last fold, so keep them all
        keep_all = self.max_seconds is not None
        probs_at: dict[int, np.ndarray] = {}
        fold = np.zeros(n, np.int64)
        epochs_done = []
        self.history_ = []

        skf = StratifiedKFold(n_splits=int(self.folds), shuffle=True, random_state=self.random_state)
        with warnings.catch_warnings():
            # a class with fewer rows than folds is legal (e.g. a rare noisy label); sklearn warns
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splits = list(skf.split(np.zeros(n), labels))
        for f, (tr, te) in enumerate(splits):
            fold[te] = f
            tr_t, te_t = torch.from_numpy(tr).to(dev), torch.from_numpy(te).to(dev)
            x_tr, x_te = x[tr_t], x[te_t]
            standardise = lambda a: a
            if self.model_ == "head":
                # centre, and scale by ONE factor so the mean per-coordinate variance is 1 (training
                # folds' statistics): unit-norm embeddings are too small for SGD at usual learning
                # rates, and a per-coordinate scale would blow up the embedding's noisy directions
                mu = x_tr.mean(0)
                scale = (x_tr - mu).pow(2).mean().sqrt().clamp_min(1e-6)
                standardise = lambda a, mu=mu, scale=scale: (a - mu) / scale
                x_tr, x_te = standardise(x_tr), standardise(x_te)
            y_te = y[te_t]
            rows = torch.arange(len(te), device=dev)

            def on_epoch(epoch: int, model: torch.nn.Module, te=te, x_te=x_te, y_te=y_te, rows=rows) -> dict:
                h_norm, logits, h = features_and_logits(model, x_te, features=True)
                logp = F.log_softmax(logits, dim=1)
                p = logp.exp()
                p_y = p[rows, y_te]
                other = p.clone()
                other[rows, y_te] = -1.0
                z_other = logits.clone()
                z_other[rows, y_te] = -torch.inf
                err = p.clone()
                err[rows, y_te] -= 1.0
                ok = p.argmax(1) == y_te
                e = epoch - 1
                loss[e, te] = (-logp[rows, y_te]).cpu().numpy()
                p_label[e, te] = p_y.cpu().numpy()
                margin[e, te] = (p_y - other.max(1).values).cpu().numpy()
                correct[e, te] = ok.cpu().numpy()
                # Pleiss et al. 2020 (AUM): the margin of the logits, not of the probabilities
                logit_margin[e, te] = (logits[rows, y_te] - z_other.max(1).values).cpu().numpy()
                error_norm[e, te] = err.norm(dim=1).cpu().numpy()
                feature_norm[e, te] = h_norm.cpu().numpy()
                # class centres of the held-out rows, in this fold model's own feature space
                centre_dist[e, te] = center_distance(h, y_te, C).cpu().numpy()
                if keep_all or epoch == E:
                    probs_at.setdefault(e, np.zeros((n, C), np.float32))[te] = p.cpu().numpy()
                return {"oof_accuracy": float(ok.float().mean())}

            seed = fold_seed(self.random_state, f)
            model = self._build(x, C, seed).to(dev)
            cfg = FitConfig(epochs=E, batch_size=int(self.batch_size), lr=float(self.lr),
                            momentum=float(self.momentum), weight_decay=float(self.weight_decay), seed=seed,
                            label_smoothing=float(self.label_smoothing), augment=self.augment,
                            translate=self.translate, lookahead=bool(self.lookahead),
                            max_seconds=self.max_seconds, progress=False,
                            desc=f"perceive fold {f + 1}/{self.folds}", lr_key="perceive.lr")
            history = fit(model, x_tr, y[tr_t], cfg, on_epoch=on_epoch)
            if self.keep_features and f == 0:
                self.features_ = predict_features(model, standardise(x)).cpu().numpy()
            self.history_.append(history)
            epochs_done.append(len(history))

        e_done = min(epochs_done)
        self.dynamics_ = Dynamics(
            sample_id=np.arange(n, dtype=np.int64) if sample_id is None else np.asarray(sample_id, np.int64),
            fold=fold,
            loss=loss[:e_done], p_label=p_label[:e_done], margin=margin[:e_done], correct=correct[:e_done],
            logit_margin=logit_margin[:e_done], error_norm=error_norm[:e_done],
            feature_norm=feature_norm[:e_done], center_distance=centre_dist[:e_done],
            probs=probs_at[e_done - 1],
            epochs_completed=e_done,
            epochs_per_fold=np.asarray(epochs_done, np.int64),
        )
        return self
