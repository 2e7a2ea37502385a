"""Classifier two-sample test (Lopez-Paz & Oquab, "Revisiting Classifier Two-Sample Tests", ICLR 2017;
Friedman 2003): if a classifier tells batch rows from reference rows better than chance out of fold,
the two differ. Within one test fold the AUC is a Mann–Whitney U statistic whose null is exact given
the model trained on the other folds; the folds' p-values are dependent (their models share training
rows; pooling the folds' U as if independent was anti-conservative: 10 % false positives at alpha 0.05
in our null runs), so they are combined by Bonferroni, ``folds * min(p)``, valid under any dependence.
Two folds (default) keep half of the rows for each test and cost two fits.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from dataopt.drift.result import DriftResult, bonferroni, need, take
from dataopt.registry import DRIFT_TESTS


@DRIFT_TESTS.register("classifier")
class ClassifierTwoSample:
    """Cross-validated AUC of a logistic regression telling batch from reference embeddings.

    One-sided (AUC > 0.5), Bonferroni across the folds. The reference is subsampled to
    ``max_reference`` rows. Effect size: AUC - 0.5. Breakdown: ``looks_new``, each batch row's
    out-of-fold probability of being from the batch (every batch row is scored)."""

    requires = ("embeddings",)

    # newton-cholesky: rows >> features here, and lbfgs cost 10x more on small problems (a loaded box)
    def __init__(self, *, alpha: float = 0.05, folds: int = 2, C: float = 1.0, max_iter: int = 100,
                 solver: str = "newton-cholesky", max_reference: int = 2000, random_state: int = 0):
        self.alpha = alpha
        self.folds = folds
        self.C = C
        self.max_iter = max_iter
        self.solver = solver
        self.max_reference = max_reference
        self.random_state = random_state

    def fit(self, reference: Mapping, batch: Mapping) -> "ClassifierTwoSample":
        rng = np.random.default_rng(self.random_state)
        x, y = need(reference, "embeddings", "reference"), need(batch, "embeddings", "batch")
        x = x[take(x, self.max_reference, rng)]
        if min(len(x), len(y)) < 2 * self.folds:  # every test fold needs rows of both sides
            why = f"not tested: {len(y)} batch rows, {len(x)} reference rows (needs {2 * self.folds} each)"
            self.result_ = DriftResult("classifier", 0.5, 1.0, 0.0, False, why, len(reference["embeddings"]),
                                       len(y), self.alpha, {"looks_new": np.full(len(y), np.nan)})
            return self
        z = np.concatenate([x, y]).astype(np.float32)
        # standardised without the domain labels, so no fold learns anything from another's labels
        z = (z - z.mean(0)) / (z.std(0) + 1e-6)
        domain = np.r_[np.zeros(len(x), int), np.ones(len(y), int)]
        scores = np.empty(len(z))
        u = pairs = 0.0
        p_folds = []
        folds = StratifiedKFold(min(self.folds, len(x), len(y)), shuffle=True, random_state=self.random_state)
        for train, test in folds.split(z, domain):
            model = LogisticRegression(C=self.C, max_iter=self.max_iter, solver=self.solver)
            with threadpool_limits(limits=1, user_api="blas"):  # see dataopt.drift.check.fit_proxy
                scores[test] = model.fit(z[train], domain[train]).predict_proba(z[test])[:, 1]
            s1, s0 = scores[test][domain[test] == 1], scores[test][domain[test] == 0]
            u_fold = _u_statistic(s1, s0)
            n_pairs = len(s1) * len(s0)
            u, pairs = u + u_fold, pairs + n_pairs
            # one-sided Mann–Whitney normal approximation (continuous scores: no ties)
            sd = np.sqrt(n_pairs * (len(s1) + len(s0) + 1) / 12)
            p_folds.append(float(norm.sf((u_fold - n_pairs / 2) / sd)))
        auc = u / pairs  # the fold-averaged AUC, weighted by pairs
        p = bonferroni(p_folds)
        decision = p <= self.alpha
        why = (f"cross-validated AUC={auc:.3f} ({self.folds}-fold logistic regression, {len(x)} reference vs "
               f"{len(y)} batch rows), Mann–Whitney p={p:.3g}: "
               + ("a classifier tells the batch from the reference" if decision
                  else "the batch is not told from the reference"))
        self.result_ = DriftResult("classifier", auc, float(p), max(auc - 0.5, 0.0), bool(decision), why,
                                   len(reference["embeddings"]), len(y), self.alpha,
                                   {"looks_new": scores[domain == 1]})
        return self


def _u_statistic(s1: np.ndarray, s0: np.ndarray) -> float:
    """Mann–Whitney U of ``s1`` over ``s0`` (pairs with s1 > s0, ties count a half), via ranks."""
    ranks = rankdata(np.concatenate([s1, s0]))
    return float(ranks[: len(s1)].sum() - len(s1) * (len(s1) + 1) / 2)
