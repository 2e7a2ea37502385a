"""Label handling: class names, label encoding, stratified split, synthetic label noise, sample ids."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np

from dataopt.errors import ConfigError, DataError

MISSING, UNKNOWN = -1, -2
# integer-like text: optional sign, decimal digits of any script (int() reads them), optional ".0"
_INT = re.compile(r"^[+-]?\d+(?:\.0*)?$")
_MISSING_TEXT = {"", "none", "nan", "null"}


def normalise(v: Any) -> Any:
    """The label value ``v`` as None (missing), an int, or a stripped string.

    Whitespace is stripped; ``None``, NaN and the strings "", "None", "nan", "null" (any case) are
    missing; integers, integer-valued floats and integer-like strings ("1", "01", "+1", "1.0", "\u0661")
    become the same int. Anything else (e.g. "1e3", "1_000", "1.5") stays a string class.
    """
    if v is None or isinstance(v, (bool, np.bool_)):
        return None if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return None
        return int(v) if float(v).is_integer() else str(v)
    s = str(v).strip()
    if s.lower() in _MISSING_TEXT:
        return None
    if _INT.match(s):
        try:
            return int(s.split(".", 1)[0])
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            return s
    return s


def _is_missing(v: Any) -> bool:
    return normalise(v) is None


def label_kind(values: Sequence[Any], classes: Optional[list[str]] = None) -> str:
    """"int" when every present label is integer-like (and, with declared ``classes``, none is
    literally one of the class names), else "str"."""
    keys = [k for k in map(normalise, values) if k is not None]
    if classes:
        declared = {str(normalise(c)) for c in classes}
        if any(isinstance(v, str) and str(normalise(v)) in declared for v in values):
            return "str"
    return "int" if all(isinstance(k, int) for k in keys) else "str"


def _bound(k: int, max_classes: int, column: str) -> None:
    if k > max_classes:
        raise DataError(f"label column {column!r}: integer labels up to {k - 1} mean {k} classes, more than "
                        f"ingest.max_classes={max_classes}; fix the labels, declare ingest.classes, or raise "
                        f"ingest.max_classes")


def class_names(
    labels: Sequence[Any],
    kind: str,
    classes: Optional[list[str]],
    names: Optional[Sequence[Any]] = None,
    other_labels: Optional[Sequence[Any]] = None,
    max_classes: int = 1000,
    column: str = "label",
) -> list[str]:
    """Class names, in label-index order.

    ``classes`` wins; then, for int labels, the per-row ``names`` column (the majority name of each int,
    taken from whichever of ``labels`` / ``other_labels`` agrees best with the names: a file may carry
    noisy labels next to names that describe its clean labels); else sorted distinct string labels, or
    ``"0".."K-1"`` for int labels without names. More than ``max_classes`` classes raise DataError
    (naming ``column``) before anything per class is built.
    """
    if classes:
        if len(classes) > max_classes:
            raise DataError(f"ingest.classes has {len(classes)} names, more than ingest.max_classes={max_classes}")
        keys = [str(normalise(c)) for c in classes]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"ingest.classes has repeated names (after normalisation): {classes}")
        return list(classes)
    present = [k for k in map(normalise, labels) if k is not None]
    if kind == "str":
        distinct = {str(k) for k in present}
        if len(distinct) > max_classes:
            raise DataError(f"label column {column!r}: {len(distinct)} distinct labels, more than "
                            f"ingest.max_classes={max_classes}; fix the labels or raise ingest.max_classes")
        return sorted(distinct)
    ints = [k for k in present if k >= 0]
    k = max(ints) + 1 if ints else 0
    _bound(k, max_classes, column)
    mapping: dict[int, str] = {}
    if names is not None:
        best, best_share = {}, -1.0
        for cand in (labels, other_labels):
            if cand is None:
                continue
            pairs = Counter(
                (normalise(l), str(n)) for l, n in zip(cand, names)
                if not _is_missing(n) and isinstance(normalise(l), int)
            )
            major: dict[int, tuple[str, int]] = {}
            for (l, n), c in pairs.items():
                if l not in major or c > major[l][1] or (c == major[l][1] and n < major[l][0]):
                    major[l] = (n, c)
            total = sum(pairs.values())
            share = sum(c for _, c in major.values()) / total if total else 0.0
            if share > best_share:
                best, best_share = {l: n for l, (n, _) in major.items()}, share
        mapping = {l: n for l, n in best.items() if l >= 0}
        if mapping:
            k = max(k, max(mapping) + 1)
            _bound(k, max_classes, column)
    return [mapping.get(i, str(i)) for i in range(k)]


def encode(values: Sequence[Any], kind: str, names: list[str]) -> np.ndarray:
    """Labels as class indices into ``names``, after :func:`normalise`.

    Returns
    -------
    ndarray, shape (n,), int64
        Index, or :data:`MISSING` (-1) for an absent label, :data:`UNKNOWN` (-2) for one not in ``names``.
    """
    lookup = {str(normalise(n)): i for i, n in enumerate(names)}
    k = len(names)
    out = np.empty(len(values), dtype=np.int64)
    for j, v in enumerate(values):
        key = normalise(v)
        if key is None:
            out[j] = MISSING
        elif kind == "int":
            out[j] = key if isinstance(key, int) and 0 <= key < k else UNKNOWN
        else:
            out[j] = lookup.get(str(key), UNKNOWN)
    return out


def hash64(keys: Sequence[str], salt: str = "") -> np.ndarray:
    """blake2b of each key (8 bytes, masked to 63 bits) -> non-negative int64, shape (n,)."""
    digests = b"".join(hashlib.blake2b((salt + k).encode(), digest_size=8).digest() for k in keys)
    return (np.frombuffer(digests, dtype="<u8") & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)


def sample_ids(splits: Sequence[str], keys: Sequence[str]) -> np.ndarray:
    """Stable int64 id of each (split, source reference); raises DataError on a collision."""
    ids = hash64([f"{s}\x1f{k}" for s, k in zip(splits, keys)])
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        rows = np.flatnonzero(ids == dup)[:2]
        raise DataError(
            f"sample_id collision: {keys[rows[0]]!r} ({splits[rows[0]]}) and {keys[rows[1]]!r} "
            f"({splits[rows[1]]}) hash to {dup}; make the source references (paths or ids) unique"
        )
    return ids


def stratified_split(labels: np.ndarray, keys: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """Seeded stratified train/test split.

    Within each class, rows are ordered by a seeded hash of their source reference and the first
    ``round(n_c * test_fraction)`` go to test (at most n_c - 1, so each class keeps a train sample).
    Hashing instead of drawing a permutation keeps a sample's split stable when others are added.

    Returns
    -------
    ndarray, shape (n,), bool
        True for test rows.
    """
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=bool)
    u = hash64(keys, salt=f"split:{seed}:")
    order = np.lexsort((u, labels))
    _, start, counts = np.unique(labels[order], return_index=True, return_counts=True)
    rank = np.arange(n) - np.repeat(start, counts)
    n_test = np.minimum(np.floor(counts * test_fraction + 0.5).astype(np.int64), counts - 1)
    is_test = np.empty(n, dtype=bool)
    is_test[order] = rank < np.repeat(n_test, counts)
    return is_test


def inject_noise(labels: np.ndarray, n_classes: int, kind: str, rate: float, seed: int) -> np.ndarray:
    """Synthetic label noise.

    ``symmetric``: with probability ``rate`` a label moves to a uniformly drawn *other* class;
    ``pair``: with probability ``rate`` class c moves to (c + 1) mod K.

    Parameters
    ----------
    labels : ndarray, shape (n,), int64 in [0, n_classes)

    Returns
    -------
    ndarray, shape (n,), int64
        The noisy labels (a new array).
    """
    if kind == "none" or rate == 0.0:
        return labels.copy()
    if n_classes < 2:
        raise ConfigError(f"ingest.noise.kind={kind!r} needs at least 2 classes; the data has {n_classes}")
    rng = np.random.default_rng(seed)
    flip = rng.random(len(labels)) < rate
    if kind == "symmetric":
        shift = rng.integers(1, n_classes, size=len(labels))  # 1..K-1: never the same class
    elif kind == "pair":
        shift = np.ones(len(labels), dtype=np.int64)
    else:
        raise ConfigError(f"ingest.noise.kind: unknown kind {kind!r}; valid: none, symmetric, pair")
    return np.where(flip, (labels + shift) % n_classes, labels).astype(np.int64)
