"""Where a project keeps its inputs and each stage's outputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
