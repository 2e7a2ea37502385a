"""EMBED stage: embeddings, the faiss kNN graph, meta.json, errors."""
from __future__ import annotations

import numpy as np
import pytest

from dataopt.config import validate
from dataopt.embed.backends import PixelsEmbedder, ProxyEmbedder
from dataopt.embed.base import Embedder, check_finite
from dataopt.embed.knn import knn_search
from dataopt.errors import ConfigError, DataError, MissingArtifactError
from dataopt.io import load_npy, read_json, save_npy
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.registry import EMBEDDERS
from dataopt.stages import embed as embed_stage
from dataopt.stages import run_stage


def _params(**embed):
    return check_methods(validate({"embed": embed}))


def _brute_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, 1)


def test_pixels_artifacts_shapes_and_contract(digits_ingested: Paths):
    metrics = run_stage("embed", _params(), digits_ingested)
    out = digits_ingested.artifacts / "embed"
    emb = load_npy(out / "embeddings.npy")
    assert emb.dtype == np.float16 and emb.shape == (600, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    import pyarrow.parquet as pq

    samples = pq.read_table(digits_ingested.artifacts / "ingest" / "samples.parquet").to_pandas()
    train_ids = samples.sample_id[samples.split == "train"].to_numpy()
    with np.load(out / "knn.npz") as z:
        sid, idx, dist = z["sample_id"], z["indices"], z["distances"]
    assert sid.dtype == np.int64 and np.array_equal(sid, train_ids)
    assert idx.dtype == np.int64 and idx.shape == (len(train_ids), 10)
    assert dist.dtype == np.float32 and dist.shape == idx.shape
    assert (idx != np.arange(len(idx))[:, None]).all()  # never its own neighbour
    assert (np.diff(dist, axis=1) >= 0).all()
    # distances are those of the stored float16 train embeddings
    z_train = emb[samples.split.to_numpy() == "train"].astype(np.float32)
    np.testing.assert_allclose(dist, np.linalg.norm(z_train[:, None] - z_train[idx], axis=-1), atol=1e-4)

    meta = read_json(out / "meta.json")
    assert meta["backend"] == "pixels" and meta["dim"] == 64 and meta["n"] == 600
    assert meta["dtype"] == "float16" and meta["device"] == "cpu" and meta["faiss_version"]
    assert meta["kwargs"]["dim"] == 64 and meta["features"]["fitted_on"] == "train"
    assert {"load", "fit", "transform", "knn", "write", "total"} <= set(meta["seconds"])
    assert set(metrics) >= {"dim", "n", "seconds", "images_per_s"} and metrics["images_per_s"] > 0
    assert read_json(out / "metrics.json")["dim"] == 64
    assert meta["knn"]["backend"] == "faiss-cpu exact" and meta["knn"]["k"] == 10


def test_pca_is_fitted_on_train_rows_only_and_deterministic(digits_ingested: Paths):
    run_stage("embed", _params(), digits_ingested)
    first = load_npy(digits_ingested.artifacts / "embed" / "embeddings.npy", mmap=False)
    run_stage("embed", _params(), digits_ingested)
    again = load_npy(digits_ingested.artifacts / "embed" / "embeddings.npy", mmap=False)
    assert np.array_equal(first, again)

    import pyarrow.parquet as pq

    split = pq.read_table(digits_ingested.artifacts / "ingest" / "samples.parquet").column("split")
    test = np.asarray(split.to_pylist()) == "test"
    images_path = digits_ingested.artifacts / "ingest" / "images.npy"
    images = load_npy(images_path, mmap=False).copy()
    images[test] = np.random.default_rng(1).integers(0, 256, images[test].shape, dtype=np.uint8)
    save_npy(images_path, images)
    run_stage("embed", _params(), digits_ingested)
    changed = load_npy(digits_ingested.artifacts / "embed" / "embeddings.npy", mmap=False)
    assert np.array_equal(changed[~test], first[~test])  # test rows never shape the representation
    assert not np.array_equal(changed[test], first[test])


def test_knn_matches_brute_force_blockwise():
    x = np.random.default_rng(0).normal(size=(150, 6)).astype(np.float32)
    idx, dist = knn_search(x, 7, block=32)  # several blocks, the last one partial
    ref_idx, ref_dist = _brute_knn(x.astype(np.float64), 7)
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)


def test_knn_excludes_self_among_exact_duplicates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 4)).astype(np.float32)
    x = np.repeat(base, 6, axis=0)  # each point 6 times: more copies than k + 1
    idx, dist = knn_search(x, 3)
    rows = np.arange(len(x))[:, None]
    assert (idx != rows).all()
    assert (idx // 6 == rows // 6).all()  # the neighbours are the row's own copies
    assert np.allclose(dist, 0.0, atol=1e-3)
    srt = np.sort(idx, 1)
    assert (srt[:, 1:] != srt[:, :-1]).all()  # distinct neighbours


def test_knn_k_is_clipped_to_train_size(digits_writer, tmp_path):
    paths = digits_writer(tmp_path, n=20, test_fraction=0.5)
    run_stage("embed", _params(knn_k=50, kwargs={"dim": 4}), paths)
    with np.load(paths.artifacts / "embed" / "knn.npz") as z:
        assert z["indices"].shape == (10, 9)
        assert all((np.sort(row) == np.delete(np.arange(10), i)).all() for i, row in enumerate(z["indices"]))
    meta = read_json(paths.artifacts / "embed" / "meta.json")
    assert meta["knn"]["k"] == 9 and meta["knn"]["k_requested"] == 50
    assert meta["dim"] == 4
    with pytest.raises(DataError, match="k <= n - 1"):
        knn_search(np.zeros((3, 2), np.float32), 3)


def test_proxy_backend(digits_ingested: Paths):
    params = _params(backend="proxy", kwargs={"epochs": 1, "width": 4, "batch_size": 64})
    metrics = run_stage("embed", params, digits_ingested)
    emb = load_npy(digits_ingested.artifacts / "embed" / "embeddings.npy", mmap=False)
    assert emb.dtype == np.float16 and emb.shape == (600, 16) and metrics["dim"] == 16
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    meta = read_json(digits_ingested.artifacts / "embed" / "meta.json")
    assert meta["backend"] == "proxy" and meta["kwargs"]["width"] == 4
    assert "trained on the train split" in meta["features"]["features"]
    run_stage("embed", params, digits_ingested)  # deterministic on the CPU
    assert np.array_equal(emb, load_npy(digits_ingested.artifacts / "embed" / "embeddings.npy", mmap=False))


class _NaNEmbedder(Embedder):
    """Test double: embeds every third row as NaN."""

    def __init__(self, transform_batch_size: int = 512, random_state: int = 0):
        self.transform_batch_size = transform_batch_size
        self.random_state = random_state

    def fit(self, images, labels=None, n_classes=None):
        self.dim_, self.device_, self.info_ = 3, "cpu", {}
        self._seen = 0
        return self

    def _embed(self, block):
        out = np.ones((len(block), 3), np.float32)
        rows = np.arange(self._seen, self._seen + len(block))
        out[rows % 3 == 0] = np.nan
        self._seen += len(block)
        return out


def test_nan_embeddings_raise_data_error_naming_sample_ids(digits_ingested: Paths, monkeypatch):
    monkeypatch.setitem(EMBEDDERS._items, "nan_test", _NaNEmbedder)
    with pytest.raises(DataError, match=r"200 row\(s\) are not finite.*sample_id 0, 3, 6, 9") as err:
        run_stage("embed", _params(backend="nan_test"), digits_ingested)
    assert "and 190 more" in str(err.value)
    assert not (digits_ingested.artifacts / "embed" / "embeddings.npy").exists()

    x = np.ones((4, 2))
    x[2, 1] = np.inf
    with pytest.raises(DataError, match="sample_id 12$"):
        check_finite(x, np.array([10, 11, 12, 13]))


def test_missing_ingest_artifact_names_the_stage(tmp_path):
    with pytest.raises(MissingArtifactError, match="'ingest' stage"):
        run_stage("embed", _params(), Paths.at(tmp_path))


def test_images_rows_must_match_samples(digits_ingested: Paths):
    images_path = digits_ingested.artifacts / "ingest" / "images.npy"
    save_npy(images_path, load_npy(images_path, mmap=False)[:-1])
    with pytest.raises(DataError, match="599 rows but samples.parquet has 600"):
        run_stage("embed", _params(), digits_ingested)


def test_unknown_backend_kwarg_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown kwargs \\['depth'\\]; valid: dim"):
        _params(kwargs={"depth": 3})
    with pytest.raises(ConfigError, match="unknown embedder method 'clipz'"):
        _params(backend="clipz")
    with pytest.raises(ConfigError, match="embed.kwargs.dim must be >= 1"):
        PixelsEmbedder(dim=0).fit(np.zeros((4, 2, 2, 3), np.uint8))
    with pytest.raises(DataError, match="trains on labels"):
        ProxyEmbedder().fit(np.zeros((4, 8, 8, 3), np.uint8))


def test_stage_reports_planted_duplicate_groups(digits_ingested: Paths):
    # copy train image 0 over train images 1 and 2: one exact-duplicate group of three sample ids
    import pyarrow.parquet as pq

    samples = pq.read_table(digits_ingested.artifacts / "ingest" / "samples.parquet").to_pandas()
    train = np.flatnonzero(samples["split"].to_numpy() == "train")
    images_path = digits_ingested.artifacts / "ingest" / "images.npy"
    images = load_npy(images_path, mmap=False).copy()
    images[train[1]] = images[train[2]] = images[train[0]]
    np.save(images_path, images)
    metrics = run_stage("embed", _params(), digits_ingested)
    dup = read_json(digits_ingested.artifacts / "embed" / "duplicates.json")
    planted = sorted(samples["sample_id"].to_numpy()[train[:3]].tolist())
    assert planted in [sorted(g) for g in dup["exact"]["groups"]]
    assert metrics["exact_duplicate_groups"] == dup["exact"]["n_groups"] >= 1
    assert read_json(digits_ingested.artifacts / "embed" / "meta.json")["duplicates"]["n_groups"] >= 1
