"""The ``whitened_patches`` embedder: an unsupervised whitened patch dictionary, convolved, rectified by
sign and pooled (Coates et al. 2011; Thiry et al. 2021)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import dataopt.plugins  # noqa: F401  (fills EMBEDDERS)
from dataopt.embed.patches import WhitenedPatchesEmbedder
from dataopt.errors import ConfigError, DataError
from dataopt.registry import EMBEDDERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"n_patches": 32, "fit_patches": 2000, "device": "cpu"}


def _textures(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 RGB images of horizontal (label 0) or vertical (label 1) stripes of random period,
    phase, colour and noise: no single pixel tells the classes apart, local patches do."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    coords = np.arange(size)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, lab in enumerate(labels):
        wave = np.sin(2 * np.pi * coords / rng.uniform(3, 6) + rng.uniform(0, 2 * np.pi))
        plane = wave[:, None] if lab == 0 else wave[None, :]
        plane = np.broadcast_to(plane, (size, size)) * rng.uniform(30, 90) + rng.uniform(60, 190)
        noisy = plane[..., None] * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 15, (size, size, 3))
        images[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def textures():
    return _textures(240)


def test_registered_with_json_safe_params_and_listed_kwargs():
    emb = EMBEDDERS.build("whitened_patches", {"n_patches": 8, "pool": 3})
    assert isinstance(emb, WhitenedPatchesEmbedder) and emb.n_patches == 8 and emb.pool == 3
    with pytest.raises(ConfigError, match="no_such_kwarg.*valid:.*n_patches"):
        EMBEDDERS.build("whitened_patches", {"no_such_kwarg": 1})


def test_features_are_unit_rows_of_the_documented_dimension_deterministic_and_label_free(textures):
    images, labels = textures
    emb = WhitenedPatchesEmbedder(pool=3, random_state=1, **SMALL).fit(images[:200])
    f = emb.transform(images)
    assert f.shape == (240, 2 * 32 * 9) == (240, emb.dim_) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    again = WhitenedPatchesEmbedder(pool=3, random_state=1, **SMALL).fit(images[:200], labels[:200], 2)
    assert np.array_equal(again.transform(images), f)  # same seed, labels given or not: the same features
    other = WhitenedPatchesEmbedder(pool=3, random_state=2, **SMALL).fit(images[:200])
    assert not np.allclose(other.transform(images), f)


def test_rows_do_not_depend_on_the_images_per_pass(textures):
    images, _ = textures
    one = WhitenedPatchesEmbedder(images_per_pass=64, **SMALL).fit(images)
    small = WhitenedPatchesEmbedder(images_per_pass=5, **SMALL).fit(images)
    np.testing.assert_allclose(small.transform(images), one.transform(images), rtol=0, atol=1e-6)


def test_split_sign_encoding_of_one_patch_has_one_active_sign_per_atom(textures):
    images, _ = textures
    emb = WhitenedPatchesEmbedder(pool=1, threshold=0.1, **SMALL).fit(images)
    raw = emb._pooled(images[:20, :6, :6])  # a 6x6 image is one patch: no pooling
    pos, neg = raw[:, :32], raw[:, 32:]
    assert (raw >= 0).all() and (raw > 0).any()
    assert (pos * neg == 0).all()  # relu(z - t) and relu(-z - t) are never both positive


def test_brightness_shift_leaves_the_features_unchanged(textures):
    images, _ = textures
    emb = WhitenedPatchesEmbedder(**SMALL).fit(images)
    dark = (images // 2).astype(np.uint8)
    bright = dark + np.uint8(60)  # per-patch mean subtraction removes a constant offset
    np.testing.assert_allclose(emb.transform(bright), emb.transform(dark), rtol=0, atol=1e-4)


def test_a_linear_model_separates_textures_it_cannot_from_pixels(textures):
    images, labels = textures
    train, test = slice(0, 160), slice(160, 240)
    emb = WhitenedPatchesEmbedder(**SMALL).fit(images[train])
    f = emb.transform(images)
    acc = LogisticRegression(C=10.0, max_iter=2000).fit(f[train], labels[train]).score(f[test], labels[test])
    flat = images.reshape(len(images), -1) / 255.0
    pixel_acc = LogisticRegression(max_iter=2000).fit(flat[train], labels[train]).score(flat[test], labels[test])
    assert acc >= 0.95 and acc > pixel_acc + 0.1, (acc, pixel_acc)


@pytest.mark.parametrize("dim", [None, 16])
def test_state_round_trip_reproduces_the_rows(textures, dim):
    images, _ = textures
    emb = WhitenedPatchesEmbedder(dim=dim, pca_rows=100, **SMALL).fit(images[:200])
    arrays, meta = emb.get_state()
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    restored = WhitenedPatchesEmbedder(dim=dim, pca_rows=100, **SMALL).set_state(arrays, meta)
    assert restored.dim_ == emb.dim_ == (16 if dim else 2 * 32 * 4)
    assert np.array_equal(restored.transform(images), emb.transform(images))
    assert restored.info() == emb.info()


def test_bad_inputs_are_one_line_errors(textures):
    images, _ = textures
    with pytest.raises(DataError, match="at least patch_size=6"):
        WhitenedPatchesEmbedder(**SMALL).fit(images[:, :5, :5])
    with pytest.raises(ConfigError, match="n_patches must be >= 1"):
        WhitenedPatchesEmbedder(**{**SMALL, "n_patches": 0}).fit(images)
    with pytest.raises(ConfigError, match="dim must be null or >= 1"):
        WhitenedPatchesEmbedder(dim=0, **SMALL).fit(images)


def test_a_shard_worker_importing_embed_run_alone_knows_every_embedder():
    """A Dask shard worker (or a library caller of run_stage) imports dataopt.embed.run, not the plugins:
    it must import every module of dataopt.embed that registers an embedder."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "dataopt"

    def embed_imports(path: Path) -> set[str]:
        return {a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                for a in node.names if a.name.startswith("dataopt.embed.")}

    registering = {m for m in embed_imports(root / "plugins.py")}
    assert "dataopt.embed.patches" in registering
    assert registering <= embed_imports(root / "embed" / "run.py")
