"""Per-sample signals (the ``SIGNALS`` registry): one column of ``signals.parquet`` each.

A signal is a small class in the scikit-learn manner: ``__init__`` stores keyword hyper-parameters,
``fit(inputs)`` computes ``values_`` ``(n,)`` from the :class:`SignalInputs` it ``requires``. Class
attributes describe it for the catalogue (survey 000 §V-A taxonomy): ``granularity`` (sample), ``type``
(difficulty, cleanliness, uncertainty, diversity, distribution, ...), ``direction`` (what a larger value
means), ``dtype`` (float64 | int64 | bool) and ``description``. Every dynamics-based value is out of fold.
To add a signal: subclass :class:`Signal`, implement ``compute``, register it; the perceive stage picks
it up (``perceive.signals: null`` computes every registered signal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from dataopt.embed.base import describe_ids
from dataopt.embed.knn import principal_components
from dataopt.errors import DataError
from dataopt.perceive.diversity import class_centre_distance
from dataopt.perceive.dynamics import Dynamics
from dataopt.perceive.valuation import diva_loo_gradient, knn_shapley_values
from dataopt.registry import SIGNALS


@dataclass
class SignalInputs:
    """Everything a signal may read, all over the ``n`` train rows in samples order.

    Attributes
    ----------
    labels : (n,) int64 given labels
    dynamics : :class:`Dynamics` (out-of-fold, ``E`` epochs)
    embeddings : (n, d) float32 train-row embeddings
    knn_indices : (n, k) int64 positions into the train rows, self excluded
    knn_distances : (n, k) float32 Euclidean distances, ascending
    text_embeddings : (n_classes, d) float, row c = the embedding of class c's text (same space as
        ``embeddings``), or None when the embedder has no text tower
    """

    labels: np.ndarray
    dynamics: Optional[Dynamics] = None
    embeddings: Optional[np.ndarray] = None
    knn_indices: Optional[np.ndarray] = None
    knn_distances: Optional[np.ndarray] = None
    text_embeddings: Optional[np.ndarray] = None


class Signal:
    """Base of every registered signal."""

    requires: tuple[str, ...] = ()
    granularity = "sample"
    type = ""
    direction = ""
    dtype = "float64"
    description = ""

    def fit(self, inputs: SignalInputs) -> "Signal":
        for name in self.requires:
            if getattr(inputs, name) is None:
                who = getattr(self, "registered_name", type(self).__name__)
                raise DataError(f"signal {who!r} needs {name!r}, which was not provided")
        self.values_ = np.asarray(self.compute(inputs)).astype(self.dtype)
        return self

    def fitted_card(self) -> dict[str, str]:
        """:meth:`card` with what the fit decided (e.g. which variant ran) in ``description_``."""
        return {**self.card(), "description": getattr(self, "description_", self.description)}

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        """``(n,)`` values; implemented by each signal."""
        raise NotImplementedError

    @classmethod
    def reads_dynamics(cls, text: bool = False) -> bool:
        """Whether the values come from the out-of-fold run (``text``: the embedder has a text tower)."""
        return "dynamics" in cls.requires

    @classmethod
    def card(cls) -> dict[str, str]:
        """The catalogue entry: granularity, type, direction, dtype, description."""
        return {"granularity": cls.granularity, "type": cls.type, "direction": cls.direction,
                "dtype": cls.dtype, "description": cls.description}


def _n_early(d: Dynamics, early_epochs: int) -> int:
    return max(1, min(int(early_epochs), d.epochs_completed))


def _early(d: Dynamics, early_epochs: int) -> np.ndarray:
    return d.loss[: _n_early(d, early_epochs)].astype(np.float64)


@SIGNALS.register("loss_early")
class LossEarly(Signal):
    """Mean out-of-fold loss over the first epochs, before a network memorises noisy labels
    (survey 000 §V-B: the loss statistic fed to a two-component mixture)."""

    requires = ("dynamics",)
    type = "cleanliness"
    direction = "higher = more likely mislabeled or hard"
    description = "mean out-of-fold cross-entropy of the given label over the first early_epochs epochs"

    def __init__(self, early_epochs: int = 3):
        self.early_epochs = early_epochs

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return _early(inputs.dynamics, self.early_epochs).mean(0)


@SIGNALS.register("loss_early_var")
class LossEarlyVar(Signal):
    requires = ("dynamics",)
    type = "uncertainty"
    direction = "higher = less stable early predictions"
    description = "variance (ddof=0) of the out-of-fold loss over the first early_epochs epochs"

    def __init__(self, early_epochs: int = 3):
        self.early_epochs = early_epochs

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return _early(inputs.dynamics, self.early_epochs).var(0)


@SIGNALS.register("loss_last")
class LossLast(Signal):
    requires = ("dynamics",)
    type = "difficulty"
    direction = "higher = harder or more likely mislabeled"
    description = "out-of-fold cross-entropy of the given label at the last completed epoch"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.loss[-1]


@SIGNALS.register("margin_last")
class MarginLast(Signal):
    requires = ("dynamics",)
    type = "cleanliness"
    direction = "lower = more likely mislabeled (negative: another class is preferred)"
    description = ("p(given label) minus the largest other class probability, out of fold, "
                   "at the last completed epoch; in [-1, 1]")

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.margin[-1]


@SIGNALS.register("margin_mean")
class MarginMean(Signal):
    """Area under the margin (Pleiss et al. 2020, cited by paper 002 §2), with probability margins."""

    requires = ("dynamics",)
    type = "cleanliness"
    direction = "lower = more likely mislabeled"
    description = ("mean over completed epochs of the out-of-fold probability margin (the probability "
                   "variant of aum)")

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.margin.astype(np.float64).mean(0)


@SIGNALS.register("confidence")
class Confidence(Signal):
    requires = ("dynamics",)
    type = "uncertainty"
    direction = "lower = less confident in the given label"
    description = "out-of-fold probability of the given label at the last completed epoch"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.p_label[-1]


@SIGNALS.register("entropy")
class Entropy(Signal):
    requires = ("dynamics",)
    type = "uncertainty"
    direction = "higher = more uncertain prediction"
    description = "entropy (nats) of the final out-of-fold probability vector"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        p = inputs.dynamics.probs.astype(np.float64)
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


@SIGNALS.register("forgetting")
class Forgetting(Signal):
    """Forgetting events (Toneva et al. 2019, cited by paper 002 §1), counted on held-out predictions."""

    requires = ("dynamics",)
    type = "difficulty"
    direction = "higher = less stable (harder or ambiguous)"
    dtype = "int64"
    description = "number of correct -> incorrect transitions of the out-of-fold prediction across epochs"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        c = inputs.dynamics.correct
        return (c[:-1] & ~c[1:]).sum(0)


@SIGNALS.register("el2n")
class EL2N(Signal):
    """EL2N score (Paul et al. 2021, cited by paper 002 appendix A): norm of the error vector."""

    requires = ("dynamics", "labels")
    type = "difficulty"
    direction = "higher = harder or more likely mislabeled"
    description = "L2 norm of (final out-of-fold probabilities - one-hot given label); in [0, sqrt(2)]"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        err = inputs.dynamics.probs.astype(np.float64)
        err[np.arange(len(err)), inputs.labels] -= 1.0
        return np.linalg.norm(err, axis=1)


@SIGNALS.register("correct_last")
class CorrectLast(Signal):
    requires = ("dynamics",)
    type = "cleanliness"
    direction = "False = the out-of-fold model disagrees with the given label"
    dtype = "bool"
    description = "out-of-fold argmax equals the given label at the last completed epoch"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.correct[-1]


@SIGNALS.register("pred_label")
class PredLabel(Signal):
    requires = ("dynamics",)
    type = "consistency"
    direction = "none (a label: compare with the given one)"
    dtype = "int64"
    description = "argmax of the final out-of-fold probabilities (a candidate relabel)"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.probs.argmax(1)


@SIGNALS.register("knn_density")
class KnnDensity(Signal):
    """Local density rho_i = (1/k) sum_j ||x_i - x_j|| over the k nearest neighbours
    (paper 004 / 001 part five: larger = sparser, i.e. under-represented)."""

    requires = ("knn_distances",)
    type = "distribution"
    direction = "higher = sparser region (under-represented or outlying)"
    description = "mean Euclidean embedding distance to the k nearest train neighbours (rho)"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.knn_distances.astype(np.float64).mean(1)


@SIGNALS.register("knn_label_agreement")
class KnnLabelAgreement(Signal):
    requires = ("knn_indices", "labels")
    type = "consistency"
    direction = "lower = label disagrees with the neighbourhood (possible label noise)"
    description = "share of the k nearest train neighbours that carry the same given label"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        y = inputs.labels
        return (y[inputs.knn_indices] == y[:, None]).mean(1)


@SIGNALS.register("class_center_distance")
class ClassCenterDistance(Signal):
    """Paper 002 (Moderate coreset) §3: d(s) = ||z - c_y||_2 with c_y the mean representation of the
    samples labelled y."""

    requires = ("embeddings", "labels")
    type = "distribution"
    direction = "higher = farther from its class (atypical, or mislabeled)"
    description = "Euclidean distance of the embedding to the mean embedding of its given class (train rows)"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return class_centre_distance(inputs.embeddings, inputs.labels)


@SIGNALS.register("oof_center_distance")
class OOFCenterDistance(Signal):
    """Paper 002 (Moderate coreset) §3's d(s) = ||z - c_y||_2 on a representation extractor that never
    trained on the row: the penultimate features of the fold model that held it out, with c_y the mean
    features of that fold's held-out rows labelled y. Moderate-DS assumes an extractor that has not
    memorised the labels (a public pre-trained model); ``class_center_distance`` on embeddings from a
    network trained on every row (the ``proxy`` embedder) pulls a mislabeled row toward its wrong class.
    Use it as ``moderate``'s ``score``."""

    requires = ("dynamics",)
    type = "distribution"
    direction = "higher = farther from its class (atypical, or mislabeled)"
    description = ("distance of the out-of-fold penultimate features (L2-normalised) to the mean of the "
                   "normalised out-of-fold features of its given class in the same fold, at the last "
                   "completed epoch")

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.center_distance[-1].astype(np.float64)


@SIGNALS.register("grand")
class GraNd(Signal):
    """GraNd (Paul et al. 2021, cited by paper 002 appendix A) in its last-layer closed form: the
    gradient of the cross-entropy w.r.t. the final linear layer's weights and bias is
    ``(p - onehot(y)) ⊗ [h, 1]``, whose norm is ``||p - y||_2 * sqrt(||h||^2 + 1)``."""

    requires = ("dynamics",)
    type = "difficulty"
    direction = "higher = harder or more likely mislabeled"
    description = ("last-layer gradient norm ||p - onehot(label)|| * sqrt(||h||^2 + 1) of the out-of-fold "
                   "model at epoch early_epochs (h: the penultimate features the final layer reads; the "
                   "standardised embedding for a linear head)")

    def __init__(self, early_epochs: int = 3):
        self.early_epochs = early_epochs

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        d = inputs.dynamics
        e = _n_early(d, self.early_epochs) - 1  # Paul et al. score early in training
        self.epoch_ = e + 1
        self.description_ = f"{self.description} (computed at epoch {self.epoch_})"
        h = d.feature_norm[e].astype(np.float64)
        return d.error_norm[e].astype(np.float64) * np.sqrt(h * h + 1.0)


@SIGNALS.register("aum")
class AUM(Signal):
    """Area under the margin (Pleiss et al. 2020, cited by paper 002 §2): the logit of the given label
    minus the largest other logit, averaged over epochs; out of fold here (the original averages the
    in-training margins)."""

    requires = ("dynamics",)
    type = "cleanliness"
    direction = "lower = more likely mislabeled (negative: another class is preferred)"
    description = "mean over completed epochs of the out-of-fold logit margin (logit of label - max other)"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.logit_margin.astype(np.float64).mean(0)


@SIGNALS.register("cartography_confidence")
class CartographyConfidence(Signal):
    """Dataset cartography (Swayamdipta et al. 2020): confidence = mean p(label) over epochs."""

    requires = ("dynamics",)
    type = "difficulty"
    direction = "lower = harder or more likely mislabeled"
    description = "mean over completed epochs of the out-of-fold probability of the given label"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.p_label.astype(np.float64).mean(0)


@SIGNALS.register("cartography_variability")
class CartographyVariability(Signal):
    """Dataset cartography (Swayamdipta et al. 2020): variability = std of p(label) over epochs."""

    requires = ("dynamics",)
    type = "uncertainty"
    direction = "higher = ambiguous (the model changes its mind)"
    description = "standard deviation (ddof=0) over completed epochs of the out-of-fold p(given label)"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.p_label.astype(np.float64).std(0)


@SIGNALS.register("cartography_correctness")
class CartographyCorrectness(Signal):
    """Dataset cartography (Swayamdipta et al. 2020): correctness = share of epochs predicted right."""

    requires = ("dynamics",)
    type = "difficulty"
    direction = "lower = harder or more likely mislabeled"
    description = "share of completed epochs whose out-of-fold argmax equals the given label"

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return inputs.dynamics.correct.mean(0, dtype=np.float64)


@SIGNALS.register("semantic_consistency")
class SemanticConsistency(Signal):
    """Semantic consistency ``con_i = cos(E_I(x_i), E_T(y_i))`` (papers 001 part five / 004) when the
    embedder has a text tower; otherwise the out-of-fold probability of the given label. ``source_``
    (``"text_cosine"`` | ``"oof_probability"``) says which; the fitted card's description too."""

    requires = ("labels",)
    type = "consistency"
    direction = "lower = the sample disagrees with its label's semantics (possible label noise)"
    description = ("cosine of the image embedding with the label's text embedding when the embedder "
                   "has text, else the out-of-fold probability of the given label")

    @classmethod
    def reads_dynamics(cls, text: bool = False) -> bool:
        return not text  # without text it is the out-of-fold probability of the label

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        y = inputs.labels
        text = inputs.text_embeddings
        if text is not None and inputs.embeddings is not None:
            text = np.asarray(text, np.float64)
            if text.ndim != 2 or text.shape[1] != inputs.embeddings.shape[1] or len(text) <= y.max():
                raise DataError(
                    f"text embeddings of shape {text.shape} do not fit embeddings of dim "
                    f"{inputs.embeddings.shape[1]} and labels up to {int(y.max())}: rerun the 'embed' stage"
                )
            self.source_ = "text_cosine"
            self.description_ = "cosine of the image embedding with the given label's text embedding"
            z = np.asarray(inputs.embeddings, np.float64)
            z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
            text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
            return (z * text[y]).sum(1)
        if inputs.dynamics is None:
            raise DataError("signal 'semantic_consistency' needs text embeddings or 'dynamics'")
        self.source_ = "oof_probability"
        self.description_ = ("out-of-fold probability of the given label at the last completed epoch "
                             "(no text embeddings: the embedder has no text tower)")
        return inputs.dynamics.p_label[-1]


@SIGNALS.register("diva_grad")
class DivaGrad(Signal):
    """DIVA leave-one-out dataset derivative (paper 003 §3.3 eq. 11-13, §3.4 eq. 15): ridge regression of
    the one-hot labels on the embeddings, ``grad_alpha L_LOO`` at ``alpha = 1`` by autograd through the
    closed-form LOO predictions (:func:`dataopt.perceive.valuation.diva_loo_gradient`)."""

    requires = ("embeddings", "labels")
    type = "valuation"
    direction = "higher = more detrimental (positive: up-weighting the sample raises the LOO loss)"
    description = ("d L_LOO / d alpha_i at alpha = 1 of a weighted ridge (one-hot targets) on the "
                   "embeddings plus a bias, squared leave-one-out loss, lam = ridge * trace(Z^T Z) / d; "
                   "embeddings wider than max_dim (512) on their first max_dim principal components")

    def __init__(self, ridge: float = 1.0, max_dim: Optional[int] = 512):
        self.ridge = ridge
        self.max_dim = max_dim

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        y, z = inputs.labels, inputs.embeddings
        self.projected_ = None
        if self.max_dim is not None and z.shape[1] > int(self.max_dim):
            # the ridge costs n d^2 in float64 (twice, with autograd): at 50,000 x 8,192 (whitened_patches)
            # about 20 TFLOP, most of an hour on 2 cores; on the first 512 principal components, seconds
            z, self.projected_ = principal_components(z, int(self.max_dim))
        grad, self.lam_ = diva_loo_gradient(z, y, int(y.max()) + 1, ridge=self.ridge)
        return grad


@SIGNALS.register("knn_shapley")
class KnnShapley(Signal):
    """kNN-Shapley data value (Jia et al. 2019, exact recursion for a K-NN classifier), leave-one-out over
    the training set: every train row is a test point whose training set is its kNN-graph neighbours
    (:func:`dataopt.perceive.valuation.knn_shapley_values`)."""

    requires = ("knn_indices", "labels")
    type = "valuation"
    direction = "lower = less valuable (negative: misleads its neighbours, e.g. mislabeled)"
    description = ("sum over the train rows listing the sample among their knn_k nearest neighbours of "
                   "its exact Shapley value for a k-NN classifier (k clipped to knn_k)")

    def __init__(self, k: int = 5):
        self.k = k

    def compute(self, inputs: SignalInputs) -> np.ndarray:
        return knn_shapley_values(inputs.knn_indices, inputs.labels, k=self.k)


def compute_signals(
    inputs: SignalInputs, names: Optional[list[str]] = None, sample_id: Optional[np.ndarray] = None,
    kwargs: Optional[dict[str, dict[str, Any]]] = None, **extra: Any,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, str]]]:
    """Fit the signals ``names`` (default: every registered one) on ``inputs``.

    Parameters
    ----------
    sample_id : (n,) ids named in the error when a signal yields NaN or inf.
    kwargs : signal name -> its hyper-parameters (checked: unknown ones are a ConfigError).
    extra : trusted hyper-parameters offered to every signal that accepts them (e.g. early_epochs).

    Returns
    -------
    values : name -> (n,) array of the signal's dtype
    catalogue : name -> card (granularity, type, direction, dtype, description)
    """
    values, catalogue = {}, {}
    for name in names if names is not None else SIGNALS.names():
        sig = SIGNALS.build(name, (kwargs or {}).get(name), **extra).fit(inputs)
        v = sig.values_
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            ids = (np.arange(len(v)) if sample_id is None else np.asarray(sample_id))[~np.isfinite(v)]
            raise DataError(f"signal {name!r} is not finite for sample_id {describe_ids(ids)}")
        values[name], catalogue[name] = v, sig.fitted_card()
    return values, catalogue


def out_of_fold_signals(names: list[str], text: bool = False) -> list[str]:
    """The signals among ``names`` whose values come from the out-of-fold dynamics (the rest read the
    embeddings, the kNN graph or the labels); ``text``: the embedder has a text tower."""
    return [n for n in names if n in SIGNALS and SIGNALS.get(n).reads_dynamics(text)]
