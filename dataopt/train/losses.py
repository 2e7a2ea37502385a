"""Training losses for the plan's directives (plan.json ``train``), plugged into
:func:`dataopt.train.loop.fit` as ``loss_fn``.

Directives (each optional; written by the optimize stage's perturbers and weighters):

- ``{"label_smoothing": eps}``                                       Szegedy et al. 2016, §7
- ``{"logit_adjustment": {"tau": τ, "prior": [π_c, ...]}}``          Menon et al. ICLR 2021, §4
- ``{"bootstrap": {"kind": "soft" | "hard", "beta": β}}``            Reed et al. 2015, §3
- ``{"focal": {"gamma": γ}}``                                        Lin et al. ICCV 2017, §3
- ``{"self_paced": {"start_share": q0, "growth": g}}``               Kumar et al. NeurIPS 2010, §3

Order of composition for a batch (logits ``z`` (B, C), labels ``y`` (B,)):

1. logit adjustment: ``z' = z + τ log π`` (training only; predictions use ``z``);
2. ``p = softmax(z')``;
3. target ``q = one_hot(y)``, smoothed: ``q = (1 - ε) q + ε / C``;
4. bootstrapped: soft ``q = β q + (1 - β) p`` (gradient flows through ``p``: Reed's soft bootstrap
   is cross-entropy plus an entropy penalty), hard ``q = β q + (1 - β) one_hot(argmax p)``;
5. per-sample loss ``l_i = -sum_c q_ic (1 - p_ic)^γ log p_ic`` (focal; for a one-hot target it is
   ``-(1 - p_t)^γ log p_t``, and γ = 0 is cross-entropy);
6. self-paced: in epoch ``e`` (1-based) only the ``min(1, q0 g^(e-1))`` share of the batch with the
   lowest (detached) ``l_i`` counts: ``v_i = 1[l_i <= λ_e]``, λ_e that share's quantile;
7. ``loss = sum_i w_i v_i l_i / B`` (``w`` = the plan's loss weights, as the loop passes them).

With no directive but ``label_smoothing`` (or none), the loss is exactly the loop's default
``F.cross_entropy(..., label_smoothing=eps)`` weighted sum, bit for bit.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from dataopt.errors import ConfigError

DIRECTIVES = ("label_smoothing", "logit_adjustment", "bootstrap", "focal", "self_paced")

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]


def _num(where: str, value: Any, lo: float, hi: float, hi_open: bool = False,
         lo_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"plan.json train.{where} must be a number, got {value!r}") from None
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) and math.isfinite(v)
    if not ok:
        raise ConfigError(f"plan.json train.{where} must be in {'(' if lo_open else '['}{lo}, {hi}"
                          f"{')' if hi_open else ']'}, got {value!r}")
    return v


def _keys(where: str, d: Any, valid: Sequence[str], required: Sequence[str] = ()) -> Mapping:
    if not isinstance(d, Mapping):
        raise ConfigError(f"plan.json train.{where} must be a mapping with keys {list(valid)}, got {d!r}")
    unknown = sorted(set(d) - set(valid))
    missing = [k for k in required if k not in d]
    if unknown or missing:
        raise ConfigError(f"plan.json train.{where}: unknown keys {unknown}, missing {missing}; "
                          f"valid: {', '.join(valid)}")
    return d


def make_loss(directives: Optional[Mapping[str, Any]], n_classes: int,
              class_prior: Optional[Sequence[float]] = None) -> LossFn:
    """Build the training loss for ``directives``.

    Parameters
    ----------
    directives : mapping or None
        plan.json ``train`` (keys in :data:`DIRECTIVES`); None or {} = plain cross-entropy.
    n_classes : int
        Output width of the model (C).
    class_prior : sequence of C floats, optional
        Used by ``logit_adjustment`` when the directive carries no ``prior``.

    Returns
    -------
    loss_fn(logits, targets, weights, epoch, indices) -> scalar tensor
        ``logits`` (B, C) float, ``targets`` (B,) int64, ``weights`` (B,) float, ``epoch`` 1-based
        int, ``indices`` (B,) int64 positions in the training set (unused by these losses; part of
        the signature so per-sample state can plug in).

    Raises
    ------
    ConfigError
        Unknown directive or key, or a value out of range.
    """
    d = dict(directives or {})
    unknown = sorted(set(d) - set(DIRECTIVES))
    if unknown:
        raise ConfigError(f"plan.json train: unknown directives {unknown}; valid: {', '.join(DIRECTIVES)}")
    c = int(n_classes)
    eps = _num("label_smoothing", d.get("label_smoothing", 0.0), 0.0, 1.0, hi_open=True)

    log_prior = None
    if "logit_adjustment" in d:
        la = _keys("logit_adjustment", d["logit_adjustment"], ("tau", "prior"))
        tau = _num("logit_adjustment.tau", la.get("tau", 1.0), 0.0, 100.0)
        prior = la.get("prior", class_prior)
        if prior is None:
            raise ConfigError("plan.json train.logit_adjustment needs a prior (one share per class)")
        prior_t = torch.as_tensor(list(prior), dtype=torch.float64)
        if prior_t.ndim != 1 or len(prior_t) > c or bool((prior_t < 0).any()) or float(prior_t.sum()) <= 0:
            raise ConfigError(f"plan.json train.logit_adjustment.prior must be at most {c} "
                              f"non-negative shares with a positive sum, got {list(prior)}")
        # classes with no training row (shorter prior) get π = 0 -> clamped log
        prior_t = F.pad(prior_t / prior_t.sum(), (0, c - len(prior_t)))
        if tau > 0:
            log_prior = (tau * prior_t.clamp_min(1e-12).log()).float()

    boot = None
    if "bootstrap" in d:
        b = _keys("bootstrap", d["bootstrap"], ("kind", "beta"), ("kind",))
        if b["kind"] not in ("soft", "hard"):
            raise ConfigError(f"plan.json train.bootstrap.kind must be 'soft' or 'hard', got {b['kind']!r}")
        beta = _num("bootstrap.beta", b.get("beta", 0.95 if b["kind"] == "soft" else 0.8), 0.0, 1.0)
        boot = (b["kind"], beta)

    gamma = 0.0
    if "focal" in d:
        gamma = _num("focal.gamma", _keys("focal", d["focal"], ("gamma",)).get("gamma", 2.0), 0.0, 100.0)

    spl = None
    if "self_paced" in d:
        s = _keys("self_paced", d["self_paced"], ("start_share", "growth"))
        spl = (_num("self_paced.start_share", s.get("start_share", 0.5), 0.0, 1.0, lo_open=True),
               _num("self_paced.growth", s.get("growth", 1.2), 1.0, 1e6))

    general = boot is not None or gamma > 0

    def per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        if log_prior is not None:
            z = z + log_prior.to(z.device)  # Menon et al. eq. 10: f_y(x) + τ log π_y inside softmax
        if not general:
            # the loop's own expression: same kernel, same numbers
            return F.cross_entropy(z, targets, reduction="none", label_smoothing=eps)
        logp = F.log_softmax(z, dim=1)
        p = logp.exp()
        q = F.one_hot(targets, z.shape[1]).to(z.dtype)
        if eps > 0:
            q = q * (1.0 - eps) + eps / z.shape[1]
        if boot is not None:
            kind, beta = boot
            pred = p if kind == "soft" else F.one_hot(p.argmax(1), z.shape[1]).to(z.dtype)
            q = beta * q + (1.0 - beta) * pred
        if gamma > 0:
            # (1 - p)^γ per class; clamp keeps the gradient finite at p = 1 for γ < 1
            return -(q * (1.0 - p).clamp_min(1e-12).pow(gamma) * logp).sum(1)
        return -(q * logp).sum(1)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, epoch: int,
                indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        losses = per_sample(logits, targets)
        w = weights
        if spl is not None:
            q0, g = spl
            share = min(1.0, q0 * g ** (max(int(epoch), 1) - 1))
            k = max(1, math.ceil(share * len(losses)))
            if k < len(losses):
                lam = losses.detach().kthvalue(k).values  # λ_e: the k-th smallest loss of the batch
                w = w * (losses.detach() <= lam).to(w.dtype)
        return (losses * w).sum() / len(losses)

    loss_fn.directives = d  # type: ignore[attr-defined]
    return loss_fn
