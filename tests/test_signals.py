"""The signal catalogue: shapes, dtypes, documented directions on injected label noise, and the exactness of
the closed forms (DIVA eq. 13 and its gradient, kNN-Shapley, GraNd, Vendi, confident-joint noise rate)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dataopt.config import validate
from dataopt.errors import DataError
from dataopt.io import read_json, save_npy
from dataopt.perceive.dynamics import Dynamics
from dataopt.perceive.signals import compute_signals
from dataopt.perceive.diversity import vendi_score
from dataopt.perceive.summary import confident_joint_noise_rate
from dataopt.perceive.timing import synthetic_inputs
from dataopt.perceive.valuation import (diva_loo_gradient, knn_shapley_matrix, knn_shapley_values,
                                        ridge_loo_predictions)
from dataopt.registry import SIGNALS
from dataopt.stages import run_stage
from dataopt.train.nets import Head

# signal -> +1 when mislabeled rows score higher, -1 when lower (the catalogue's documented direction)
NOISE_DIRECTION = {
    "margin_last": -1, "margin_mean": -1, "aum": -1, "grand": +1, "el2n": +1, "loss_early": +1,
    "loss_last": +1, "confidence": -1, "cartography_confidence": -1, "cartography_correctness": -1,
    "diva_grad": +1, "knn_shapley": -1, "semantic_consistency": -1, "knn_label_agreement": -1,
    "class_center_distance": +1,
}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, digits_writer):
    """Digits with 15% of the train labels flipped, embedded and perceived with the default params."""
    paths = digits_writer(tmp_path_factory.mktemp("noisy"), noise_rate=0.15)
    params = validate({})
    run_stage("embed", params, paths)
    run_stage("perceive", params, paths)
    sig = pq.read_table(paths.artifacts / "perceive" / "signals.parquet").to_pandas()
    samples = pq.read_table(paths.artifacts / "ingest" / "samples.parquet").to_pandas().set_index("sample_id")
    flipped = sig.label.to_numpy() != samples.loc[sig.sample_id, "label_clean"].to_numpy()
    return paths, sig, flipped


def test_every_signal_is_a_finite_column_of_its_dtype(noisy):
    paths, sig, _ = noisy
    meta = pq.read_schema(paths.artifacts / "perceive" / "signals.parquet").metadata
    cat = json.loads(meta[b"dataopt.signals"])
    assert set(SIGNALS.names()) >= {
        "grand", "aum", "cartography_confidence", "cartography_variability", "cartography_correctness",
        "entropy", "semantic_consistency", "diva_grad", "knn_shapley", "knn_density", "knn_label_agreement",
        "class_center_distance"}
    for name in SIGNALS.names():
        col = sig[name]
        assert len(col) == 480 and str(col.dtype) == cat[name]["dtype"] == SIGNALS.get(name).dtype, name
        assert col.notna().all() and (col.dtype == bool or np.isfinite(col.astype(float)).all()), name
        card = cat[name]
        assert card["granularity"] == "sample" and card["type"] and card["description"], name
        assert card["direction"].split()[0] in {"higher", "lower", "False", "none"}, name
    for name, sign in NOISE_DIRECTION.items():  # the catalogue says what the test below checks
        assert cat[name]["direction"].startswith("higher" if sign > 0 else "lower"), name


@pytest.mark.parametrize("name", sorted(NOISE_DIRECTION))
def test_documented_direction_on_flipped_labels(noisy, name):
    _, sig, flipped = noisy
    v = sig[name].to_numpy(dtype=np.float64)
    assert roc_auc_score(flipped, NOISE_DIRECTION[name] * v) > 0.9, name
    assert NOISE_DIRECTION[name] * (v[flipped].mean() - v[~flipped].mean()) > 0, name


def test_signals_follow_their_definitions_on_the_recorded_dynamics(noisy):
    paths, sig, flipped = noisy
    dyn = Dynamics.load(paths.artifacts / "perceive" / "dynamics.npz")
    np.testing.assert_allclose(sig.aum, dyn.logit_margin.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(sig.cartography_confidence, dyn.p_label.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(sig.cartography_variability, dyn.p_label.astype(np.float64).std(0), atol=1e-7)
    np.testing.assert_allclose(sig.cartography_correctness, dyn.correct.mean(0))
    e = 2  # early_epochs = 3 by default: GraNd at epoch 3
    h = dyn.feature_norm[e].astype(np.float64)
    np.testing.assert_allclose(sig.grand, dyn.error_norm[e] * np.sqrt(h ** 2 + 1), rtol=1e-6)
    np.testing.assert_allclose(sig.semantic_consistency, dyn.p_label[-1], rtol=1e-6)  # no text embeddings
    cat = read_json(paths.artifacts / "perceive" / "corpus.json")["signals"]
    assert "computed at epoch 3" in cat["grand"]["description"]
    # the DIVA detrimental set (eq. 15, eps = 0) holds most flipped rows and few clean ones
    assert (sig.diva_grad[flipped] > 0).mean() > 0.9 and (sig.diva_grad[~flipped] > 0).mean() < 0.1
    assert (sig.knn_shapley[flipped] < 0).mean() > 0.8 and (sig.knn_shapley[~flipped] > 0).mean() > 0.9


def test_grand_closed_form_is_the_last_layer_gradient_norm():
    """||(p - y) ⊗ [h, 1]|| equals the norm of the autograd gradient of the cross-entropy w.r.t. fc."""
    torch.manual_seed(0)
    head = Head(6, 4, hidden=5).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    h = head.features(x)
    p = torch.softmax(head(x), 1)
    closed = (p - torch.nn.functional.one_hot(y, 4)).norm(dim=1) * (h.norm(dim=1) ** 2 + 1).sqrt()
    for i in range(7):
        loss = torch.nn.functional.cross_entropy(head(x[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [head.fc.weight, head.fc.bias])
        norm = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum()).item()
        assert norm == pytest.approx(closed[i].item(), rel=1e-10)


def _tiny_ridge(seed: int = 0, n: int = 9, d: int = 3, c: int = 3):
    rng = np.random.default_rng(seed)
    z = torch.tensor(rng.normal(size=(n, d)))
    y = torch.nn.functional.one_hot(torch.tensor(rng.integers(0, c, n)), c).double()
    alpha = torch.tensor(rng.uniform(0.3, 2.0, n))
    return z, y, alpha


def test_diva_eq13_equals_explicit_leave_one_out_refits():
    z, y, alpha = _tiny_ridge()
    lam = 0.7
    loo = ridge_loo_predictions(z, y, alpha, lam)
    for i in range(len(z)):
        keep = torch.arange(len(z)) != i
        zk, yk, ak = z[keep], y[keep], alpha[keep]
        w = torch.linalg.solve(zk.T @ (ak[:, None] * zk) + lam * torch.eye(z.shape[1], dtype=z.dtype),
                               zk.T @ (ak[:, None] * yk))  # eq. 12 refitted without row i
        torch.testing.assert_close(loo[i], z[i] @ w, rtol=1e-10, atol=1e-12)


def test_diva_autograd_gradient_matches_finite_differences():
    z, y, _ = _tiny_ridge(seed=1, n=10, d=4, c=2)
    labels = y.argmax(1).numpy()
    ridge = 0.3
    grad, lam = diva_loo_gradient(z.numpy(), labels, 2, ridge=ridge)
    zb = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)  # diva_loo_gradient adds a bias column
    assert lam == pytest.approx(ridge * float((zb * zb).sum()) / zb.shape[1])

    def loss(alpha: torch.Tensor) -> float:
        return float((ridge_loo_predictions(zb, y, alpha, lam) - y).pow(2).sum())

    eps, fd = 1e-6, np.zeros(len(z))
    for i in range(len(z)):
        e = torch.zeros(len(z), dtype=torch.float64)
        e[i] = eps
        fd[i] = (loss(1 + e) - loss(1 - e)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
    assert grad.dtype == np.float64 and np.abs(grad).max() > 1e-3  # not trivially zero


def _brute_shapley(labs: np.ndarray, y_test: int, k: int) -> np.ndarray:
    """Shapley values by enumerating every coalition; utility = (1/k) * matches among the k nearest."""
    m = len(labs)

    def util(s: tuple) -> float:
        return sum(labs[p] == y_test for p in sorted(s)[:k]) / k  # position = distance rank

    v = np.zeros(m)
    for j in range(m):
        others = [p for p in range(m) if p != j]
        for r in range(m):
            w = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
            for s in itertools.combinations(others, r):
                v[j] += w * (util(s + (j,)) - util(s))
    return v


def test_knn_shapley_recursion_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(25):
        m, k = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        labs, y_test = rng.integers(0, 3, m), int(rng.integers(0, 3))
        np.testing.assert_allclose(knn_shapley_matrix(labs[None], np.array([y_test]), k)[0],
                                   _brute_shapley(labs, y_test, k), atol=1e-12)
    # K = 1: only the nearest point earns value, the farther ones share nothing when they mismatch
    np.testing.assert_allclose(knn_shapley_matrix(np.array([[1, 0, 0]]), np.array([1]), 1), [[1, 0, 0]])


def test_knn_shapley_values_sum_the_per_test_point_games():
    rng = np.random.default_rng(1)
    n, m = 8, 4
    labels = rng.integers(0, 2, n)
    idx = np.stack([rng.permutation(np.delete(np.arange(n), i))[:m] for i in range(n)])
    expected = np.zeros(n)
    for i in range(n):
        expected[idx[i]] += _brute_shapley(labels[idx[i]], labels[i], 2)
    np.testing.assert_allclose(knn_shapley_values(idx, labels, k=2), expected, atol=1e-12)
    # efficiency: each test point distributes U(all) = share of matches among its k nearest
    assert knn_shapley_values(idx, labels, k=2).sum() == pytest.approx(
        (labels[idx[:, :2]] == labels[:, None]).mean(1).sum())


def test_vendi_score_identical_orthogonal_and_gram_trick():
    assert vendi_score(np.tile([[0.6, 0.8, 0.0]], (5, 1))) == pytest.approx(1.0)
    assert vendi_score(np.eye(7)) == pytest.approx(7.0)
    assert vendi_score(3 * np.eye(4, 9)) == pytest.approx(4.0)  # scale-free: cosine kernel
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))  # n > d: the d x d Gram path
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.clip(np.linalg.eigvalsh(xh @ xh.T / 40), 1e-300, None)  # the n x n definition
    assert vendi_score(x) == pytest.approx(float(np.exp(-(lam * np.log(lam)).sum())), rel=1e-9)
    assert 1 < vendi_score(x) <= 6


def test_confident_joint_noise_rate():
    labels = np.repeat(np.arange(3), 10)
    assert confident_joint_noise_rate(np.eye(3)[labels] * 0.8 + 0.2 / 3, labels) == pytest.approx(0.0)
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    wrong = [0, 1, 10, 20]  # rows confidently predicted as another class
    probs[wrong] = np.eye(3)[[1, 2, 0, 1]] * 0.9 + 0.1 / 3
    assert confident_joint_noise_rate(probs, labels) == pytest.approx(4 / 30)


def test_semantic_consistency_uses_text_embeddings_when_present(tmp_path, digits_writer):
    paths = digits_writer(tmp_path, noise_rate=0.15)
    params = validate({"perceive": {"epochs": 2, "early_epochs": 1, "folds": 2}})
    run_stage("embed", params, paths)
    emb = np.load(paths.artifacts / "embed" / "embeddings.npy").astype(np.float64)
    samples = pq.read_table(paths.artifacts / "ingest" / "samples.parquet").to_pandas()
    train = (samples.split == "train").to_numpy()
    # class "text" embeddings: the normalised mean image embedding of each clean class
    text = np.stack([emb[(samples.label_clean == c).to_numpy()].mean(0) for c in range(10)])
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    save_npy(paths.artifacts / "embed" / "text_embeddings.npy", text.astype(np.float16))
    run_stage("perceive", params, paths)
    sig = pq.read_table(paths.artifacts / "perceive" / "signals.parquet").to_pandas()
    corpus = read_json(paths.artifacts / "perceive" / "corpus.json")
    assert corpus["semantic_consistency_source"] == "text_cosine"
    assert corpus["signals"]["semantic_consistency"]["description"].startswith("cosine")
    z = emb[train] / np.linalg.norm(emb[train], axis=1, keepdims=True)
    t = text.astype(np.float16).astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    np.testing.assert_allclose(sig.semantic_consistency, (z * t[sig.label]).sum(1), atol=1e-6)
    flipped = sig.label.to_numpy() != samples.label_clean.to_numpy()[train]
    assert roc_auc_score(flipped, -sig.semantic_consistency) > 0.9

    save_npy(paths.artifacts / "embed" / "text_embeddings.npy", np.ones((10, 3), np.float16))
    with pytest.raises(DataError, match="text_embeddings.npy has shape \\(10, 3\\).*'embed'"):
        run_stage("perceive", params, paths)


def test_signal_kwargs_reach_the_signals():
    inputs = synthetic_inputs(n=300, d=16, k=6, epochs=4)
    v, cat = compute_signals(inputs, ["knn_shapley", "grand"], kwargs={"knn_shapley": {"k": 1},
                                                                     "grand": {"early_epochs": 4}})
    np.testing.assert_allclose(v["knn_shapley"], knn_shapley_values(inputs.knn_indices, inputs.labels, k=1))
    d = inputs.dynamics
    h = d.feature_norm[3].astype(np.float64)
    np.testing.assert_allclose(v["grand"], d.error_norm[3] * np.sqrt(h ** 2 + 1), rtol=1e-6)
    assert "epoch 4" in cat["grand"]["description"]


def test_deterministic_for_a_seed():
    a, _ = compute_signals(synthetic_inputs(n=400, d=24, seed=3), early_epochs=2)
    b, _ = compute_signals(synthetic_inputs(n=400, d=24, seed=3), early_epochs=2)
    assert set(a) == set(SIGNALS.names())
    for name in a:
        assert a[name].shape == (400,) and np.array_equal(a[name], b[name]), name
    pd.testing.assert_frame_equal(pd.DataFrame(a), pd.DataFrame(b), check_exact=True)


def test_diva_on_wide_embeddings_uses_their_principal_components():
    """The ridge costs n d^2: embeddings wider than max_dim are projected first, with the same verdicts
    when the projection keeps the signal (here rank 12 < max_dim 16)."""
    from dataopt.perceive.signals import DivaGrad, SignalInputs

    rng = np.random.default_rng(0)
    n, classes = 400, 4
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, 12)) * 3
    z = (centres[y] + rng.normal(size=(n, 12))) @ rng.normal(size=(12, 64))
    flipped = rng.random(n) < 0.15
    noisy = np.where(flipped, (y + 1) % classes, y)
    inputs = SignalInputs(embeddings=z.astype(np.float32), labels=noisy)
    wide = DivaGrad(max_dim=16)
    g = wide.compute(inputs)
    assert wide.projected_["from_dim"] == 64 and wide.projected_["to_dim"] == 16
    full = DivaGrad(max_dim=None)
    g_full = full.compute(inputs)
    assert full.projected_ is None
    assert roc_auc_score(flipped, g) > 0.95 and roc_auc_score(flipped, g_full) > 0.95
    assert np.corrcoef(g, g_full)[0, 1] > 0.9


def test_vendi_score_of_a_wide_set_from_its_leading_eigenvalues():
    from dataopt.perceive.diversity import vendi_score

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 30)) @ rng.normal(size=(30, 400)) + 0.05 * rng.normal(size=(600, 400))
    exact = vendi_score(x, max_rank=1000)
    assert vendi_score(x, max_rank=100) == pytest.approx(exact, rel=0.01)
    assert 25 < exact < 40  # about the 30 directions the rows span
