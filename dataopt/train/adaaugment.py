"""AdaAugment: a per-sample augmentation magnitude chosen online by an actor-critic policy.

Paper 001 part three (Suorong Yang, AdaAugment). During training, a small advantage actor-critic
(A2C) looks at the target network's view of each sample and chooses how strongly to augment it.

State
    ``s`` = the target network's penultimate features of the sample at magnitude 0 (``train.augment``
    crops/flips only, no policy), computed in eval mode under ``no_grad`` and detached: the paper's
    ``s_none`` ("the sample's intrinsic difficulty"). The A2C table takes a single 512-d input (the
    ResNet-18 feature size), so one feature vector is the state here: ``s_ada`` can only be computed
    after the action it would have to inform.
Action
    magnitude ``m ~ N(mu(s), sigma)`` clipped to ``[0, 1]``; the augmentation is ``x~ = e(m, x)``: the
    torchvision policy (RandAugment's magnitude bin, TrivialAugment's probability of being applied, see
    :func:`dataopt.optimize.augment.batch._transform`) at ``m`` quantised to ``levels`` values
    ``{0, 1/(levels-1), ..., 1}``, applied per sample by the cells of
    :class:`~dataopt.optimize.augment.batch.BatchAugmenter`, after the ``train.augment`` crop/flip.
Reward
    ``r = lam * (L_full - L_ada) + (1 - lam) * (L_ada - L_none)`` with the per-sample cross-entropies of
    the target network (eval mode, ``no_grad``) at magnitude 1, ``m`` and 0, and ``lam`` decaying
    linearly from 1 (epoch 1) to 0 (last epoch). ``dr / dL_ada = 1 - 2 lam``: early (``lam`` near 1)
    the reward grows as the augmented sample gets easier, so the policy learns weak augmentation that
    speeds up learning; late (``lam`` near 0) it grows with the augmented sample's loss, so the policy
    learns strong augmentation that adds diversity against over-fitting. ``L_full`` and ``L_none`` only
    shift the reward by a sample-dependent baseline that the critic absorbs.
Policy
    the paper's A2C with the layer sizes of its table ("A2C网络结构"): actor and critic are both
    ``Linear(feature_dim, 512) - ReLU - Linear(512, 256) - ReLU - Linear(256, 1)`` (``hidden1``,
    ``hidden2``); the actor's output goes through a sigmoid to give ``mu(s)`` in (0, 1), the critic's
    is ``V(s)``. One Adam step each per training batch: advantage ``A = r - V(s)`` (detached),
    actor loss ``-mean(log N(m; mu(s), sigma) * A)``, critic loss ``mean((V(s) - r)^2)``.
    Two additions that add no parameters: a LayerNorm without affine weights in front of both MLPs
    (the features' scale differs by orders of magnitude between nets and drifts during training;
    without it the sigmoid saturated within a few epochs and never recovered), and a near-zero last
    layer (the authors' code starts it with gain 0.01), so every sample starts at ``mu = 0.5``.
    The authors' released code uses a Beta policy and 128/64 hidden units; this follows the thesis
    table and a Gaussian with a fixed ``sigma``.
Cost
    3 extra no-grad forward passes per training sample (one at magnitude 0 for the state and
    ``L_none``, one each at magnitude 1 and ``m`` in a single 2B batch), plus the policy applied to a
    2B batch and two steps of the small MLPs. A training step's forward and backward cost about three
    forwards, so the step costs roughly twice as much, less on the GPU where the extra forwards run in
    bf16 without storing activations (the paper reports +0.41 h on ResNet-18 / CIFAR).

Randomness comes from the training loop's generator (the Gaussian draw, the crop/flip, the policy's
cells, which run under a forked global RNG as in ``BatchAugmenter``) and the A2C networks are built
under :func:`dataopt.train.loop.seeded`, so a CPU run is deterministic for a seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dataopt.errors import ConfigError, DataError
from dataopt.image_kernels import crop_pad, normalise, random_crop_flip
from dataopt.optimize.augment.batch import BatchAugmenter
from dataopt.train.loop import seeded

POLICIES = ("randaugment", "trivialaugment", "autoaugment", "augmix")
BASES = ("none", "crop", "flip_crop")


def reward(l_full: torch.Tensor, l_ada: torch.Tensor, l_none: torch.Tensor, lam: float) -> torch.Tensor:
    """AdaAugment's reward (paper 001 part three), per sample.

    Parameters
    ----------
    l_full, l_ada, l_none : (B,) float tensors: the loss at magnitude 1, at the chosen magnitude, at 0
    lam : weight in [0, 1]; 1 rewards an easy augmented sample, 0 a hard one

    Returns
    -------
    (B,) ``lam * (l_full - l_ada) + (1 - lam) * (l_ada - l_none)``
    """
    return lam * (l_full - l_ada) + (1.0 - lam) * (l_ada - l_none)


def schedule(epoch: int, epochs: int) -> float:
    """``lam`` for a 1-based ``epoch``: 1 at epoch 1, 0 at ``epochs``, linear in between."""
    if epochs <= 1:
        return 1.0
    return min(1.0, max(0.0, 1.0 - (epoch - 1) / (epochs - 1)))


def quantise(m: torch.Tensor, levels: int) -> torch.Tensor:
    """``(B,)`` magnitudes in [0, 1] -> nearest of ``levels`` values ``k / (levels - 1)`` (0 and 1 kept),
    so the policy runs once per level and group, not per sample."""
    return torch.round(m * (levels - 1)) / (levels - 1)


def _mlp(d_in: int, h1: int, h2: int) -> nn.Sequential:
    """The A2C table's three linear layers, ReLU between them, after a parameter-free LayerNorm.

    The LayerNorm makes the policy's step size independent of the target net's feature scale (which
    differs by orders of magnitude between nets and grows during training); the last layer starts
    near zero (as the authors' code does, orthogonal init with gain 0.01) so every sample starts at
    ``mu = 0.5`` / ``V = 0``.
    """
    out = nn.Linear(h2, 1)
    nn.init.normal_(out.weight, std=0.01 / math.sqrt(h2))
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.LayerNorm(d_in, elementwise_affine=False), nn.Linear(d_in, h1), nn.ReLU(),
                         nn.Linear(h1, h2), nn.ReLU(), out)


class AdaAugment:
    """The ``augment_fn`` of :func:`dataopt.train.loop.fit` that learns per-sample magnitudes (A2C).

    Parameters
    ----------
    n : number of training rows (the length of the ``x`` given to ``fit``)
    n_classes : number of classes
    feature_dim : the target network's ``feature_dim`` (the state size)
    epochs : training epochs (``lam`` reaches 0 at the last one)
    base : ``train.augment`` (``none`` | ``crop`` | ``flip_crop``), applied at every magnitude
    seed : seed of the actor and critic initialisation
    policy : torchvision policy the magnitude drives: ``randaugment`` (magnitude bin), ``trivialaugment``
        (probability of being applied), ``autoaugment`` (probability), ``augmix`` (severity)
    num_ops, num_magnitude_bins : RandAugment's settings (bins also for TrivialAugment)
    levels : magnitudes are quantised to this many values in [0, 1] (>= 2)
    groups : random groups per level, one policy call each, so ops vary within a batch
    hidden1, hidden2 : hidden widths of actor and critic (the paper: 512, 256)
    actor_lr, critic_lr : Adam learning rates
    sigma : standard deviation of the Gaussian policy
    translate : largest crop shift in px of the ``base`` crop (``train.translate``); None = width // 8

    Attributes
    ----------
    magnitudes_ : (n,) float32 CPU tensor, the last magnitude (the action, before quantisation) chosen
        for each row; 0 for rows not seen yet
    actor_, critic_ : the A2C networks, on the model's device
    """

    def __init__(self, n, n_classes, feature_dim, epochs, base="flip_crop", seed=0,
                 policy="randaugment", num_ops=2, num_magnitude_bins=31, levels=8, groups=4,
                 hidden1=512, hidden2=256, actor_lr=1e-3, critic_lr=1e-3, sigma=0.1, translate=None):
        self.n = n
        self.n_classes = n_classes
        self.feature_dim = feature_dim
        self.epochs = epochs
        self.base = base
        self.seed = seed
        self.policy = policy
        self.num_ops = num_ops
        self.num_magnitude_bins = num_magnitude_bins
        self.levels = levels
        self.groups = groups
        self.hidden1 = hidden1
        self.hidden2 = hidden2
        self.actor_lr = actor_lr
        self.critic_lr = critic_lr
        self.sigma = sigma
        self.translate = translate

    def _check(self, model: nn.Module, y: torch.Tensor) -> None:
        key = "train.adaaugment.kwargs"
        if self.policy not in POLICIES:
            raise ConfigError(f"{key}.policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.base not in BASES:
            raise ConfigError(f"train.augment {self.base!r}; valid: {', '.join(BASES)}")
        if int(self.levels) < 2:
            raise ConfigError(f"{key}.levels must be >= 2 (magnitudes 0 and 1), got {self.levels}")
        if int(self.groups) < 1 or int(self.num_ops) < 1 or int(self.num_magnitude_bins) < 2:
            raise ConfigError(f"{key}: groups and num_ops must be >= 1 and num_magnitude_bins >= 2")
        if not (float(self.sigma) > 0 and math.isfinite(float(self.sigma))):
            raise ConfigError(f"{key}.sigma must be > 0, got {self.sigma}")
        if not (self.actor_lr > 0 and self.critic_lr > 0):
            raise ConfigError(f"{key}: actor_lr and critic_lr must be > 0")
        if self.translate is not None and int(self.translate) < 1:
            raise ConfigError(f"{key}.translate must be >= 1 px or null, got {self.translate}")
        if int(self.hidden1) < 1 or int(self.hidden2) < 1:
            raise ConfigError(f"{key}: hidden1 and hidden2 must be >= 1")
        dim = getattr(model, "feature_dim", None)
        if dim != self.feature_dim:
            raise ConfigError(f"adaaugment feature_dim {self.feature_dim} but the model's feature_dim "
                              f"is {dim}")
        if len(y) != self.n:
            raise DataError(f"adaaugment was built for {self.n} training rows but got {len(y)} labels")

    def bind(self, model: nn.Module, y: torch.Tensor) -> "AdaAugment":
        """Attach the target network and the ``(n,)`` int64 labels; build the A2C on the model's device.

        Parameters
        ----------
        model : network with ``.features(x) -> (B, feature_dim)`` and ``.fc``
        y : (n,) int64 labels of the training rows, on the model's device
        """
        self._check(model, y)
        device = next(model.parameters()).device
        self.model_ = model
        self.y_ = y.to(device)
        with seeded(int(self.seed)):
            self.actor_ = _mlp(int(self.feature_dim), int(self.hidden1), int(self.hidden2)).to(device)
            self.critic_ = _mlp(int(self.feature_dim), int(self.hidden1), int(self.hidden2)).to(device)
        self.actor_opt_ = torch.optim.Adam(self.actor_.parameters(), lr=float(self.actor_lr))
        self.critic_opt_ = torch.optim.Adam(self.critic_.parameters(), lr=float(self.critic_lr))
        image = {"policy": self.policy}
        if self.policy == "randaugment":
            image.update(num_ops=int(self.num_ops), num_magnitude_bins=int(self.num_magnitude_bins))
        elif self.policy == "trivialaugment":
            image.update(num_magnitude_bins=int(self.num_magnitude_bins))
        # only its per-(level, group) policy cells are used; crop/flip and quantisation happen here
        self.augmenter_ = BatchAugmenter({"image": image}, None, base="none", levels=int(self.levels),
                                         groups=int(self.groups))
        self.magnitudes_ = torch.zeros(int(self.n), dtype=torch.float32)
        self._acc: dict[int, dict] = {}
        return self

    def _base(self, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``train.augment`` crop/flip as uint8 (a reflect-pad gather: values stay exact integers)."""
        if self.base == "none":
            return xb
        pad = crop_pad(self.translate, xb.shape[-1])
        return random_crop_flip(xb.float(), pad, self.base == "flip_crop", gen).to(torch.uint8)

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        # the training-time logits: fc(features) times the net's output scale (airbench's 1/9), without
        # the test-time flip averaging some nets do in eval mode
        return self.model_.fc(feats).float() * float(getattr(self.model_, "scale", 1.0))

    def __call__(self, xb: torch.Tensor, idx: torch.Tensor, epoch: int, gen: torch.Generator) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 rows ``idx`` of the training set -> ``(B, C, H, W)`` normalised float
        batch augmented at the policy's magnitudes; one A2C update on the way."""
        if not hasattr(self, "model_"):
            raise RuntimeError("AdaAugment: call bind(model, y) before training")
        if xb.dtype != torch.uint8 or xb.dim() != 4:
            raise DataError("adaaugment needs uint8 image batches (B, C, H, W); it does not apply to "
                            "embeddings (train.mode 'head')")
        model, dev, b = self.model_, xb.device, len(xb)
        lam = schedule(int(epoch), int(self.epochs))
        y = self.y_[idx]
        amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
        x0 = self._base(xb, gen)  # magnitude 0: train.augment only (the paper's x^-)
        was_training = model.training
        model.eval()  # the extra forwards must not move BatchNorm running statistics
        try:
            with torch.no_grad(), torch.autocast(**amp):
                s = model.features(normalise(x0)).float()
                l_none = F.cross_entropy(self._logits(s), y, reduction="none")
            with torch.enable_grad():
                mu = torch.sigmoid(self.actor_(s)).squeeze(1)
            eps = torch.randn(b, generator=gen).to(dev)
            m = (mu.detach() + float(self.sigma) * eps).clamp(0.0, 1.0)
            m_cpu = m.double().cpu()
            # magnitude 1 (x^+) and m (x~) in one policy call and one forward of 2B rows
            mags = torch.cat([torch.ones(b, dtype=torch.float64), quantise(m_cpu, int(self.levels))])
            both = self.augmenter_.apply_policy(torch.cat([x0, x0]), mags, gen)
            with torch.no_grad(), torch.autocast(**amp):
                losses = F.cross_entropy(self._logits(model.features(normalise(both)).float()),
                                         y.repeat(2), reduction="none").view(2, b)
        finally:
            model.train(was_training)
        l_full, l_ada = losses[0], losses[1]
        r = reward(l_full, l_ada, l_none, lam)
        with torch.enable_grad():
            v = self.critic_(s).squeeze(1)
            advantage = r - v.detach()
            log_p = torch.distributions.Normal(mu, float(self.sigma)).log_prob(m)
            actor_loss = -(log_p * advantage).mean()
            critic_loss = F.mse_loss(v, r)
            self.actor_opt_.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt_.step()
            self.critic_opt_.zero_grad(set_to_none=True)
            critic_loss.backward()
            self.critic_opt_.step()
        self.magnitudes_[idx.cpu()] = m_cpu.float()
        acc = self._acc.setdefault(int(epoch), {"count": 0, "m": 0.0, "r": torch.zeros((), device=dev),
                                                "forwards": 0})
        acc["count"] += b
        acc["m"] += float(m_cpu.sum())
        acc["r"] += r.detach().sum()  # stays on the device: no sync per batch
        acc["forwards"] += 3 * b
        return normalise(both[b:])

    def epoch_stats(self, epoch: int) -> dict:
        """Summary of a 1-based ``epoch``: ``ada_lambda``, ``ada_mean_magnitude`` (mean action),
        ``ada_mean_reward``, ``ada_extra_forwards`` (extra per-sample forward passes, 3 per sample seen;
        compare with the history's ``samples_seen``)."""
        acc = self._acc.get(int(epoch))
        count = acc["count"] if acc else 0
        return {
            "ada_lambda": schedule(int(epoch), int(self.epochs)),
            "ada_mean_magnitude": acc["m"] / count if count else 0.0,
            "ada_mean_reward": float(acc["r"]) / count if count else 0.0,
            "ada_extra_forwards": acc["forwards"] if acc else 0,
        }


__all__ = ["AdaAugment", "reward", "schedule", "quantise", "POLICIES"]
