"""Where a project keeps its inputs and each stage's outputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataopt.errors import ConfigError


@dataclass(frozen=True)
class Paths:
    """Paths of one dataopt project (the folder holding ``params.yaml``)."""

    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> "Paths":
        return cls(Path(root).resolve())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def stage(self, name: str) -> Path:
        """``artifacts/<name>/``, created on demand."""
        d = self.artifacts / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def resolve(self, p: str | Path | None) -> Path | None:
        """A user path from params.yaml, relative to the project root."""
        if p is None:
            return None
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()


def check_sources(params: Any, paths: Paths) -> None:
    """ConfigError naming the key when the raw source's ``ingest.path`` / ``ingest.eval_path`` is missing.

    Cheap (no data is read), so ``dataopt run`` checks it before Prefect starts; the ingest stage still
    validates everything inside the files.
    """
    cfg = params.ingest
    if cfg.source != "sklearn_digits" and cfg.path is None:
        raise ConfigError(f"ingest.path is required for ingest.source {cfg.source!r}")
    for key in ("path", "eval_path"):
        value = getattr(cfg, key)
        if value is not None and not paths.resolve(value).exists():
            raise ConfigError(f"ingest.{key}: {paths.resolve(value)} does not exist")
