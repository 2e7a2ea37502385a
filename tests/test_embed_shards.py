"""Sharded, resumable embedding: kill-and-resume, stored fitted state, map_shards (threads), NaN per shard."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import map_fresh_workers, map_interrupted_after_two
from dataopt.config import validate
from dataopt.embed.backends import PixelsEmbedder
from dataopt.errors import DataError
from dataopt.io import load_npy, read_json, save_npy
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.registry import EMBEDDERS
from dataopt.stages import embed as embed_stage
from dataopt.stages import run_stage

TESTS = Path(__file__).resolve().parent


class SlowPixels(PixelsEmbedder):
    """Test double: the pixels backend, sleeping ``delay`` seconds per embedded block (one per shard)."""

    delay = 0.0

    def _embed(self, block):
        time.sleep(self.delay)
        return super()._embed(block)


class NaNOnWhite(PixelsEmbedder):
    """Test double: the pixels backend, but an all-white image embeds as NaN."""

    def _embed(self, block):
        out = super()._embed(block)
        out[(np.asarray(block) == 255).all(axis=(1, 2, 3))] = np.nan
        return out


def _params(**embed):
    return check_methods(validate({"embed": embed}))


def _emb(paths: Paths) -> np.ndarray:
    return load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False)


def _shard_files(paths: Paths) -> list[Path]:
    return sorted((paths.artifacts / "embed" / "shards").glob("*/shard_*.npy"))


_KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from test_embed_shards import SlowPixels
from dataopt.registry import EMBEDDERS
EMBEDDERS.register("slow_pixels")(SlowPixels)
SlowPixels.delay = 0.4
from dataopt.config import validate
from dataopt.paths import Paths
from dataopt.stages import run_stage
run_stage("embed", validate({{"embed": {{"backend": "slow_pixels", "shard_size": 50, "batch_size": 50}}}}),
          Paths.at({root!r}))
"""


def test_killed_run_resumes_from_finished_shards_bit_for_bit(digits_writer, tmp_path, monkeypatch):
    paths = digits_writer(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN.format(tests=str(TESTS), root=str(paths.root))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    try:
        while not _shard_files(paths):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (paths.artifacts / "embed" / "embeddings.npy").exists()
    done = _shard_files(paths)
    assert 1 <= len(done) < 12
    state = next((paths.artifacts / "embed" / "shards").glob("*/state.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in [*done, state]}

    monkeypatch.setitem(EMBEDDERS._items, "slow_pixels", SlowPixels)
    resumed = _params(backend="slow_pixels", shard_size=50, batch_size=50, keep_shards=True)
    metrics = run_stage("embed", resumed, paths)
    assert metrics["shards"] == 12 and metrics["shards_reused"] == len(done)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished shards were not recomputed
    meta = read_json(paths.artifacts / "embed" / "meta.json")
    assert meta["shards"]["fit_reused"] is True and meta["shards"]["computed"] == 12 - len(done)

    fresh = digits_writer(tmp_path / "fresh")  # the same data, one uninterrupted run
    run_stage("embed", _params(backend="slow_pixels", shard_size=50, batch_size=50), fresh)
    assert np.array_equal(_emb(paths), _emb(fresh))
    assert not (fresh.artifacts / "embed" / "shards").exists()  # removed after the assembly by default
    with np.load(paths.artifacts / "embed" / "knn.npz") as a, np.load(fresh.artifacts / "embed" / "knn.npz") as b:
        assert np.array_equal(a["indices"], b["indices"])


def test_interrupted_proxy_resumes_from_stored_weights(digits_writer, tmp_path):
    params = _params(backend="proxy", shard_size=40, batch_size=40,
                     kwargs={"epochs": 1, "width": 4, "batch_size": 64})
    paths = digits_writer(tmp_path / "a", n=200)

    with pytest.raises(KeyboardInterrupt):
        embed_stage.run(params, paths, map_shards=map_interrupted_after_two)
    assert len(_shard_files(paths)) == 2

    metrics = embed_stage.run(params, paths, map_shards=map_fresh_workers)
    assert metrics["shards"] == 5 and metrics["shards_reused"] == 2
    assert read_json(paths.artifacts / "embed" / "meta.json")["shards"]["fit_reused"] is True

    other = digits_writer(tmp_path / "b", n=200)
    embed_stage.run(params, other)
    assert np.array_equal(_emb(paths), _emb(other))


@pytest.mark.parametrize("backend", ["pixels", "open_clip", "whitened_patches"])
def test_thread_pool_map_shards_gives_identical_embeddings(backend, digits_writer, tmp_path,
                                                           tiny_openclip_checkpoint):
    kwargs = {}
    if backend == "open_clip":
        name, config, checkpoint = tiny_openclip_checkpoint
        kwargs = {"model": name, "model_config": str(config), "pretrained": str(checkpoint)}
    if backend == "whitened_patches":
        kwargs = {"n_patches": 16, "fit_patches": 3000, "dim": 12, "pca_rows": 100}
    params = _params(backend=backend, shard_size=32, batch_size=32, kwargs=kwargs)
    local = digits_writer(tmp_path / "local", n=160)
    embed_stage.run(params, local)
    threaded = digits_writer(tmp_path / "threads", n=160)
    seen = []

    def thread_pool(fn, specs):
        seen.extend(s["index"] for s in specs)
        with ThreadPoolExecutor(max_workers=3) as pool:
            return list(pool.map(fn, specs))

    metrics = embed_stage.run(params, threaded, map_shards=thread_pool)
    assert sorted(seen) == list(range(5)) and metrics["shards"] == 5
    assert np.array_equal(_emb(local), _emb(threaded))
    if backend == "open_clip":
        assert np.array_equal(load_npy(local.artifacts / "embed" / "text_embeddings.npy"),
                              load_npy(threaded.artifacts / "embed" / "text_embeddings.npy"))


def test_nan_stops_at_the_failing_shard_with_its_sample_ids(digits_writer, tmp_path, monkeypatch):
    monkeypatch.setitem(EMBEDDERS._items, "nan_on_white", NaNOnWhite)
    paths = digits_writer(tmp_path, n=200)
    images_path = paths.artifacts / "ingest" / "images.npy"
    images = load_npy(images_path, mmap=False).copy()
    images[[130, 140]] = 255
    save_npy(images_path, images)
    with pytest.raises(DataError, match=r"2 row\(s\) are not finite.*sample_id 130, 140$"):
        run_stage("embed", _params(backend="nan_on_white", shard_size=50), paths)
    assert [p.name for p in _shard_files(paths)] == ["shard_00000.npy", "shard_00001.npy"]
    assert not (paths.artifacts / "embed" / "embeddings.npy").exists()


def test_fingerprint_separates_configurations_and_keep_shards(digits_writer, tmp_path):
    paths = digits_writer(tmp_path, n=100)
    run_stage("embed", _params(shard_size=30, keep_shards=True, kwargs={"dim": 8}), paths)
    folders = sorted((paths.artifacts / "embed" / "shards").iterdir())
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].iterdir()) == [
        "shard_00000.npy", "shard_00001.npy", "shard_00002.npy", "shard_00003.npy", "state.safetensors"]
    assert read_json(paths.artifacts / "embed" / "meta.json")["shards"]["fingerprint"] == folders[0].name
    rows = np.concatenate([load_npy(p) for p in sorted(folders[0].glob("shard_*.npy"))])
    assert np.array_equal(rows, _emb(paths))

    metrics = run_stage("embed", _params(shard_size=30, keep_shards=True, kwargs={"dim": 8}), paths)
    assert metrics["shards_reused"] == 4  # a finished, kept run is reused whole
    run_stage("embed", _params(shard_size=30, keep_shards=True, kwargs={"dim": 4}), paths)
    assert len(list((paths.artifacts / "embed" / "shards").iterdir())) == 2  # other kwargs, other folder
    assert _emb(paths).shape == (100, 4)
    run_stage("embed", _params(shard_size=30, kwargs={"dim": 4}), paths)  # keep_shards: false removes its own
    assert [p.name for p in (paths.artifacts / "embed" / "shards").iterdir()] == [folders[0].name]
    assert os.path.exists(paths.artifacts / "embed" / "embeddings.npy")
