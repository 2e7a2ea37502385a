"""Label-noise detectors that model the per-sample loss as a two-component mixture.

Survey 000 §V-B ("Loss mixture modelling", papers README): before a network memorises, clean samples
have low loss and mislabeled ones high loss; fit a two-component mixture to the normalised loss and
take the posterior of the low-mean component as ``p_clean``. ``gmm`` fits Gaussians (scikit-learn),
``bmm`` fits Betas by EM with a weighted method of moments (Arazo et al. 2019, "Unsupervised label
noise modeling and loss correction", §3.2).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import betaln, logsumexp
from sklearn.mixture import GaussianMixture

from dataopt.errors import ConfigError, DataError
from dataopt.registry import DETECTORS

_GRID = np.linspace(0.0, 1.0, 4001)  # where the monotone p_clean curve is tabulated
_LOG_EPS = 1e-3  # log(loss + eps): losses far below eps (already certainly clean) are not spread out


class LossMixture:
    """Common part of the loss-mixture detectors: normalisation, posterior, monotone envelope.

    Fitted attributes (component order is always ``[clean, noisy]``, i.e. ascending mean):
    ``lo_``, ``hi_`` (loss mapped to 0 and 1), ``normalised_`` (n,), ``means_`` (2,),
    ``weights_`` (2,), ``p_clean_`` (n,), ``is_label_issue_`` (n,) (``p_clean_ < 0.5``), ``noise_rate_``
    (float), ``n_iter_``, ``converged_``.
    """

    requires = ("loss",)
    flags_own_issues = False  # the stage flags p_clean < analyze.threshold

    def fit(self, loss: np.ndarray) -> "LossMixture":
        """Fit the mixture to per-sample losses.

        Parameters
        ----------
        loss : (n,) float
            One loss per sample (e.g. the mean out-of-fold loss over the first epochs).

        Returns
        -------
        self
        """
        loss = np.asarray(loss, dtype=np.float64).ravel()
        if loss.size < 2:
            raise DataError(f"a loss mixture needs at least 2 samples, got {loss.size}")
        bad = np.flatnonzero(~np.isfinite(loss))
        if bad.size:
            raise DataError(f"loss is not finite at {bad.size} rows (first: row {bad[0]})")
        # Default: min-max to [0, 1] after clipping at a high quantile (DivideMix-style min-max; the
        # clip is ours): cross-entropy is unbounded, and a few extreme losses would otherwise
        # squeeze every other sample into a sliver near 0; the Beta mixture needs (0, 1) anyway.
        # transform="log" (log then the same min-max) makes a right-skewed clean loss more
        # Gaussian; on the digits proxy it helped gmm under 20-40 % symmetric noise (F1 0.86 ->
        # 0.93) but hurt it under pair noise and 10 % noise (0.77 -> 0.71, 0.70 -> 0.60) and hurt
        # bmm everywhere, so it is an option, not the default.
        if self.transform not in ("minmax", "log"):
            raise ConfigError(f"analyze.kwargs.transform must be 'minmax' or 'log', "
                              f"got {self.transform!r}")
        t = self._transform(loss)
        self.lo_ = float(t.min())
        self.hi_ = float(np.quantile(t, self.clip_quantile))
        if self.hi_ <= self.lo_:
            self.hi_ = float(t.max())
        if self.hi_ <= self.lo_:
            raise DataError(f"loss is constant ({loss[0]:.4g}) over all {loss.size} samples; "
                            "a mixture cannot separate clean from noisy")
        x = self.normalise(loss)
        self._fit_components(x)
        self.normalised_ = x
        post = self._posterior_clean(_GRID)
        if self.monotone:
            # A sample with lower loss than one judged clean must not be judged noisier. Gaussian
            # posteriors can turn back up in the far tail when the clean component is the wider
            # one (Arazo et al. 2019 fix the same artefact in their look-up table): hold p_clean at
            # its peak left of the peak and make it non-increasing right of it.
            peak = int(np.argmax(post))
            post[:peak] = post[peak]
            post = np.minimum.accumulate(post)
        self.p_clean_curve_ = post
        self.p_clean_ = self._p_clean_at(x)
        # Expected share of noisy samples under the fitted posterior: mean(1 - p_clean).
        self.noise_rate_ = float(np.mean(1.0 - self.p_clean_))
        self.is_label_issue_ = self.p_clean_ < 0.5
        return self

    def _transform(self, loss: np.ndarray) -> np.ndarray:
        if self.transform == "log":
            return np.log(np.maximum(loss, 0.0) + _LOG_EPS)
        return loss

    def normalise(self, loss: np.ndarray) -> np.ndarray:
        """Map raw losses (n,) to [0, 1] with the fitted transform and clip bounds."""
        loss = self._transform(np.asarray(loss, dtype=np.float64))
        return (np.clip(loss, self.lo_, self.hi_) - self.lo_) / (self.hi_ - self.lo_)

    def predict_proba(self, loss: np.ndarray) -> np.ndarray:
        """``(n, 2)`` probabilities ``[p_clean, p_noisy]`` for raw losses ``(n,)``."""
        p = self._p_clean_at(self.normalise(loss))
        return np.column_stack([p, 1.0 - p])

    def component_density(self, x: np.ndarray) -> np.ndarray:
        """Weighted component densities ``(len(x), 2)`` ``[clean, noisy]`` at normalised losses."""
        return np.exp(self._log_weighted_pdf(np.asarray(x, dtype=np.float64)))

    def threshold_loss(self, threshold: float) -> float:
        """The normalised loss where ``p_clean`` first drops below ``threshold`` (nan if never)."""
        below = np.flatnonzero(self.p_clean_curve_ < threshold)
        return float(_GRID[below[0]]) if below.size else float("nan")

    def summary(self) -> dict[str, Any]:
        """Fitted mixture parameters for analysis.json (normalised-loss scale)."""
        return {
            "components": ["clean", "noisy"],
            "means": [float(m) for m in self.means_],
            "weights": [float(w) for w in self.weights_],
            "normalisation": {"transform": self.transform, "lo": self.lo_, "hi": self.hi_,
                              "clip_quantile": self.clip_quantile},
            "n_iter": int(self.n_iter_),
            "converged": bool(self.converged_),
            **self._extra_summary(),
        }

    def _p_clean_at(self, x: np.ndarray) -> np.ndarray:
        if not self.monotone:
            return self._posterior_clean(x)
        return np.interp(x, _GRID, self.p_clean_curve_)

    def _posterior_clean(self, x: np.ndarray) -> np.ndarray:
        logp = self._log_weighted_pdf(x)
        return np.exp(logp[:, 0] - logsumexp(logp, axis=1))

    # subclasses: _fit_components(x) sets means_/weights_/n_iter_/converged_ in [clean, noisy] order
    def _fit_components(self, x: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _log_weighted_pdf(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_summary(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


@DETECTORS.register("gmm")
class GaussianLossMixture(LossMixture):
    """Two-component Gaussian mixture on the normalised loss (scikit-learn ``GaussianMixture``).

    Parameters
    ----------
    transform : {"minmax", "log"}
        "log" takes ``log(loss + 1e-3)`` before the min-max normalisation.
    clip_quantile : float
        Losses above this quantile map to 1 before fitting.
    reg_covar : float
        Variance floor; 5e-4 as in DivideMix keeps a tight clean component from collapsing.
    max_iter, tol : EM limits passed to ``GaussianMixture``.
    monotone : bool
        Make ``p_clean`` non-increasing in the loss (see ``fit``).
    random_state : int or None
        Seed of the k-means initialisation.
    """

    def __init__(self, transform: str = "minmax", clip_quantile: float = 0.99,
                 reg_covar: float = 5e-4, max_iter: int = 100, tol: float = 1e-3,
                 monotone: bool = True, random_state: int | None = None):
        self.transform = transform
        self.clip_quantile = clip_quantile
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.tol = tol
        self.monotone = monotone
        self.random_state = random_state

    def _fit_components(self, x: np.ndarray) -> None:
        gm = GaussianMixture(n_components=2, covariance_type="full", reg_covar=self.reg_covar,
                             max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)
        gm.fit(x[:, None])
        order = np.argsort(gm.means_.ravel())  # the low-mean component is the clean one
        self.means_ = gm.means_.ravel()[order]
        self.variances_ = gm.covariances_.ravel()[order]
        self.weights_ = gm.weights_[order]
        self.n_iter_ = gm.n_iter_
        self.converged_ = gm.converged_

    def _log_weighted_pdf(self, x: np.ndarray) -> np.ndarray:
        x = x[:, None]
        var = self.variances_[None, :]
        return (np.log(self.weights_)[None, :] - 0.5 * np.log(2 * np.pi * var)
                - (x - self.means_[None, :]) ** 2 / (2 * var))

    def _extra_summary(self) -> dict[str, Any]:
        return {"variances": [float(v) for v in self.variances_]}


@DETECTORS.register("bmm")
class BetaLossMixture(LossMixture):
    """Two-component Beta mixture on the normalised loss, fitted by EM (Arazo et al. 2019, §3.2).

    The M-step uses weighted method-of-moments estimates: with responsibilities ``r_ik``,
    ``mean_k = sum_i r_ik x_i / sum_i r_ik``, ``var_k`` likewise, then
    ``alpha_k = mean_k (mean_k (1 - mean_k) / var_k - 1)``, ``beta_k = alpha_k (1 - mean_k) / mean_k``.

    Parameters
    ----------
    transform : {"minmax", "log"}
        "log" takes ``log(loss + 1e-3)`` before the min-max normalisation (worse for a Beta).
    clip_quantile : float
        Losses above this quantile map to 1 before fitting.
    eps : float
        Normalised losses are clipped to ``[eps, 1 - eps]`` (the Beta density is infinite at 0, 1).
    max_iter, tol : int, float
        EM stops after ``max_iter`` steps or when the mean log-likelihood changes by < ``tol``.
    monotone : bool
        Make ``p_clean`` non-increasing in the loss (see ``fit``).
    """

    def __init__(self, transform: str = "minmax", clip_quantile: float = 0.99, eps: float = 1e-4,
                 max_iter: int = 200, tol: float = 1e-6, monotone: bool = True):
        self.transform = transform
        self.clip_quantile = clip_quantile
        self.eps = eps
        self.max_iter = max_iter
        self.tol = tol
        self.monotone = monotone

    def _fit_components(self, x: np.ndarray) -> None:
        x = np.clip(x, self.eps, 1 - self.eps)[:, None]
        # Arazo et al.'s initialisation: a left-leaning (clean) and a right-leaning (noisy) Beta.
        self.alphas_ = np.array([1.0, 2.0])
        self.betas_ = np.array([2.0, 1.0])
        self.weights_ = np.array([0.5, 0.5])
        prev, self.converged_ = -np.inf, False
        for it in range(1, self.max_iter + 1):
            logp = self._log_weighted_pdf(x[:, 0])
            ll = logsumexp(logp, axis=1)
            r = np.exp(logp - ll[:, None])  # E-step: responsibilities (n, 2)
            w = np.maximum(r.sum(axis=0), 1e-12)
            mean = (r * x).sum(axis=0) / w
            var = (r * (x - mean) ** 2).sum(axis=0) / w
            # a Beta needs 0 < var < mean (1 - mean); keep the moments inside that range
            var = np.clip(var, 1e-8, mean * (1 - mean) * (1 - 1e-6))
            common = mean * (1 - mean) / var - 1
            self.alphas_, self.betas_ = mean * common, (1 - mean) * common
            self.weights_ = w / w.sum()
            self.n_iter_ = it
            if abs(ll.mean() - prev) < self.tol:
                self.converged_ = True
                break
            prev = ll.mean()
        order = np.argsort(self.alphas_ / (self.alphas_ + self.betas_))
        self.alphas_, self.betas_ = self.alphas_[order], self.betas_[order]
        self.weights_ = self.weights_[order]
        self.means_ = self.alphas_ / (self.alphas_ + self.betas_)

    def _log_weighted_pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(x, self.eps, 1 - self.eps)[:, None]
        a, b = self.alphas_[None, :], self.betas_[None, :]
        return (np.log(self.weights_)[None, :] + (a - 1) * np.log(x) + (b - 1) * np.log1p(-x)
                - betaln(a, b))

    def _extra_summary(self) -> dict[str, Any]:
        return {"alphas": self.alphas_.tolist(), "betas": self.betas_.tolist()}
