"""Head-only training on embeddings (dataopt.train.head): accuracy, determinism, the plan honoured,
feature-space augmentation, and the safetensors round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dataopt.config import Params
from dataopt.errors import ConfigError, DataError, DivergedError
from dataopt.train import loop
from dataopt.train.checkpoint import load_model, save_model
from dataopt.train.head import train_head
from dataopt.train.trainer import TrainSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    """Standardised digit pixels as float16 'embeddings' (N, 64), labels, and train / test rows."""
    d = load_digits()
    x = d.data.astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    return x.astype(np.float16), y, np.sort(tr), np.sort(te)


def train_set(y, rows, weights=None, sampling=None, augment=None, directives=None) -> TrainSet:
    return TrainSet(rows=rows, labels=y[rows], weights=weights, sampling_weights=sampling,
                    augment_magnitudes=None, n_total=len(rows), class_names=[f"d{i}" for i in range(10)],
                    train_directives=directives or {}, augment=augment or {})


def tp(**kw):
    return Params().train.model_copy(update={"mode": "head", "epochs": 8, "batch_size": 64, "lr": 0.05,
                                             "device": "cpu", **kw})


def accuracy(model, x, y) -> float:
    logits = loop.predict_logits(model, torch.from_numpy(np.asarray(x, np.float32)))
    return float((logits.argmax(1).numpy() == y).mean())


def per_class(model, x, y) -> np.ndarray:
    pred = loop.predict_logits(model, torch.from_numpy(np.asarray(x, np.float32))).argmax(1).numpy()
    return np.array([(pred[y == c] == c).mean() for c in range(10)])


@pytest.mark.parametrize("hidden", [0, 32])
def test_head_learns_digits_quickly(digits, hidden):
    x, y, tr, te = digits
    model, history, config = train_head(x, train_set(y, tr), tp(hidden=hidden), 0, CPU, progress=False)
    assert accuracy(model, x[te], y[te]) > 0.9
    assert len(history) == 8 and history[-1]["samples_seen"] == 8 * len(tr)
    assert history[-1]["loss"] < history[0]["loss"]
    assert config["model"] == "head" and config["input"] == {"kind": "embedding", "dim": 64, "dtype": "float32"}
    assert config["kwargs"] == {"dim": 64, "n_classes": 10, "hidden": hidden, "standardise": True}
    assert config["class_counts"] == np.bincount(y[tr], minlength=10).tolist()
    assert config["train"] == {"batch_size": 64, "epochs": 8, "n_train_total": len(tr), "n_train_kept": len(tr),
                               "mode": "head", "dynamic": {"method": "none", "budget": 1.0}, "adaaugment": False}
    assert config["class_names"][3] == "d3" and config["seed"] == 0


def test_deterministic_for_a_seed(digits):
    x, y, tr, _ = digits
    ts = train_set(y, tr)
    a, ha, _ = train_head(x, ts, tp(hidden=16, epochs=3), 7, CPU, progress=False)
    b, hb, _ = train_head(x, ts, tp(hidden=16, epochs=3), 7, CPU, progress=False)
    c, _, _ = train_head(x, ts, tp(hidden=16, epochs=3), 8, CPU, progress=False)
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_keep_and_zero_weight_class_not_learned(digits):
    x, y, tr, te = digits
    # keep: class 4 dropped from the rows; weights: class 7 kept with loss weight 0
    kept = tr[y[tr] != 4]
    w = np.where(y[kept] == 7, 0.0, 1.0)
    model, _, config = train_head(x, train_set(y, kept, weights=w), tp(), 0, CPU, progress=False)
    acc = per_class(model, x[te], y[te])
    assert acc[4] == 0.0 and acc[7] <= 0.1
    assert np.delete(acc, [4, 7]).min() > 0.8
    assert config["class_counts"][4] == 0 and config["class_counts"][7] == int((y[tr] == 7).sum())


def test_sampling_weights_and_loss_directives_run(digits):
    x, y, tr, te = digits
    draws = np.where(y[tr] == 0, 5.0, 1.0)
    ts = train_set(y, tr, sampling=draws, directives={"focal": {"gamma": 2.0}})
    model, history, _ = train_head(x, ts, tp(), 0, CPU, progress=False)
    assert history[-1]["samples_seen"] == 8 * len(tr) and accuracy(model, x[te], y[te]) > 0.85


def test_gaussian_noise_changes_training_but_still_learns(digits):
    x, y, tr, te = digits
    plain, _, _ = train_head(x, train_set(y, tr), tp(epochs=3), 0, CPU, progress=False)
    aug = {"features": {"policy": "gaussian_noise", "sigma": 0.3}}
    noisy, _, config = train_head(x, train_set(y, tr, augment=aug), tp(epochs=3), 0, CPU, progress=False)
    assert config["features_augment"] == {"policy": "gaussian_noise", "sigma": 0.3}
    assert not torch.equal(plain.fc.weight, noisy.fc.weight)
    assert accuracy(noisy, x[te], y[te]) > 0.85
    again, _, _ = train_head(x, train_set(y, tr, augment=aug), tp(epochs=3), 0, CPU, progress=False)
    assert torch.equal(noisy.fc.weight, again.fc.weight)  # the noise comes from the seeded generator


def test_smote_fills_minority_classes(digits):
    x, y, tr, te = digits
    # class 2 reduced to 6 training rows; SMOTE brings it back up to the largest class
    few = tr[y[tr] == 2][:6]
    rows = np.sort(np.concatenate([tr[y[tr] != 2], few]))
    w = np.full(len(rows), 2.0)  # explicit weights get 1 for the synthetic rows
    aug = {"features": {"policy": "smote", "k": 3, "target": "max"}}
    model, history, config = train_head(x, train_set(y, rows, weights=w, augment=aug), tp(), 0, CPU,
                                        progress=False)
    counts = np.bincount(y[rows], minlength=10)
    want = int((counts.max() - counts).sum())
    assert config["features_augment"]["n_synthetic"] == want > 0
    assert config["class_counts"] == counts.tolist()  # the real rows, not the synthetic ones
    assert history[-1]["samples_seen"] == 8 * (len(rows) + want)
    assert accuracy(model, x[te], y[te]) > 0.85


def test_unknown_feature_policy_and_bad_embeddings(digits):
    x, y, tr, _ = digits
    with pytest.raises(ConfigError, match="augment.features"):
        train_head(x, train_set(y, tr, augment={"features": {"policy": "jitter"}}), tp(), 0, CPU, progress=False)
    with pytest.raises(DataError, match="re-run the 'embed' stage"):
        train_head(x[:100], train_set(y, tr), tp(), 0, CPU, progress=False)
    with pytest.raises(DataError, match=r"\(N, d\)"):
        train_head(x[:, :, None], train_set(y, tr), tp(), 0, CPU, progress=False)


def test_image_policies_are_ignored_by_the_head(digits):
    x, y, tr, _ = digits
    ts = train_set(y, tr, augment={"image": {"policy": "randaugment", "num_ops": 2, "magnitude": 9,
                                             "num_magnitude_bins": 31}})
    a, _, _ = train_head(x, ts, tp(epochs=2), 0, CPU, progress=False)
    b, _, _ = train_head(x, train_set(y, tr), tp(epochs=2), 0, CPU, progress=False)
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_fit_kwargs_reach_the_loop(digits):
    x, y, tr, _ = digits
    seen = []
    _, history, _ = train_head(x, train_set(y, tr), tp(epochs=2), 0, CPU, progress=False,
                               on_epoch=lambda e, m: seen.append(e) or {"probe": e})
    assert seen == [1, 2] and [r["probe"] for r in history] == [1, 2]


@pytest.mark.parametrize("hidden", [0, 24])
def test_saved_head_predicts_identically(digits, tmp_path, hidden):
    x, y, tr, te = digits
    model, _, config = train_head(x, train_set(y, tr), tp(epochs=2, hidden=hidden), 0, CPU, progress=False)
    save_model(tmp_path / "model", model, config)
    loaded, cfg = load_model(tmp_path / "model")
    assert cfg == config
    xt = torch.from_numpy(x[te].astype(np.float32))
    assert torch.equal(loop.predict_logits(model, xt), loop.predict_logits(loaded, xt))


def test_train_dynamic_is_honoured_without_a_selector_argument(digits):
    x, y, tr, _ = digits
    dyn = tp(epochs=4).dynamic.model_copy(update={"method": "random", "budget": 0.5})
    _, history, config = train_head(x, train_set(y, tr), tp(epochs=4, dynamic=dyn), 0, CPU, progress=False)
    assert history[-1]["samples_seen"] == sum(h["dyn_selected"] for h in history) == round(0.5 * len(tr) * 4)
    assert config["train"]["dynamic"] == {"method": "random", "budget": 0.5}


def test_smote_with_a_selector_fitted_on_the_kept_rows_is_refused(digits):
    x, y, tr, _ = digits
    rows = np.sort(np.concatenate([tr[y[tr] != 2], tr[y[tr] == 2][:6]]))
    aug = {"features": {"policy": "smote", "k": 3}}

    class FittedOnKept:  # what a dynamic selector fitted on ts.n_kept rows looks like to train_head
        n_ = len(rows)

    with pytest.raises(ConfigError, match="smote adds .* rows .* selector"):
        train_head(x, train_set(y, rows, augment=aug), tp(), 0, CPU, progress=False, selector=FittedOnKept())


def test_divergence_stops_the_head_with_one_message(digits):
    x, y, tr, _ = digits
    with pytest.raises(DivergedError, match=r"^train head diverged at epoch 1, step \d+: loss is (nan|inf); "
                                            r"lower train\.lr \(1e\+30\)$"):
        train_head(x, train_set(y, tr), tp(lr=1e30), 0, CPU, progress=False)
