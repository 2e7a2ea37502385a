"""The fitted embedder the embed stage stores (embed/embedder.safetensors): restored, it embeds rows
exactly as the stage embedded them, and it refuses a file it cannot trust."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import write_tiny_openclip
from dataopt.config import validate
from dataopt.embed import shards as shardlib
from dataopt.embed.backends import PixelsEmbedder, ProxyEmbedder
from dataopt.embed.openclip import OpenClipEmbedder
from dataopt.embed.patches import WhitenedPatchesEmbedder
from dataopt.embed.run import class_probs_new, embed_new, load_embedder
from dataopt.errors import DataError
from dataopt.io import load_npy
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.stages import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(paths: Paths, **embed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the embed stage; return (images, embeddings, test-row positions)."""
    run_stage("embed", check_methods(validate({"seed": 3, "embed": {"device": "cpu", **embed}})), paths)
    split = pq.read_table(paths.artifacts / "ingest" / "samples.parquet", columns=["split"]).column(0)
    test = np.flatnonzero(split.to_numpy(zero_copy_only=False) == "test")
    return (load_npy(paths.artifacts / "ingest" / "images.npy", mmap=False),
            load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False), test)


def _stored(paths: Paths):
    return paths.artifacts / "embed" / "embedder.safetensors"


def test_restored_pixels_embedder_reproduces_the_test_rows(digits_writer, tmp_path):
    paths = digits_writer(tmp_path, n=300)
    images, emb, test = _run(paths, backend="pixels", kwargs={"dim": 24}, shard_size=64, batch_size=50)
    restored = load_embedder(_stored(paths))
    assert isinstance(restored, PixelsEmbedder) and restored.random_state == 3 and restored.dim_ == 24
    for batch_size in (None, 7):  # the block size does not change a row
        new = embed_new(restored, images[test], batch_size=batch_size)
        assert new.dtype == np.float16 and np.array_equal(new, emb[test])
    np.testing.assert_allclose(np.linalg.norm(new.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert class_probs_new(restored, images[test]) is None


@pytest.mark.parametrize("dim", [None, 20])
def test_restored_whitened_patches_embedder_reproduces_the_rows(digits_writer, tmp_path, dim):
    paths = digits_writer(tmp_path, n=300)
    kwargs = {"n_patches": 16, "fit_patches": 3000, "dim": dim, "pca_rows": 150}
    images, emb, test = _run(paths, backend="whitened_patches", kwargs=kwargs, shard_size=64, batch_size=50)
    arrays, _ = shardlib.load_state(_stored(paths))
    assert set(arrays) == ({"filters", "bias"} | ({"components", "pca_mean"} if dim else set()))
    restored = load_embedder(_stored(paths))
    assert isinstance(restored, WhitenedPatchesEmbedder) and restored.random_state == 3
    assert restored.dim_ == (dim or 2 * 16 * 4)
    for batch_size in (None, 7):  # the block size does not change a row
        assert np.array_equal(embed_new(restored, images, batch_size=batch_size), emb)
    assert class_probs_new(restored, images[test]) is None


def test_restored_proxy_embedder_reproduces_test_rows_and_their_probabilities(digits_writer, tmp_path):
    paths = digits_writer(tmp_path, n=240)
    images, emb, test = _run(paths, backend="proxy",
                             kwargs={"epochs": 2, "width": 4, "batch_size": 64, "folds": 2}, shard_size=100)
    restored = load_embedder(_stored(paths))
    assert isinstance(restored, ProxyEmbedder) and len(restored.fold_models_) == 2
    assert np.array_equal(embed_new(restored, images[test]), emb[test])

    with np.load(paths.artifacts / "embed" / "proxy_probs.npz") as z:
        probs, fold = z["probs"], z["fold"]
    assert (fold[test] == -1).all()  # the stage scored them by the mean of the fold models, as new rows
    new = class_probs_new(restored, images[test])
    assert new.dtype == np.float32 and new.shape == probs[test].shape
    np.testing.assert_allclose(new, probs[test], rtol=0, atol=1e-6)
    # a model that ignored the fold models (the full one) would score them differently
    full = torch.softmax(restored.model_(torch.from_numpy(images[test]).permute(0, 3, 1, 2).float() / 255), 1)
    assert not np.allclose(full.detach().numpy(), new, atol=1e-3)


def test_restored_open_clip_embedder_reproduces_the_rows_and_checks_its_checkpoint(digits_writer, tmp_path):
    name, config, checkpoint = write_tiny_openclip(tmp_path / "clip")
    paths = digits_writer(tmp_path / "p", n=30)
    kwargs = {"model": name, "model_config": str(config), "pretrained": str(checkpoint)}
    images, emb, _ = _run(paths, backend="open_clip", kwargs=kwargs)
    arrays, meta = shardlib.load_state(_stored(paths))
    assert arrays == {} and meta["backend"] == "open_clip" and meta["identity"]["checkpoint_sha256"]
    restored = load_embedder(_stored(paths))
    assert isinstance(restored, OpenClipEmbedder)
    assert np.array_equal(embed_new(restored, images), emb)

    # other weights under the same path: the stored embedder no longer describes them
    _, _, other = write_tiny_openclip(tmp_path / "clip2", seed=1)
    shutil.copyfile(other, checkpoint)
    with pytest.raises(DataError, match="inputs changed since it was stored"):
        load_embedder(_stored(paths))


def test_a_file_that_is_no_stored_embedder_is_refused(tmp_path):
    junk = tmp_path / "embedder.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="not a readable embedder file"):
        load_embedder(junk)
    shardlib.save_state(junk, {"x": np.zeros(2, np.float32)}, {"something": "else"})
    with pytest.raises(DataError, match="not an embedder file"):
        load_embedder(junk)
