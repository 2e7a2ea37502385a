"""kNN graph (faiss exact / IVF, torch brute force) and duplicate groups."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from dataopt.embed import knn as knn_mod
from dataopt.embed.duplicates import duplicate_groups
from dataopt.embed.knn import default_nlist, drop_self, faiss_threads, knn_graph, knn_search
from dataopt.errors import ConfigError, DataError


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, 1)


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d))
    return _unit(centres[rng.integers(0, 50, n)] + 0.6 * rng.normal(size=(n, d)))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_equals_numpy_brute_force(metric):
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    if metric == "ip":
        x = _unit(x)
    idx, dist, info = knn_graph(x, 8, metric=metric, use_gpu=False)
    ref_idx, ref_dist = _brute(x, 8)
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and idx.shape == (300, 8)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-5)
    assert info["backend"] == "faiss-cpu exact" and info["device"] == "cpu"
    assert info["index"] == ("IndexFlatIP" if metric == "ip" else "IndexFlatL2")
    assert info["k"] == 8 and info["metric"] == metric and info["seconds"] >= 0


def test_ip_distances_are_sqrt_2_minus_2cos_for_unit_rows():
    x = _unit(np.random.default_rng(1).normal(size=(200, 16)))
    idx, dist, _ = knn_graph(x, 5)
    cos = (x[:, None, :] * x[idx]).sum(-1)
    np.testing.assert_allclose(dist, np.sqrt(np.maximum(0, 2 - 2 * cos)), atol=1e-4)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_ivf_recall_against_exact_on_clustered_data():
    x = _clustered(20_000, 64)
    exact_idx, exact_dist, _ = knn_graph(x, 10, exact_max=len(x))
    idx, dist, info = knn_graph(x, 10, exact_max=10_000, seed=3)
    assert info["backend"] == "faiss-cpu IVF" and info["index"] == "IndexIVFFlat"
    assert info["nlist"] == default_nlist(20_000) == 512 and info["nprobe"] == 32
    hits = (idx[:, :, None] == exact_idx[:, None, :]).any(-1).sum()
    assert hits / exact_idx.size >= 0.95
    assert (idx != np.arange(len(x))[:, None]).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    # the distances are exact for whatever neighbours IVF found: never below the true k-th best
    assert (dist[:, -1] >= exact_dist[:, -1] - 1e-6).all()
    again = knn_graph(x, 10, exact_max=10_000, seed=3)[0]
    assert np.array_equal(idx, again)  # seeded training sample: reproducible


def test_ivf_rows_with_too_few_results_search_every_list():
    x = _clustered(400, 8, seed=2)
    # 200 lists of ~2 rows and nprobe=1: most rows see fewer than k + 1 rows in their one list
    idx, dist, info = knn_graph(x, 10, exact_max=0, nlist=200, nprobe=1)
    assert info["n_rows_searched_all_lists"] > 0
    assert (idx >= 0).all() and (idx != np.arange(400)[:, None]).all()
    assert np.isfinite(dist).all()


@pytest.mark.parametrize("exact_max", [10_000, 0])
def test_self_excluded_among_exact_duplicates(exact_max):
    base = _unit(np.random.default_rng(0).normal(size=(40, 6)))
    x = np.repeat(base, 6, axis=0)  # each point 6 times: more copies than k + 1
    idx, dist, _ = knn_graph(x, 3, exact_max=exact_max, nlist=4)
    rows = np.arange(len(x))[:, None]
    assert (idx != rows).all()
    assert (idx // 6 == rows // 6).all()  # the neighbours are the row's own copies
    assert (dist == 0).all()  # recomputed from the rows: identical vectors are exactly 0 apart
    srt = np.sort(idx, 1)
    assert (srt[:, 1:] != srt[:, :-1]).all()


def test_drop_self_removes_exactly_one_entry():
    idx = np.array([[5, 0, 7], [3, 4, 6], [2, 8, 9]])  # row 0 lists itself; rows 1, 2 do not / do
    out = drop_self(idx, 0)
    assert out.tolist() == [[5, 7], [3, 4], [8, 9]]
    assert drop_self(np.array([[9, 3, 1]]), 0, rows=np.array([3])).tolist() == [[9, 1]]


def test_blockwise_equals_one_shot():
    x = _unit(np.random.default_rng(4).normal(size=(257, 10)))
    one = knn_graph(x, 6, block=10_000)
    blocks = knn_graph(x, 6, block=32)  # several blocks, the last one partial
    assert np.array_equal(one[0], blocks[0]) and np.array_equal(one[1], blocks[1])
    ivf_one = knn_graph(x, 6, exact_max=0, nlist=4, block=10_000)
    ivf_blocks = knn_graph(x, 6, exact_max=0, nlist=4, block=50)
    assert np.array_equal(ivf_one[0], ivf_blocks[0])


def test_k_is_clipped_to_n_minus_1_and_errors():
    x = _unit(np.random.default_rng(5).normal(size=(10, 4)))
    idx, dist, info = knn_graph(x, 50)
    assert idx.shape == dist.shape == (10, 9)
    assert info["k"] == 9 and info["k_requested"] == 50
    assert all((np.sort(row) == np.delete(np.arange(10), i)).all() for i, row in enumerate(idx))
    with pytest.raises(DataError, match="at least 2 rows"):
        knn_graph(x[:1], 3)
    with pytest.raises(ConfigError, match="metric"):
        knn_graph(x, 3, metric="cosine")
    with pytest.raises(DataError, match="k <= n - 1"):  # the strict backbone API keeps its check
        knn_search(x, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_brute_force_path_equals_faiss_exact(metric, dtype):
    x = np.random.default_rng(6).normal(size=(500, 32)).astype(np.float32)
    if metric == "ip":
        x = _unit(x)
    ref_idx, ref_dist, _ = knn_graph(x, 7, metric=metric, use_gpu=False)
    # block=64 with several score blocks; float16 scores are reranked in float32
    idx, dist = knn_mod._torch_exact(x, 7, metric, torch.device("cpu"), dtype, block=64)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-5)
    dup = np.repeat(x[:20], 5, axis=0)
    idx, dist = knn_mod._torch_exact(dup, 3, metric, torch.device("cpu"), dtype, block=16)
    rows = np.arange(len(dup))[:, None]
    assert (idx != rows).all() and (idx // 5 == rows // 5).all() and (dist == 0).all()


def test_gpu_dispatch_records_the_backend(monkeypatch):
    x = _unit(np.random.default_rng(7).normal(size=(120, 8)))
    if not torch.cuda.is_available() and faiss.get_num_gpus() == 0:
        with pytest.raises(ConfigError, match="no GPU is visible"):
            knn_graph(x, 4, use_gpu=True)
        assert knn_graph(x, 4)[2]["backend"] == "faiss-cpu exact"  # auto: the CPU, and it says so
    assert knn_graph(x, 4, use_gpu="cpu")[2]["backend"] == "faiss-cpu exact"  # embed.knn_device
    # the torch GPU branch, run on the CPU: same answer, and the info names the path
    monkeypatch.setattr(knn_mod, "gpu_backend", lambda use_gpu=None: "torch")
    monkeypatch.setattr(knn_mod, "TORCH_GPU_DEVICE", "cpu")
    idx, dist, info = knn_graph(x, 4, use_gpu=True)
    assert info["backend"] == "torch-cpu exact" and "float16" in info["index"]
    ref = knn_graph(x, 4, use_gpu=False)
    assert np.array_equal(idx, ref[0]) and np.allclose(dist, ref[1], atol=1e-6)


def test_faiss_threads_follow_available_cores_and_restore():
    before = faiss.omp_get_max_threads()
    with faiss_threads(1) as n:
        assert n == 1 and faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
    assert knn_graph(_unit(np.eye(5, 3) + 0.1), 2)[2]["threads"] == knn_mod.available_cores()


def test_duplicate_groups_planted_exact_and_near():
    rng = np.random.default_rng(8)
    x = _unit(rng.normal(size=(300, 16)))  # distinct points: pairwise distances ~1.4
    x[10] = x[3]  # exact pair
    x[250] = x[3]  # ... and a third copy
    x[77] = _unit(x[20:21] + 0.005 * rng.normal(size=(1, 16)))[0]  # near duplicate of 20
    x[78] = _unit(x[77:78] + 0.005 * rng.normal(size=(1, 16)))[0]  # near duplicate of 77 (chain)
    sid = np.arange(300, dtype=np.int64) * 10 + 1000
    idx, dist, _ = knn_graph(x, 5)
    rep = duplicate_groups(idx, dist, 0.1, sid)
    assert rep["threshold"] == 0.1 and rep["n_groups"] == 2 and rep["n_samples_in_groups"] == 6
    assert rep["groups"] == [[1030, 1100, 3500], [1200, 1770, 1780]]  # largest first, ids ascending
    assert rep["exact"]["n_groups"] == 1 and rep["exact"]["groups"] == [[1030, 1100, 3500]]
    assert not rep["truncated"]
    capped = duplicate_groups(idx, dist, 0.1, sid, max_groups=1)
    assert capped["n_groups"] == 2 and capped["groups"] == [[1030, 1100, 3500]] and capped["truncated"]


def test_duplicate_groups_none_for_distinct_points_and_errors():
    x = _unit(np.random.default_rng(9).normal(size=(200, 16)))
    idx, dist, _ = knn_graph(x, 5)
    rep = duplicate_groups(idx, dist, 0.1)
    assert rep["n_groups"] == 0 and rep["groups"] == [] and rep["exact"]["n_groups"] == 0
    assert duplicate_groups(idx, dist, 10.0)["n_groups"] == 1  # everything joins at a huge threshold
    with pytest.raises(ConfigError, match="near_duplicate_threshold"):
        duplicate_groups(idx, dist, -1.0)
    with pytest.raises(DataError, match="sample ids"):
        duplicate_groups(idx, dist, 0.1, np.arange(3))


def test_wide_embeddings_are_searched_in_their_principal_components():
    from dataopt.embed.knn import search_space

    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 64))  # 64 wide, rank 8
    x = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    x[7] = x[3]
    same, info = search_space(x, 64)
    assert same is x and info == {}
    low, info = search_space(x, 16, seed=1)
    assert low.shape == (300, 16) and info["projected"]["from_dim"] == 64
    assert info["projected"]["explained_variance"] > 0.99  # rank 8 < 16: nothing lost
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1, atol=1e-5)
    idx, dist, _ = knn_graph(low, 5)
    full_idx, _, _ = knn_graph(x, 5)
    assert dist[3, 0] == 0 and idx[3, 0] == 7
    assert (idx[:, 0] == full_idx[:, 0]).mean() > 0.95  # the same nearest neighbours
