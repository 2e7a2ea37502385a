"""The ``proxy`` embedder's K fold models: out-of-fold class probabilities, proxy_probs.npz, resume."""
from __future__ import annotations


import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import map_fresh_workers, map_interrupted_after_two
from dataopt.config import validate
from dataopt.embed import backends
from dataopt.embed.backends import ProxyEmbedder
from dataopt.embed import shards as shardlib
from dataopt.errors import DataError
from dataopt.io import load_npy, read_json
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.stages import embed as embed_stage
from dataopt.stages import run_stage
from dataopt.train.loop import images_to_tensor, predict_logits

CPU = torch.device("cpu")
TINY = {"epochs": 2, "width": 4, "batch_size": 64}  # stage runs: shapes and bookkeeping, not accuracy


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two cores shared by several test runs: one torch thread avoids oversubscription (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(seed: int = 0, **kwargs):
    return check_methods(validate({"seed": seed, "embed": {"backend": "proxy", "device": "cpu",
                                                           "kwargs": {**TINY, **kwargs}}}))


def _samples(paths: Paths) -> dict[str, np.ndarray]:
    t = pq.read_table(paths.artifacts / "ingest" / "samples.parquet", columns=["sample_id", "split", "label"])
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def _probs(paths: Paths) -> dict[str, np.ndarray]:
    with np.load(paths.artifacts / "embed" / "proxy_probs.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _emb(paths: Paths) -> np.ndarray:
    return load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False)


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.round(d.images[:n] * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), d.target[:n].astype(np.int64)


def test_stage_writes_proxy_probs_with_meta(digits_writer, tmp_path):
    paths = digits_writer(tmp_path, n=200)
    metrics = run_stage("embed", _params(folds=3), paths)
    s = _samples(paths)
    z = _probs(paths)
    assert set(z) == {"sample_id", "probs", "fold", "out_of_fold"}
    assert np.array_equal(z["sample_id"], s["sample_id"]) and z["sample_id"].dtype == np.int64
    assert z["probs"].dtype == np.float32 and z["probs"].shape == (200, 10)
    assert (z["probs"] >= 0).all()
    np.testing.assert_allclose(z["probs"].sum(1), 1.0, atol=1e-5)
    train = s["split"] == "train"
    assert z["fold"].dtype == np.int64 and (z["fold"][~train] == -1).all()
    assert sorted(np.unique(z["fold"][train])) == [0, 1, 2]
    assert np.bincount(z["fold"][train]).min() >= train.sum() // 3 - 1  # balanced folds
    assert z["out_of_fold"].dtype == bool and np.array_equal(z["out_of_fold"], train)

    meta = read_json(paths.artifacts / "embed" / "meta.json")
    oof_acc = (z["probs"][train].argmax(1) == s["label"][train]).mean()
    assert meta["proxy_probs"]["folds"] == 3 and meta["proxy_probs"]["path"] == "embed/proxy_probs.npz"
    assert meta["proxy_probs"]["oof_accuracy"] == pytest.approx(oof_acc, abs=1e-6)
    assert meta["proxy_probs"]["n_out_of_fold"] == int(train.sum())
    assert metrics["proxy_oof_accuracy"] == pytest.approx(oof_acc, abs=1e-6)
    assert meta["features"]["proxy_probs"]["folds"] == 3 and len(meta["features"]["proxy_probs"]["fold_train_loss"]) == 3
    assert meta["kwargs"]["folds"] == 3


def test_each_train_row_is_scored_by_the_one_fold_model_that_never_saw_it(monkeypatch):
    # distinct random images so that a training batch can be matched to rows by their bytes
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (90, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(90) % 3
    seen: list[set[bytes]] = []
    real_fit = backends.fit

    def recording_fit(model, x, y, cfg):
        seen.append({bytes(r) for r in x.permute(0, 2, 3, 1).contiguous().numpy().reshape(len(x), -1)})
        return real_fit(model, x, y, cfg)

    monkeypatch.setattr(backends, "fit", recording_fit)
    train_idx = np.arange(0, 90, 2)[::-1].copy()  # train rows interleaved with other rows, reversed order
    emb = ProxyEmbedder(epochs=1, width=4, batch_size=16, folds=3, device="cpu", transform_batch_size=7)
    emb.fit(images[train_idx], labels[train_idx], n_classes=3)
    assert len(seen) == 4 and len(seen[0]) == len(train_idx)  # the full model, then one per fold
    out = emb.class_probs(images, train_idx)
    fold = out["fold"]
    assert np.array_equal(fold[train_idx], emb.fold_of_train_) and (np.delete(fold, train_idx) == -1).all()
    x = images_to_tensor(images, CPU)
    all_probs = [torch.softmax(predict_logits(m, x), 1).numpy() for m in emb.fold_models_]
    for k in range(3):
        held_out = np.flatnonzero(fold == k)
        assert not {bytes(images[i]) for i in held_out} & seen[k + 1]  # fold model k never trained on them
        assert len(seen[k + 1]) == len(train_idx) - len(held_out)
        np.testing.assert_allclose(out["probs"][held_out], all_probs[k][held_out], atol=1e-6)
    outside = fold == -1
    np.testing.assert_allclose(out["probs"][outside], np.mean(all_probs, axis=0)[outside], atol=1e-6)


def test_noise_labels_are_memorised_in_sample_but_not_predicted_out_of_fold():
    images, clean = _digits(300)
    n_train = 240
    train_idx = np.arange(n_train)
    noise = np.random.default_rng(1).integers(0, 10, n_train)  # labels carrying no information
    emb = ProxyEmbedder(epochs=20, width=8, lr=0.1, batch_size=32, folds=4, device="cpu", random_state=0)
    emb.fit(images[train_idx], noise, n_classes=10)
    in_sample = (predict_logits(emb.model_, images_to_tensor(images[train_idx], CPU)).argmax(1).numpy()
                 == noise).mean()
    probs = emb.class_probs(images, train_idx)["probs"]
    oof = (probs[train_idx].argmax(1) == noise).mean()
    assert in_sample > 0.5  # the full model memorises noise: in-sample scores are optimistic
    assert oof < 0.2  # chance is 0.1: a fold model cannot predict a noise label it never saw

    real = ProxyEmbedder(epochs=8, width=8, lr=0.1, batch_size=32, folds=4, device="cpu", random_state=0)
    probs = real.fit(images[train_idx], clean[train_idx], n_classes=10).class_probs(images, train_idx)["probs"]
    assert (probs[train_idx].argmax(1) == clean[train_idx]).mean() > 0.8
    assert (probs[n_train:].argmax(1) == clean[n_train:]).mean() > 0.8  # test rows: fold-model mean


def test_deterministic_for_a_seed_and_embeddings_do_not_depend_on_folds(digits_writer, tmp_path):
    a, b, c, d = (digits_writer(tmp_path / name, n=150) for name in "abcd")
    run_stage("embed", _params(folds=2), a)
    run_stage("embed", _params(folds=2), b)
    za, zb = _probs(a), _probs(b)
    assert all(np.array_equal(za[k], zb[k]) for k in za)
    assert np.array_equal(_emb(a), _emb(b))
    run_stage("embed", _params(seed=1, folds=2), c)
    assert not np.array_equal(_probs(c)["probs"], za["probs"])  # another seed, other folds and models
    run_stage("embed", _params(folds=0), d)
    assert np.array_equal(_emb(d), _emb(a))  # the full-split model is the same with or without folds


@pytest.mark.parametrize("off", [0, 1])
def test_folds_off_writes_no_probs_and_removes_a_stale_file(off, digits_writer, tmp_path):
    # the declared output always exists; without probabilities it holds empty arrays, never stale ones
    paths = digits_writer(tmp_path, n=120)
    probs_file = paths.artifacts / "embed" / "proxy_probs.npz"

    def n_rows() -> int:
        with np.load(probs_file) as z:
            return len(z["probs"])

    run_stage("embed", _params(folds=2), paths)
    assert n_rows() == 120
    run_stage("embed", _params(folds=off), paths)
    assert n_rows() == 0
    meta = read_json(paths.artifacts / "embed" / "meta.json")
    assert meta["proxy_probs"] is None and "proxy_probs" not in meta["features"]
    run_stage("embed", validate({"embed": {"backend": "pixels"}}), paths)  # another backend: none either
    assert n_rows() == 0


def test_too_few_rows_for_the_folds_is_a_data_error():
    images, labels = _digits(3)
    with pytest.raises(DataError, match="folds=4 needs at least 4 train rows; got 3"):
        ProxyEmbedder(epochs=1, width=4, folds=4, device="cpu").fit(images, labels, n_classes=10)


def test_state_round_trip_restores_the_fold_models(tmp_path):
    images, labels = _digits(80)
    train_idx = np.arange(60)
    fitted = ProxyEmbedder(epochs=1, width=4, folds=3, device="cpu").fit(images[train_idx], labels[train_idx], 10)
    shardlib.save_state(tmp_path / "state.safetensors", *fitted.get_state())
    arrays, meta = shardlib.load_state(tmp_path / "state.safetensors")
    assert meta["folds"] == 3 and "fold_models/2/fc.weight" in arrays and "fold_of_train" in arrays
    restored = ProxyEmbedder(epochs=1, width=4, folds=3, device="cpu").set_state(arrays, meta)
    assert np.array_equal(restored.transform(images), fitted.transform(images))
    a, b = fitted.class_probs(images, train_idx), restored.class_probs(images, train_idx)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert restored.info() == fitted.info()


def test_interrupted_run_resumes_with_stored_fold_models_bit_for_bit(digits_writer, tmp_path, monkeypatch):
    params = validate({"embed": {"backend": "proxy", "device": "cpu", "shard_size": 40, "batch_size": 40,
                                 "kwargs": {**TINY, "folds": 3}}})
    paths = digits_writer(tmp_path / "a", n=200)

    with pytest.raises(KeyboardInterrupt):
        embed_stage.run(params, paths, map_shards=map_interrupted_after_two)
    assert not (paths.artifacts / "embed" / "proxy_probs.npz").exists()
    state = next((paths.artifacts / "embed" / "shards").glob("*/state.safetensors"))
    assert shardlib.load_state(state)[1]["folds"] == 3

    def no_fit(self, *args, **kwargs):
        raise AssertionError("a resumed run must restore the fitted models, not train them again")

    with monkeypatch.context() as m:
        m.setattr(ProxyEmbedder, "fit", no_fit)
        metrics = embed_stage.run(params, paths, map_shards=map_fresh_workers)
    assert metrics["shards"] == 5 and metrics["shards_reused"] == 2
    assert read_json(paths.artifacts / "embed" / "meta.json")["shards"]["fit_reused"] is True

    other = digits_writer(tmp_path / "b", n=200)
    embed_stage.run(params, other)
    assert np.array_equal(_emb(paths), _emb(other))
    za, zb = _probs(paths), _probs(other)
    assert all(np.array_equal(za[k], zb[k]) for k in za)
    assert read_json(paths.artifacts / "embed" / "meta.json")["proxy_probs"] == \
        read_json(other.artifacts / "embed" / "meta.json")["proxy_probs"]
