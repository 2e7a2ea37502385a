"""The method families, loaded: importing this module fills every registry of :mod:`dataopt.registry`.

It sits above the families and below the stages and the CLI. :mod:`dataopt.config` only checks the
shape of ``params.yaml`` (fast, no torch); :func:`check_methods` is the second step that checks the
method names and kwargs a loaded :class:`~dataopt.config.Params` names against the filled registries::

    params = check_methods(load_params("params.yaml", overrides))

Unknown names or kwargs raise one :class:`~dataopt.errors.ConfigError` that lists every problem and,
for each, the valid names.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

# each import registers its methods: the one list of the modules that are plug-ins (a module with a
# `@REGISTRY.register` that is missing here fails tests/test_layering.py)
import dataopt.analyze.confident  # noqa: F401  (DETECTORS)
import dataopt.analyze.mixture  # noqa: F401  (DETECTORS)
import dataopt.drift.black_box  # noqa: F401  (DRIFT_TESTS)
import dataopt.drift.classifier  # noqa: F401  (DRIFT_TESTS)
import dataopt.drift.image_stats  # noqa: F401  (DRIFT_TESTS)
import dataopt.drift.kernel  # noqa: F401  (DRIFT_TESTS)
import dataopt.drift.label_quality  # noqa: F401  (DRIFT_TESTS)
import dataopt.embed.backends  # noqa: F401  (EMBEDDERS)
import dataopt.embed.openclip  # noqa: F401  (EMBEDDERS)
import dataopt.embed.patches  # noqa: F401  (EMBEDDERS)
import dataopt.ingest.sources  # noqa: F401  (SOURCES)
import dataopt.optimize.augment.augmenters  # noqa: F401  (AUGMENTERS)
import dataopt.optimize.perturb.perturbers  # noqa: F401  (PERTURBERS)
import dataopt.optimize.prune.geometric  # noqa: F401  (SELECTORS)
import dataopt.optimize.prune.scores  # noqa: F401  (SELECTORS)
import dataopt.optimize.prune.semantic  # noqa: F401  (SELECTORS)
import dataopt.optimize.resample.resamplers  # noqa: F401  (RESAMPLERS)
import dataopt.optimize.weight.weighters  # noqa: F401  (WEIGHTERS)
import dataopt.perceive.signals  # noqa: F401  (SIGNALS)
import dataopt.train.dynamic_selection  # noqa: F401  (DYNAMIC_SELECTORS)
import dataopt.train.nets  # noqa: F401  (MODELS)
from dataopt import registry
from dataopt.config import AUTO, OPTIMIZE_FAMILIES, Params
from dataopt.errors import ConfigError
from dataopt.perceive.dynamics import perceive_models
from dataopt.profiles import PROFILES
from dataopt.train.adaaugment import AdaAugment

# AdaAugment kwargs the train stage sets itself (from the data and train.*), never from params.yaml
ADAAUGMENT_FIXED = ("n", "n_classes", "feature_dim", "epochs", "base", "seed")


def _kwargs(family: str, name: str, kwargs: Optional[dict] = None) -> None:
    getattr(registry, family).check_kwargs(name, kwargs)


def _optimize_step(step: Any) -> None:
    reg = getattr(registry, OPTIMIZE_FAMILIES[step.family])
    reg.check_kwargs(step.method, step.kwargs)  # unknown method/kwarg: the message lists the valid ones
    valid = registry.hyperparameters(reg.get(step.method))
    for key in ("ratio", "n_keep"):
        if getattr(step, key) is not None and key not in valid:
            raise ConfigError(f"method {step.method!r} takes no {key}; its kwargs: {', '.join(valid) or '(none)'}")


def _perceive_model(name: str) -> None:
    valid = perceive_models()
    if name not in valid:
        raise ConfigError(f"unknown perceive model {name!r}; valid: {', '.join(valid)}")


def _adaaugment(kwargs: dict) -> None:
    valid = [k for k in registry.hyperparameters(AdaAugment) if k not in ADAAUGMENT_FIXED]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"unknown kwargs {unknown}; valid: {', '.join(valid)}")


def _embed_backend(p: Params) -> None:
    if p.embed.backend != AUTO:
        return _kwargs("EMBEDDERS", p.embed.backend, p.embed.backend_kwargs())
    if p.embed.backend_kwargs():  # auto may pick either backend: kwargs meant for one would misfire
        raise ConfigError(f"embed.kwargs / model / pretrained need a named embed.backend, not 'auto' (it "
                          f"picks {' or '.join(sorted({v['embed.backend'] for v in PROFILES.values()}))} "
                          f"per machine); got {sorted(p.embed.backend_kwargs())}")


def _checks(p: Params) -> list[tuple[str, Callable[[], None]]]:
    """``(where, check)`` for every method name params.yaml gives, in the order of the file."""
    checks = [
        ("ingest.source", lambda: _kwargs("SOURCES", p.ingest.source)),
        ("embed.backend", lambda: _embed_backend(p)),
        ("perceive.model", lambda: _perceive_model(p.perceive.model)),
    ]
    checks += [("perceive.signals", lambda n=n: _kwargs("SIGNALS", n)) for n in p.perceive.signals or []]
    checks += [(f"perceive.signal_kwargs.{n}", lambda n=n, kw=kw: _kwargs("SIGNALS", n, kw))
               for n, kw in p.perceive.signal_kwargs.items()]
    checks.append(("analyze.detector", lambda: _kwargs("DETECTORS", p.analyze.detector, p.analyze.kwargs)))
    checks += [("optimize.method", lambda: _kwargs("SELECTORS", p.optimize.method, p.optimize.kwargs)),
               ("optimize.weighting", lambda: _kwargs("WEIGHTERS", p.optimize.weighting,
                                                      p.optimize.weighting_kwargs))]
    checks += [(f"optimize.steps.{i} ({s.family} {s.method})", lambda s=s: _optimize_step(s))
               for i, s in enumerate(p.optimize.steps or [])]
    checks.append(("train.model", lambda: _kwargs("MODELS", p.train.model)))
    if p.train.dynamic.method != "none":
        checks.append(("train.dynamic", lambda: _kwargs("DYNAMIC_SELECTORS", p.train.dynamic.method,
                                                        p.train.dynamic.kwargs)))
    if p.train.adaaugment.kwargs:
        checks.append(("train.adaaugment.kwargs", lambda: _adaaugment(p.train.adaaugment.kwargs)))
    checks += [("drift.tests", lambda n=n: _kwargs("DRIFT_TESTS", n)) for n in p.drift.tests]
    checks += [("drift.effect_floor", lambda n=n: _kwargs("DRIFT_TESTS", n)) for n in p.drift.effect_floor]
    checks += [(f"drift.kwargs.{n}", lambda n=n, kw=kw: _kwargs("DRIFT_TESTS", n, kw))
               for n, kw in p.drift.kwargs.items()]
    return checks


def check_methods(params: Params) -> Params:
    """Check every method name and its kwargs in ``params`` against the registries; return ``params``.

    Raises :class:`ConfigError` ("invalid params:" and one line per problem, each listing the valid
    names or kwargs), the same message the schema gives for its own errors.
    """
    problems = []
    for where, check in _checks(params):
        try:
            check()
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise ConfigError("invalid params:\n  " + "\n  ".join(problems))
    return params
