"""bench/stream.py: the stream's batches are disjoint and shifted as declared, and the loop policy
keeps the flow's bookkeeping (a promoted challenger's batches are trained on, a harmful one's are
dropped for good, a merely unproven one's are deferred to the next retrain), on small synthetic embeddings."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
stream = pytest.importorskip("stream")


def _data(n_pool: int = 1000, n_corrupt: int = 500, dim: int = 8, seed: int = 0) -> dict:
    """Arrays shaped like bench/drift.py's cache: a balanced pool, half of it also corrupted."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_pool // 10)
    rows = np.sort(rng.choice(n_pool, n_corrupt, replace=False))
    d = {"pool_labels": labels, "pool_human": labels.copy(), "corrupt_rows": rows,
         "pool_emb": rng.normal(size=(n_pool, dim)).astype(np.float32),
         "pool_images": rng.integers(0, 255, (n_pool, 4, 4, 3), dtype=np.uint8)}
    d["pool_human"][::5] = (labels[::5] + 1) % 10  # 20 % wrong "human" labels
    for name in {arg for _, kind, arg in stream.STREAM if kind == "corrupt"}:
        d[f"{name}_emb"] = d["pool_emb"][rows] + 5.0  # a corrupted copy: shifted embeddings
        d[f"{name}_images"] = d["pool_images"][rows]
    return d


def test_batches_are_disjoint_and_shifted_as_declared():
    d = _data()
    batches = stream.make_stream(d, batch_size=100, holdout=0.2, seed=0)
    assert [b["name"] for b in batches] == [name for name, _, _ in stream.STREAM]
    # no pool row is in two batches: every batch's rows, identified by their clean embedding, differ
    seen: set = set()
    for b in batches:
        assert len(b["labels"]) == 100 and b["train"].sum() == 80
        if b["kind"] == "corrupt":
            assert b["embeddings"].mean() > 4.0  # the corrupted copy, not the clean rows
            keys = {tuple(np.round(e - 5.0, 4)) for e in b["embeddings"]}
        else:
            keys = {tuple(np.round(e, 4)) for e in b["embeddings"]}
        assert not keys & seen
        seen |= keys
    by_name = {b["name"]: b for b in batches}
    assert by_name["clean_1"]["noise"] == 0.0
    assert 0.1 < by_name["human_labels"]["noise"] < 0.3  # the human column, as given
    assert by_name["human+flips"]["noise"] > by_name["human_labels"]["noise"] + 0.05
    prior = np.bincount(by_name["prior"]["clean"], minlength=10)
    assert prior[list(stream.PRIOR_CLASSES)].max() < prior.min(where=np.isin(np.arange(10), stream.PRIOR_CLASSES,
                                                                             invert=True), initial=100)


class _Model:
    def __init__(self, correct: float):
        self.correct = correct

    def predict(self, x):
        y = np.arange(len(x)) % 10
        wrong = np.arange(len(x)) >= int(self.correct * len(x))
        return np.where(wrong, (y + 1) % 10, y)


@pytest.mark.parametrize("harmful", [False, True])
def test_loop_policy_defers_unproven_and_drops_harmful_batches(monkeypatch, harmful):
    xf, yf = np.zeros((1000, 2)), np.arange(1000) % 10
    # the first challenger is no better (not proven: deferred) or much worse (harm: rejected for good),
    # the second much better than the champion
    quality = iter([0.40 if harmful else 0.50, 0.60])
    monkeypatch.setattr(stream, "train_on", lambda parts, curate, compute, seed: (
        _Model(next(quality)), {"rows": sum(int(p["train"].sum()) for p in parts), "parts": [p["name"] for p in parts]}))
    policy = stream.LoopPolicy(_Model(0.50))
    batch = lambda name: {"name": name, "train": np.ones(10, bool)}  # noqa: E731
    ref = batch("reference")
    assert policy.step(ref, batch("a"), False, xf, yf, 0) == {"trigger": None}  # no drift: waits
    out = policy.step(ref, batch("b"), True, xf, yf, 0)
    assert out["batches"] == ["a", "b"] and not out["promoted"] and "rejected" in out["reason"]
    assert stream.outcome(out) == ("rejected" if harmful else "deferred")
    assert bool(out["harm"]) == harmful and (not harmful or "significantly lower" in out["harm"])
    assert [w["name"] for w in policy.waiting] == ([] if harmful else ["a", "b"])
    assert [w["name"] for w in policy.rejected] == (["a", "b"] if harmful else [])
    out = policy.step(ref, batch("c"), True, xf, yf, 0)
    assert out["promoted"] and out["batches"] == (["c"] if harmful else ["a", "b", "c"])
    assert stream.outcome(out) == "promoted"
    assert [w["name"] for w in policy.accepted] == out["batches"] and policy.waiting == []
