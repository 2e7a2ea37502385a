"""The k-nearest-neighbour graph of the embeddings: faiss (exact or IVF, CPU or GPU) or a torch GPU
brute force, blockwise, with every row's own entry removed.

Every path only *proposes* candidate neighbours; their distances are then recomputed exactly in float32
as ``|x_i - x_j|`` from the rows themselves and each row is sorted by them. So ``knn.npz`` always holds
Euclidean distances between the stored vectors, ascending, identical rows are at distance exactly 0
(what :mod:`dataopt.embed.duplicates` relies on), and the paths differ only in which candidates they
find. The returned ``info`` says which path ran (``backend``); nothing falls back silently.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Iterator, Literal, Optional

import faiss
import numpy as np
import torch
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from dataopt.errors import ConfigError, DataError

KNN_BLOCK = 8192  # queries per search call: bounds the (block x k) result buffers
EXACT_MAX = 100_000  # rows up to which the faiss search is exact (50k x 512 on 2 CPU cores: ~20 s)
NPROBE = 32  # IVF lists visited per query
RERANK_BYTES = 64 << 20  # bytes of gathered (rows x candidates x d) float32 per rerank step
TORCH_SCORE_BYTES = 2 << 30  # bytes of the (queries x n) score block of the torch GPU path
TORCH_GPU_DEVICE = "cuda"  # where the torch path runs (tests point it at "cpu" to run the same code)
Metric = Literal["ip", "l2"]


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def faiss_threads(n: Optional[int] = None) -> Iterator[int]:
    """Run faiss with ``n`` OpenMP threads (default: the available cores), restoring the old count.

    faiss defaults to the machine's core count, which oversubscribes a container limited to fewer.
    """
    old = faiss.omp_get_max_threads()
    n = max(1, int(n or available_cores()))
    faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        faiss.omp_set_num_threads(old)


def gpu_backend(use_gpu: Optional[bool] | str = None) -> Optional[str]:
    """Which GPU path a search takes: ``"faiss"``, ``"torch"`` or ``None`` (CPU).

    ``use_gpu=None`` (or ``"auto"``) takes a GPU when one is visible (faiss-gpu first, else torch on
    CUDA); ``True`` (``"cuda"``) requires one (ConfigError naming both checks when there is none);
    ``False`` (``"cpu"``) stays on the CPU.
    """
    use_gpu = {"auto": None, "cpu": False, "cuda": True}.get(use_gpu, use_gpu)  # embed.knn_device
    if use_gpu is False:
        return None
    n_faiss = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_faiss > 0:
        return "faiss"
    if torch.cuda.is_available():
        return "torch"
    if use_gpu:
        raise ConfigError(
            "embed.knn_device is 'cuda' but no GPU is visible (faiss.get_num_gpus() == 0 and "
            "torch.cuda.is_available() is False); use 'auto' or 'cpu'"
        )
    return None


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` rows: ~4 sqrt(n), and at least 39 training rows per list (faiss' minimum)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


SEARCH_FIT_ROWS = 5000  # train rows the search projection's principal components are fitted on


def principal_components(vectors: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """``(n, min(dim, ...))`` float32 coordinates of ``vectors`` on their first ``dim`` principal
    components, fitted on a seeded sample of ``SEARCH_FIT_ROWS`` rows (randomized SVD, one BLAS thread:
    the same components on any machine), and what was done."""
    n, d = vectors.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, SEARCH_FIT_ROWS), replace=False))
    n_components = min(int(dim), len(rows))
    with threadpool_limits(limits=1, user_api="blas"):
        pca = PCA(n_components, svd_solver="randomized", iterated_power=3, random_state=seed).fit(
            np.asarray(vectors[rows], np.float32))
    out = ((np.asarray(vectors, np.float32) - pca.mean_) @ pca.components_.T).astype(np.float32)
    return out, {"from_dim": int(d), "to_dim": int(n_components), "fit_rows": int(len(rows)),
                 "explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4)}


def search_space(vectors: np.ndarray, dim: Optional[int], seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """``vectors`` as the neighbour search sees them: unchanged when ``dim`` is None or they are no wider,
    else their first ``dim`` principal components (:func:`principal_components`), L2-normalised. A flat
    search costs n^2 d: 50,000 whitened_patches rows of 8,192 coordinates would take ~7 minutes on 2
    cores, their 512 components ~20 s; neighbours and duplicates are then those of the projection
    (``info["projected"]`` says so), identical rows still at distance 0."""
    if dim is None or vectors.shape[1] <= dim or len(vectors) < 2:
        return vectors, {}
    out, info = principal_components(vectors, dim, seed)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out, {"projected": info}


def knn_graph(
    vectors: np.ndarray,
    k: int,
    *,
    metric: Metric = "ip",
    exact_max: int = EXACT_MAX,
    nlist: Optional[int] = None,
    nprobe: int = NPROBE,
    block: int = KNN_BLOCK,
    use_gpu: Optional[bool] | str = None,
    seed: int = 0,
    threads: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The ``k`` nearest other rows of every row of ``vectors``.

    Candidates come from faiss: ``IndexFlatIP`` on L2-normalised copies of the rows (``metric="ip"``,
    cosine ranking, for embeddings) or ``IndexFlatL2`` (``metric="l2"``) when ``n <= exact_max``, else an
    ``IndexIVFFlat`` with ``nlist`` lists trained on a seeded sample and searched with ``nprobe``. With a
    GPU they come from faiss-gpu (same index choice) or, when faiss has no GPU support, from an exact
    torch brute force on CUDA (float16 scores, float32 rerank; exact for every ``n``). Each query asks for
    ``k + 1`` results and drops itself (or, when more than ``k`` exact duplicates tie with it, the
    last one), so a row is never its own neighbour. Distances are then recomputed exactly (see module).

    Parameters
    ----------
    vectors : (n, d) float array (cast to float32; for ``"ip"`` rows should be unit-norm, as embeddings are)
    k : int
        Neighbours per row, clipped to ``n - 1`` (``info["k"]`` is the value used).
    metric : "ip" | "l2"
    exact_max : int
        Largest ``n`` searched exactly by faiss; above it the IVF index is used.
    nlist : int, optional
        IVF lists; default ``default_nlist(n)`` (~4 sqrt(n)).
    nprobe : int
        IVF lists visited per query (recall vs speed).
    block : int
        Queries per search call: memory stays bounded by ``block x (k + 1)`` results.
    use_gpu : bool or "auto" | "cpu" | "cuda", optional
        None / "auto": a GPU when one is visible; True / "cuda": require one; False / "cpu": the CPU.
    seed : int
        Seeds the IVF training sample and its k-means.
    threads : int, optional
        faiss OpenMP threads; default the available cores.

    Returns
    -------
    indices : (n, k) int64, positions into ``vectors``, nearest first
    distances : (n, k) float32 Euclidean distances between the rows, ascending
    info : dict for ``meta.json``: backend, index, k, k_requested, metric, nlist/nprobe, seconds, ...
    """
    t0 = time.perf_counter()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise DataError(f"kNN needs an (n, d) array of vectors; got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise DataError(f"kNN needs at least 2 rows; got {n}")
    if k < 1:
        raise ConfigError(f"embed.knn_k must be >= 1; got {k}")
    if metric not in ("ip", "l2"):
        raise ConfigError(f"kNN metric must be 'ip' or 'l2'; got {metric!r}")
    if nprobe < 1 or block < 1 or exact_max < 0:
        raise ConfigError(f"kNN needs nprobe >= 1, block >= 1, exact_max >= 0; got {nprobe}, {block}, {exact_max}")
    kk = min(int(k), n - 1)
    gpu = gpu_backend(use_gpu)
    info: dict[str, Any] = {"k": kk, "k_requested": int(k), "n": n, "d": d, "metric": metric,
                            "distances": "euclidean between the given rows, recomputed in float32"}
    with faiss_threads(threads) as n_threads:
        info["threads"] = n_threads
        if gpu == "torch":
            device = torch.device(TORCH_GPU_DEVICE)
            indices, distances = _torch_exact(x, kk, metric, device, torch.float16, block)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
            info.update(backend=f"torch-{device.type} exact", device=name,
                        index="brute force: float16 scores, top k+margin reranked in float32")
        else:
            cand, search_info = _faiss_candidates(x, kk, metric, exact_max, nlist, nprobe, block, gpu, seed)
            info.update(search_info)
            indices, distances = rerank(x, cand, kk)
    info["seconds"] = round(time.perf_counter() - t0, 4)
    return indices, distances, info


def knn_search(x: np.ndarray, k: int, block: int = KNN_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean kNN on the CPU (``knn_graph(metric="l2")`` without clipping ``k``).

    Parameters
    ----------
    x : (n, d) float array
    k : int, must be <= n - 1 (DataError otherwise)

    Returns
    -------
    indices : (n, k) int64 ; distances : (n, k) float32, ascending
    """
    n = len(x)
    if not 1 <= k <= n - 1:
        raise DataError(f"kNN needs 1 <= k <= n - 1; got k={k} for n={n} rows")
    indices, distances, _ = knn_graph(x, k, metric="l2", exact_max=n, block=block, use_gpu=False)
    return indices, distances


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _faiss_candidates(
    x: np.ndarray, k: int, metric: str, exact_max: int, nlist: Optional[int], nprobe: int,
    block: int, gpu: Optional[str], seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(n, k)`` candidate neighbours from a faiss index (self removed) and what was searched."""
    n, d = x.shape
    xs = _normalised(x) if metric == "ip" else x
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    exact = n <= exact_max
    res = faiss.StandardGpuResources() if gpu == "faiss" else None
    where = "faiss-gpu" if gpu == "faiss" else "faiss-cpu"
    info: dict[str, Any] = {"faiss_version": faiss.__version__, "device": "cuda:0" if res is not None else "cpu"}
    if exact:
        if res is not None:
            index = faiss.GpuIndexFlatIP(res, d) if metric == "ip" else faiss.GpuIndexFlatL2(res, d)
        else:
            index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        info.update(backend=f"{where} exact", index=type(index).__name__)
    else:
        lists = int(nlist or default_nlist(n))
        if not 1 <= lists <= n:
            raise ConfigError(f"embed.knn_nlist must be between 1 and the {n} rows; got {lists}")
        if res is not None:
            index = faiss.GpuIndexIVFFlat(res, d, lists, faiss_metric)
        else:
            quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, lists, faiss_metric)
            index.cp.seed = seed
        # k-means on a seeded sample (faiss would subsample itself, unseeded, above 256 rows per list)
        n_train = min(n, 256 * lists)
        sample = np.random.default_rng(seed).choice(n, n_train, replace=False) if n_train < n else None
        index.train(xs if sample is None else xs[np.sort(sample)])
        index.nprobe = min(nprobe, lists)
        info.update(backend=f"{where} IVF", index=type(index).__name__, nlist=lists,
                    nprobe=int(index.nprobe), n_train=n_train)
    index.add(xs)
    cand = np.empty((n, k), dtype=np.int64)
    missing = []
    for s in range(0, n, block):
        _, idx = index.search(xs[s : s + block], k + 1)
        cand[s : s + len(idx)] = drop_self(idx, s)
        missing.append(s + np.flatnonzero((cand[s : s + len(idx)] < 0).any(axis=1)))
    missing = np.concatenate(missing)
    if len(missing) and not exact:
        # IVF found fewer than k + 1 rows in the visited lists: search those rows over every list
        index.nprobe = info["nlist"]
        _, idx = index.search(xs[missing], k + 1)
        cand[missing] = drop_self(idx, 0, rows=missing)
    info["n_rows_searched_all_lists"] = int(len(missing)) if not exact else 0
    return cand, info


def drop_self(idx: np.ndarray, start: int, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """``(m, c)`` search results of rows ``start .. start + m`` (or of ``rows``) -> ``(m, c - 1)``.

    Drops each row's own entry, or the last one when the row is not among its results (more than
    ``c - 1`` exact duplicates tie with it), so that exactly one entry goes per row.
    """
    m, c = idx.shape
    own = np.arange(start, start + m) if rows is None else np.asarray(rows)
    drop = idx == own[:, None]
    first = drop.cumsum(axis=1) == 1
    drop &= first  # a row listed twice (cannot happen in faiss, cheap to guard) loses one entry only
    drop[~drop.any(axis=1), -1] = True
    return idx[~drop].reshape(m, c - 1)


def rerank(x: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` candidates nearest to each row by exact float32 Euclidean distance.

    Parameters
    ----------
    x : (n, d) float32
    cand : (n, c) int64 candidate rows, c >= k, entries >= 0
    k : int

    Returns
    -------
    indices : (n, k) int64 ; distances : (n, k) float32, ascending (ties keep the candidates' order)
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ct = torch.from_numpy(np.ascontiguousarray(cand, dtype=np.int64))
    idx, dist = _rerank_torch(xt, xt, ct, k, 0)
    return idx.numpy(), dist.numpy()


def _rerank_torch(
    xq: torch.Tensor, xb: torch.Tensor, cand: torch.Tensor, k: int, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rerank on ``xq``'s device: queries ``xq`` (rows ``start..``) against candidates in ``xb``."""
    m, c = cand.shape
    d = xb.shape[1]
    step = max(1, RERANK_BYTES // (4 * c * d))
    out_i = torch.empty((m, k), dtype=torch.int64, device=xq.device)
    out_d = torch.empty((m, k), dtype=torch.float32, device=xq.device)
    for s in range(0, m, step):
        cb = cand[s : s + step]
        # |a - b| from the difference, not |a|^2 + |b|^2 - 2ab: identical rows give exactly 0
        dist = torch.linalg.vector_norm(xb[cb] - xq[start + s : start + s + len(cb), None, :], dim=-1)
        dist, order = torch.sort(dist, dim=1, stable=True)
        out_i[s : s + len(cb)] = torch.gather(cb, 1, order[:, :k])
        out_d[s : s + len(cb)] = dist[:, :k]
    return out_i, out_d


def _torch_exact(
    x: np.ndarray, k: int, metric: str, device: torch.device, dtype: torch.dtype, block: int,
    margin: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact brute-force kNN in torch: low-precision scores pick ``k + margin`` candidates per row
    (self masked out), which are reranked in float32; runs on any device (the tests use the CPU).

    Returns
    -------
    indices : (n, k) int64 ; distances : (n, k) float32, ascending
    """
    n, d = x.shape
    x32 = torch.from_numpy(x).to(device)
    xs = torch.nn.functional.normalize(x32, dim=1) if metric == "ip" else x32
    xs = xs.to(dtype)
    if margin is None:  # float16/bfloat16 scores can swap near ties: rerank a few more
        margin = 0 if dtype == torch.float32 else max(8, k)
    c = min(n - 1, k + margin)
    half_sq = 0.5 * (x32 * x32).sum(dim=1) if metric == "l2" else None
    # the (queries x n) score block is the big buffer: size it, not just the query count
    step = max(1, min(block, TORCH_SCORE_BYTES // (4 * n)))
    out_i = torch.empty((n, k), dtype=torch.int64, device=device)
    out_d = torch.empty((n, k), dtype=torch.float32, device=device)
    for s in range(0, n, step):
        q = xs[s : s + step]
        m = len(q)
        scores = q @ xs.T  # ip: top-k straight on the low-precision scores (half the memory traffic)
        if half_sq is not None:  # argmin |q - b|^2 = argmax q.b - |b|^2 / 2, in float32
            scores = scores.float() - half_sq[None, :]
        scores[torch.arange(m, device=device), torch.arange(s, s + m, device=device)] = -torch.inf
        cand = scores.topk(c, dim=1, sorted=True).indices
        del scores
        out_i[s : s + m], out_d[s : s + m] = _rerank_torch(x32, x32, cand, k, s)
    return out_i.cpu().numpy(), out_d.cpu().numpy()
