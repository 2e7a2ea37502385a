"""``whitened_patches``: an unsupervised convolutional embedder, a dictionary of whitened image patches
applied as one convolution, rectified by sign and average-pooled on a coarse grid.

It follows Coates, Lee & Ng, "An Analysis of Single-Layer Networks in Unsupervised Feature Learning"
(AISTATS 2011): 6x6 patches, per-patch brightness/contrast normalisation, ZCA whitening, a dictionary
encoding, pooling over the image quadrants and a linear classifier (77.9 % on CIFAR-10 with 1,600
k-means centroids). Its dictionary is random whitened training patches, as Thiry, Arbel, Belilovsky &
Oyallon, "The Unreasonable Effectiveness of Patches in Deep Convolutional Kernels Methods" (ICLR 2021),
show that whitened random patches do as well as a learned one; the encoding is the split-sign soft
threshold of Coates & Ng, "The Importance of Encoding Versus Training with Sparse Coding and Vector
Quantization" (ICML 2011): ``relu(z - t)`` and ``relu(-z - t)``.

No label is read (``fit`` sees the train images only), so out-of-fold scores on these features carry no
leakage. The fitted state is a handful of arrays (filters, bias, optional projection) stored as
safetensors by the embed stage and reused for new batches (drift).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from dataopt.embed.base import Embedder, torch_device
from dataopt.errors import ConfigError, DataError
from dataopt.registry import EMBEDDERS

# Coates et al. 2011 normalise a patch by sqrt(var + 10) on the 0-255 scale: flat patches are not
# blown up into noise
_CONTRAST_EPS = 10.0


def _sample_patches(images: np.ndarray, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random ``size``x``size`` patches of ``images`` ``(n, H, W, C)`` uint8 -> ``(count, C*size*size)``
    float64, flattened channel-first (the layout of a conv2d filter)."""
    n, h, w, c = images.shape
    which = rng.integers(0, n, count)
    top = rng.integers(0, h - size + 1, count)
    left = rng.integers(0, w - size + 1, count)
    r = top[:, None, None] + np.arange(size)[None, :, None]
    q = left[:, None, None] + np.arange(size)[None, None, :]
    patches = images[which[:, None, None], r, q]  # (count, size, size, C)
    return patches.transpose(0, 3, 1, 2).reshape(count, -1).astype(np.float64)


def _normalise_patches(p: np.ndarray) -> np.ndarray:
    """Per-patch brightness and contrast normalisation (rows of ``p``), as the convolution computes it."""
    mean = p.mean(1, keepdims=True)
    var = (p * p).mean(1, keepdims=True) - mean * mean
    return (p - mean) / np.sqrt(var + _CONTRAST_EPS)


@EMBEDDERS.register("whitened_patches")
class WhitenedPatchesEmbedder(Embedder):
    """Split-sign soft-threshold responses to a dictionary of random whitened training patches,
    average-pooled on a ``pool`` x ``pool`` grid; rows L2-normalised.

    Feature dimension ``2 * n_patches * pool**2`` (8,192 with the defaults), or ``dim`` when set (a PCA
    of the pooled features, fitted on up to ``pca_rows`` train images: smaller files and a cheaper kNN,
    at some cost in linear accuracy).

    Parameters
    ----------
    n_patches : int
        Dictionary size K (filters of the convolution).
    patch_size : int
        Side of a square patch (stride 1).
    pool : int
        Average pooling to a ``pool`` x ``pool`` grid (2 = the image quadrants, as Coates et al.).
    threshold : float
        Soft threshold t of the encoding ``relu(z - t), relu(-z - t)`` on unit-norm atoms.
    whiten_reg : float
        Regulariser added to the patch covariance eigenvalues before whitening (normalised patches).
    fit_patches : int
        Random train patches the whitening is estimated on (the dictionary is drawn among them).
    dim : int or None
        None: the pooled features as they are; else project them on this many principal components.
    pca_rows : int
        Train images (seeded subsample) the PCA of ``dim`` is fitted on.
    images_per_pass : int or None
        Images per convolution pass (the last one padded): bounds memory, about ``images_per_pass *
        n_patches * positions * 8`` bytes (64 x 1,024 x 729 -> 0.4 GB on 32x32 images). None: 64 on
        the CPU, 256 on a GPU.
    transform_batch_size : int
        Rows per block handed to ``_embed`` by the stage (``embed.batch_size``).
    device : "auto" | "cpu" | "cuda"
    random_state : int
        Seeds the patch sample and the dictionary draw (and the PCA).
    """

    requires = ("images",)

    def __init__(
        self,
        n_patches: int = 1024,
        patch_size: int = 6,
        pool: int = 2,
        threshold: float = 0.25,
        whiten_reg: float = 0.1,
        fit_patches: int = 100_000,
        dim: Optional[int] = None,
        pca_rows: int = 5000,
        images_per_pass: Optional[int] = None,
        transform_batch_size: int = 512,
        device: str = "auto",
        random_state: int = 0,
    ):
        self.n_patches = n_patches
        self.patch_size = patch_size
        self.pool = pool
        self.threshold = threshold
        self.whiten_reg = whiten_reg
        self.fit_patches = fit_patches
        self.dim = dim
        self.pca_rows = pca_rows
        self.images_per_pass = images_per_pass
        self.transform_batch_size = transform_batch_size
        self.device = device
        self.random_state = random_state

    def _check(self, images: np.ndarray) -> None:
        for key in ("n_patches", "patch_size", "pool", "fit_patches", "pca_rows"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"embed.kwargs.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("dim", "images_per_pass"):
            if getattr(self, key) is not None and int(getattr(self, key)) < 1:
                raise ConfigError(f"embed.kwargs.{key} must be null or >= 1, got {getattr(self, key)}")
        if images.ndim != 4 or min(images.shape[1:3]) < int(self.patch_size):
            raise DataError(f"the 'whitened_patches' embedder needs (n, H, W, C) images of at least "
                            f"patch_size={self.patch_size} pixels a side, got shape {images.shape}")

    def fit(
        self, images: np.ndarray, labels: Optional[np.ndarray] = None, n_classes: Optional[int] = None
    ) -> "WhitenedPatchesEmbedder":
        """Estimate the whitening and draw the dictionary from ``images`` (train rows; labels unused)."""
        images = np.asarray(images)
        self._check(images)
        rng = np.random.default_rng(int(self.random_state))
        size, k = int(self.patch_size), int(self.n_patches)
        p = _normalise_patches(_sample_patches(images, size, max(int(self.fit_patches), k), rng))
        # ZCA (Coates et al. 2011, Thiry et al. 2021): W = V diag(1 / sqrt(lambda + reg)) V^T
        mean = p.mean(0)
        eigval, eigvec = np.linalg.eigh(np.cov(p, rowvar=False))
        zca = (eigvec / np.sqrt(np.clip(eigval, 0, None) + float(self.whiten_reg))) @ eigvec.T
        atoms = (p[rng.choice(len(p), k, replace=False)] - mean) @ zca
        atoms /= np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), 1e-8)
        # z = atoms . zca (normalise(x) - mean) = filters . normalise(x) - bias (filters centred: a
        # normalised patch sums to 0, so the filters' own mean is irrelevant, and dropping it is exact)
        proj = atoms @ zca
        c = images.shape[3]
        self.filters_ = (proj - proj.mean(1, keepdims=True)).reshape(k, c, size, size).astype(np.float32)
        self.bias_ = (proj @ mean).astype(np.float32)
        self.components_: Optional[np.ndarray] = None
        self.pca_mean_: Optional[np.ndarray] = None
        self.dim_ = 2 * k * int(self.pool) ** 2
        self.device_ = str(torch_device(self.device))
        self.info_ = {
            "features": f"split-sign soft-threshold responses to {k} random whitened {size}x{size} train "
                        f"patches, average-pooled on a {self.pool}x{self.pool} grid (unsupervised)",
            "fitted_on": "train (images only, no labels)",
            "whitening_patches": int(len(p)),
        }
        if self.dim is not None:
            self._fit_projection(images, rng)
        return self

    def _fit_projection(self, images: np.ndarray, rng: np.random.Generator) -> None:
        rows = np.sort(rng.choice(len(images), min(len(images), int(self.pca_rows)), replace=False))
        pooled = self._pooled_all(images[rows])
        n_components = min(int(self.dim), pooled.shape[0], pooled.shape[1])
        with threadpool_limits(limits=1, user_api="blas"):  # the same components wherever it is fitted
            pca = PCA(n_components, svd_solver="randomized", random_state=int(self.random_state)).fit(pooled)
        self.components_ = pca.components_.astype(np.float32)
        self.pca_mean_ = pca.mean_.astype(np.float32)
        self.info_["pca"] = {"rows": int(len(rows)), "explained_variance": float(pca.explained_variance_ratio_.sum())}
        if n_components < int(self.dim):
            self.info_["dim_clipped_from"] = int(self.dim)
        self.dim_ = n_components

    def _pass_size(self) -> int:
        if self.images_per_pass is not None:
            return int(self.images_per_pass)
        # CPU: every torch op is a parallel region whose barrier waits on a preempted thread when the
        # cores are shared, so few large passes: 6 ms/image in passes of 64 against 15 (8) and 88 (1),
        # K = 1,024, 32x32, 2 cores at load 5
        return 64 if self.device_ == "cpu" else 256

    def _pooled_all(self, images: np.ndarray, project: bool = False) -> np.ndarray:
        """``(n, H, W, C)`` uint8 -> ``(n, 2 * K * pool**2)`` float32 (``project``: ``(n, dim_)``), in
        passes of a fixed size: the last pass is padded, so a row is computed by the same kernels (the
        same product shapes) whatever block or worker holds it, and comes out bit for bit the same."""
        step = self._pass_size()
        out, buffers = [], {}
        for s in range(0, len(images), step):
            block = np.array(images[s : s + step])
            if len(block) < step:
                block = np.concatenate([block, np.zeros((step - len(block), *block.shape[1:]), block.dtype)])
            out.append(self._pooled(block, project, buffers)[: min(step, len(images) - s)])
        width = self.dim_ if project else 2 * len(self.bias_) * int(self.pool) ** 2
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def _pool_matrix(self, out_h: int, out_w: int, dev: torch.device) -> torch.Tensor:
        """``(pool**2, out_h * out_w)``: adaptive average pooling to the grid as a matrix (cached)."""
        key = (out_h, out_w, str(dev))
        if getattr(self, "_pool_cache", (None,))[0] != key:
            grid = int(self.pool)
            eye = torch.eye(out_h * out_w, device=dev).view(-1, 1, out_h, out_w)
            self._pool_cache = (key, F.adaptive_avg_pool2d(eye, grid).view(out_h * out_w, grid * grid).T.contiguous())
        return self._pool_cache[1]

    @torch.no_grad()
    def _pooled(self, block: np.ndarray, project: bool = False, buffers: Optional[dict] = None) -> np.ndarray:
        """``(b, H, W, C)`` uint8 -> ``(b, 2 * K * pool**2)`` float32 pooled responses (``project`` and a
        fitted PCA: ``(b, dim_)``). ``buffers``: work arrays reused by the passes of one call (a pass
        allocating its 0.2 GB anew costs as much as its product, in page faults)."""
        dev = torch.device(self.device_)
        k, c, size, _ = self.filters_.shape
        t = float(self.threshold)
        x = torch.from_numpy(block).to(dev).float()  # (b, H, W, C)
        b, out_h, out_w, d = len(x), x.shape[1] - size + 1, x.shape[2] - size + 1, c * size * size
        buf = buffers if buffers is not None else {}
        if buf.get("shape") != (b, out_h, out_w, str(dev)):
            # torch.tensor copies into torch's (64-byte aligned) memory: a state restored from a file and
            # the fitted one then run the same vector code paths, to the last bit. The bias and threshold
            # ride in the product as a last row against a column of ones: z - t without a pass of its own
            w = torch.tensor(self.filters_, device=dev).view(k, d).T
            buf.update(shape=(b, out_h, out_w, str(dev)),
                       weights=torch.cat([w, (-torch.tensor(self.bias_, device=dev) - t)[None]]).contiguous(),
                       cols=torch.ones(b, out_h * out_w, d + 1, device=dev),
                       z=torch.empty(b * out_h * out_w, k, device=dev), low=torch.empty(b * out_h * out_w, k, device=dev))
        # the patch columns, positions-major and channel-first (the filters' layout), copied from a
        # strided view (F.unfold's im2col took a third of the time), contrast-normalised on the narrow side
        cols = buf["cols"]
        v = cols[..., :d]
        v.view(b, out_h, out_w, c, size, size).copy_(x.unfold(1, size, 1).unfold(2, size, 1))
        mean = v.mean(2, keepdim=True)
        var = (v * v).mean(2, keepdim=True) - mean * mean
        v.sub_(mean).div_((var.clamp_min_(0) + _CONTRAST_EPS).sqrt_())
        shifted = torch.mm(cols.view(-1, d + 1), buf["weights"], out=buf["z"])  # z - t, (b * positions, K)
        # average pooling as a product with a (grid cells, positions) matrix whose rows sum to 1, so
        # pool(relu(-z - t)) = -pool(min(z - t, -2t)) - 2t: two passes over the responses
        pool = self._pool_matrix(out_h, out_w, dev)
        low = torch.clamp(shifted, max=-2 * t, out=buf["low"]).view(b, -1, k)
        neg = torch.matmul(pool, low).neg_().sub_(2 * t)  # (b, cells, K)
        pos = torch.matmul(pool, shifted.relu_().view(b, -1, k))
        # feature order: sign, atom, grid cell
        f = torch.cat([pos, neg], 2).transpose(1, 2).flatten(1)
        if project and self.components_ is not None:
            # in float64, so that the float16 embeddings never show a last-bit difference
            mean, comp = (torch.tensor(a, device=dev, dtype=torch.float64) for a in (self.pca_mean_, self.components_))
            f = ((f.double() - mean) @ comp.T).float()
        return f.cpu().numpy()

    def _embed(self, block: np.ndarray) -> np.ndarray:
        return self._pooled_all(block, project=True)

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"filters": self.filters_, "bias": self.bias_}
        if self.components_ is not None:
            arrays.update(components=self.components_, pca_mean=self.pca_mean_)
        return arrays, {"info": self.info_}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "WhitenedPatchesEmbedder":
        self.filters_ = np.array(arrays["filters"], np.float32)
        self.bias_ = np.array(arrays["bias"], np.float32)
        self.components_ = np.array(arrays["components"], np.float32) if "components" in arrays else None
        self.pca_mean_ = np.array(arrays["pca_mean"], np.float32) if "pca_mean" in arrays else None
        k = self.filters_.shape[0]
        self.dim_ = self.components_.shape[0] if self.components_ is not None else 2 * k * int(self.pool) ** 2
        self.device_ = str(torch_device(self.device))
        self.info_ = dict(meta["info"])
        return self
