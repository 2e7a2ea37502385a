"""Plug-in registries: methods registered by name, built from ``params.yaml`` with checked kwargs.

A method is a class in the scikit-learn manner: ``__init__`` only stores keyword hyper-parameters
(and ``random_state``), ``fit`` returns ``self``, fitted state ends in ``_``, and the class declares the
inputs it needs in ``requires``. Unknown names or kwargs are errors that list the valid ones.

A leaf: it imports nothing of dataopt but :mod:`dataopt.errors` (itself a leaf). The registries are
filled by importing the method modules, which :mod:`dataopt.plugins` does.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from dataopt.errors import ConfigError


def hyperparameters(cls: type) -> list[str]:
    """Names of the keyword hyper-parameters accepted by ``cls.__init__``."""
    sig = inspect.signature(cls.__init__)
    return [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def get_params(obj: Any) -> dict[str, Any]:
    """The hyper-parameters of a method instance, as stored by its ``__init__``."""
    return {name: getattr(obj, name) for name in hyperparameters(type(obj))}


class Registry:
    """A named family of methods (``SELECTORS``, ``EMBEDDERS``, ...)."""

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.family}: {name!r} is registered twice")
            self._items[name] = obj
            try:
                obj.registered_name = name
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> Any:
        if not self._items:  # a programming error, not the user's: nothing imported the method modules
            raise RuntimeError(f"no {self.family} method is registered: import dataopt.plugins first")
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.family} method {name!r}; valid: {', '.join(self.names())}"
            )
        return self._items[name]

    def check_kwargs(self, name: str, kwargs: dict[str, Any] | None) -> None:
        cls = self.get(name)
        if not inspect.isclass(cls):
            return
        valid = hyperparameters(cls)
        unknown = sorted(set(kwargs or {}) - set(valid))
        if unknown:
            raise ConfigError(
                f"{self.family} method {name!r} got unknown kwargs {unknown}; "
                f"valid: {', '.join(valid) or '(none)'}"
            )

    def build(self, name: str, kwargs: dict[str, Any] | None = None, **extra: Any) -> Any:
        """Instantiate method ``name`` with ``kwargs`` (checked) plus trusted ``extra`` kwargs."""
        self.check_kwargs(name, kwargs)
        cls = self.get(name)
        valid = hyperparameters(cls) if inspect.isclass(cls) else list(extra)
        merged = {k: v for k, v in extra.items() if k in valid}
        merged.update(kwargs or {})
        return cls(**merged)


SOURCES = Registry("ingest source")
EMBEDDERS = Registry("embedder")
SIGNALS = Registry("signal")
DETECTORS = Registry("detector")
RESAMPLERS = Registry("resampler")
AUGMENTERS = Registry("augmenter")
PERTURBERS = Registry("perturber")
WEIGHTERS = Registry("weighter")
SELECTORS = Registry("selector")
DYNAMIC_SELECTORS = Registry("dynamic selector")
MODELS = Registry("model")
DRIFT_TESTS = Registry("drift test")

