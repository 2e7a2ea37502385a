"""The train stage on scikit-learn digits: plan honoured (keep, weight, sampling, relabel), determinism,
safetensors round trip and readable errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dataopt import image_kernels
from dataopt.config import Params
from dataopt.errors import DataError, DataWarning, DivergedError, MissingArtifactError, UserError
from dataopt.io import save_npy, write_parquet
from dataopt.paths import Paths
from dataopt.schema import PLAN_COLUMNS, SAMPLES_COLUMNS
from dataopt.stages import run_stage
from dataopt.stages import train as train_stage
from dataopt.train import loop
from dataopt.train.checkpoint import load_model

EPOCHS, WIDTH = 4, 16  # small and quick; still >= 0.9 test accuracy on digits


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    """Digits as uint8 RGB 8x8, with a stratified 80/20 split interleaved in the original order."""
    d = load_digits()
    images = np.repeat(np.round(d.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=3)
    _, test_idx = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    split = np.full(len(d.target), "train", dtype=object)
    split[test_idx] = "test"
    return images, d.target.astype(np.int64), split


def write_project(root, digits) -> Paths:
    """samples.parquet + images.npy under ``root/artifacts/ingest`` (columns of SAMPLES_COLUMNS)."""
    images, labels, split = digits
    n = len(labels)
    cols = {
        "sample_id": np.arange(1000, 1000 + n, dtype=np.int64),
        "split": split.astype(str),
        "label": labels,
        "label_name": np.array([f"digit_{v}" for v in labels]),
        "label_clean": labels,
        "source": np.array([f"digits#row={i}" for i in range(n)]),
        "source_id": np.array([str(i) for i in range(n)]),
        "orig_height": np.full(n, 8, np.int64),
        "orig_width": np.full(n, 8, np.int64),
        "orig_mode": np.full(n, "L"),
        "note": np.full(n, "converted from L"),
        "content_hash": np.array([str(i) for i in range(n)]),
        "duplicate_of": pa.nulls(n, pa.int64()),
        "batch": np.full(n, "reference"),
    }
    table = pa.table({k: cols[k] for k in SAMPLES_COLUMNS})
    paths = Paths.at(root)
    write_parquet(paths.stage("ingest") / "samples.parquet", table)
    save_npy(paths.stage("ingest") / "images.npy", images)
    return paths


def write_plan(paths: Paths, **columns) -> pd.DataFrame:
    """A keep-everything plan over the train rows, with ``columns`` (arrays over train rows) replaced."""
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    tr = s[s["split"] == "train"]
    n = len(tr)
    plan = pd.DataFrame({
        "sample_id": tr["sample_id"].to_numpy(np.int64),
        "keep": np.ones(n, bool),
        "weight": np.ones(n),
        "sampling_weight": np.ones(n),
        "augment_magnitude": np.zeros(n),
        "new_label": tr["label"].to_numpy(np.int64),
        "reason": np.full(n, "test"),
    })
    for k, v in columns.items():
        plan[k] = v
    plan = plan[list(PLAN_COLUMNS)]
    write_parquet(paths.stage("optimize") / "plan.parquet", plan)
    return plan


def params(**train) -> Params:
    base = {"epochs": EPOCHS, "width": WIDTH, "device": "cpu"}
    base.update(train)
    p = Params()
    return p.model_copy(update={"train": p.train.model_copy(update=base)})


def train_labels(paths: Paths) -> np.ndarray:
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    return s.loc[s["split"] == "train", "label"].to_numpy()


def test_predictions(paths: Paths) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) labels of the saved model on the test rows."""
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    test = (s["split"] == "test").to_numpy()
    model, _ = load_model(paths.artifacts / "train" / "model")
    x = loop.images_to_tensor(np.load(paths.artifacts / "ingest" / "images.npy")[test], torch.device("cpu"))
    return loop.predict_logits(model, x).argmax(1).numpy(), s.loc[test, "label"].to_numpy()


test_predictions.__test__ = False  # a helper, not a test


def class_acc(pred, true, c) -> float:
    return float((pred[true == c] == c).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """One full-plan run through run_stage, shared by the read-only tests below."""
    paths = write_project(tmp_path_factory.mktemp("full"), digits)
    write_plan(paths)
    metrics = run_stage("train", params(), paths)
    return paths, metrics



def test_full_plan_trains_accurate_model_and_writes_artifacts(trained):
    paths, metrics = trained
    out = paths.artifacts / "train"
    for f in ("model/model.safetensors", "model/config.json", "history.json", "metrics.json"):
        assert (out / f).is_file(), f
    n_total = len(train_labels(paths))
    assert metrics["n_train_total"] == metrics["n_train_kept"] == n_total
    assert metrics["epochs"] == EPOCHS and metrics["samples_seen"] == n_total * EPOCHS
    assert metrics["steps"] == EPOCHS * int(np.ceil(n_total / 128))
    assert metrics["device"] == "cpu" and metrics["sampling"] == "uniform" and metrics["n_augmented"] == 0
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert {"epoch", "loss", "samples_seen", "steps", "seconds", "lr"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"] and metrics["final_loss"] == history[-1]["loss"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model"] == "small_cnn" and config["seed"] == 0
    assert config["kwargs"] == {"n_classes": 10, "in_channels": 3, "width": WIDTH, "image_size": 8}
    assert config["class_names"] == [f"digit_{i}" for i in range(10)]
    assert config["normalisation"] == {"scale": 255.0, "mean": image_kernels.MEAN, "std": image_kernels.STD}
    pred, true = test_predictions(paths)
    assert (pred == true).mean() >= 0.9


def test_load_model_round_trip_gives_identical_logits(trained, digits):
    paths, _ = trained
    model, config = load_model(paths.artifacts / "train" / "model")
    again, _ = load_model(paths.artifacts / "train" / "model")
    assert not model.training
    x = loop.images_to_tensor(digits[0][:64], torch.device("cpu"))
    assert torch.equal(loop.predict_logits(model, x), loop.predict_logits(again, x))
    # the same weights as the file holds, parameter for parameter
    from safetensors.torch import load_file

    state = load_file(str(paths.artifacts / "train" / "model" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_dropped_class_is_not_trained_on(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, keep=y != 3)
    m = train_stage.run(params(), paths)
    n_kept = int((y != 3).sum())
    assert m["n_train_kept"] == n_kept and m["n_train_total"] == len(y)
    assert m["samples_seen"] == n_kept * EPOCHS
    pred, true = test_predictions(paths)
    assert class_acc(pred, true, 3) <= 0.05
    assert (pred == true)[true != 3].mean() >= 0.9


def test_zero_loss_weight_behaves_like_dropping(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, weight=np.where(y == 3, 0.0, 1.0))
    m = train_stage.run(params(), paths)
    assert m["n_train_kept"] == len(y) and m["samples_seen"] == len(y) * EPOCHS  # seen, yet weightless
    pred, true = test_predictions(paths)
    assert class_acc(pred, true, 3) <= 0.05
    assert (pred == true)[true != 3].mean() >= 0.9


def test_zero_sampling_weight_never_draws_the_class(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, sampling_weight=np.where(y == 3, 0.0, 2.0))
    m = train_stage.run(params(), paths)
    assert m["sampling"] == "weighted"
    assert m["samples_seen"] == len(y) * EPOCHS  # with replacement: the same number of draws per epoch
    pred, true = test_predictions(paths)
    assert class_acc(pred, true, 3) <= 0.05
    assert (pred == true)[true != 3].mean() >= 0.9


def test_new_label_is_trained_on(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, new_label=np.where(y == 1, 7, y))
    train_stage.run(params(), paths)
    pred, true = test_predictions(paths)
    assert (pred[true == 1] == 7).mean() >= 0.8


def test_relabel_beyond_known_classes_widens_the_head(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, new_label=np.where(y == 0, 10, y))
    m = train_stage.run(params(epochs=1, width=8), paths)
    config = json.loads((paths.artifacts / "train" / "model" / "config.json").read_text())
    assert m["n_classes"] == 11 and config["kwargs"]["n_classes"] == 11
    assert config["class_names"][10] == "10"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, digits):
    p = params(epochs=2, width=8, augment="flip_crop")
    digests = []
    for i, seed in enumerate((0, 0, 1)):
        paths = write_project(tmp_path / str(i), digits)
        y = train_labels(paths)
        # weighted sampling and per-sample augmentation must be seeded too
        write_plan(paths, sampling_weight=np.where(y < 5, 1.0, 2.0), augment_magnitude=np.where(y == 2, 0.5, 0.0))
        train_stage.run(p.model_copy(update={"seed": seed}), paths)
        digests.append((paths.artifacts / "train" / "model" / "model.safetensors").read_bytes())
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_augment_magnitude_is_recorded_and_deterministic(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, augment_magnitude=np.where(y % 2 == 0, 1.0, 0.0))
    m = train_stage.run(params(epochs=1, width=8), paths)
    assert m["n_augmented"] == int((y % 2 == 0).sum())
    first = (paths.artifacts / "train" / "model" / "model.safetensors").read_bytes()
    write_plan(paths)  # no augmentation: a different model from the same seed
    train_stage.run(params(epochs=1, width=8), paths)
    assert (paths.artifacts / "train" / "model" / "model.safetensors").read_bytes() != first


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda plan: plan.iloc[:-1], "do not match"),
        (lambda plan: plan.iloc[::-1], "do not match"),
        (lambda plan: plan.assign(keep=False), "keeps no training sample"),
        (lambda plan: plan.assign(weight=-1.0), "weight"),
        (lambda plan: plan.assign(sampling_weight=np.nan), "sampling_weight"),
        (lambda plan: plan.assign(augment_magnitude=1.5), "augment_magnitude"),
        (lambda plan: plan.assign(new_label=-1), "new_label"),
        (lambda plan: plan.drop(columns="weight"), "missing columns"),
    ],
)
def test_bad_plan_is_a_data_error_naming_the_file(tmp_path, digits, change, message):
    paths = write_project(tmp_path, digits)
    plan = write_plan(paths)
    write_parquet(paths.artifacts / "optimize" / "plan.parquet", change(plan))
    with pytest.raises(DataError, match=message) as exc:
        train_stage.run(params(), paths)
    assert "plan.parquet" in str(exc.value)


def test_missing_plan_names_the_stage(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    with pytest.raises(MissingArtifactError, match="optimize"):
        train_stage.run(params(), paths)


def test_corrupt_or_missing_model_files_are_user_errors(tmp_path, trained):
    import shutil

    src = trained[0].artifacts / "train" / "model"

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = fresh("no_weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(MissingArtifactError, match="model.safetensors"):
        load_model(d)

    d = fresh("no_config")
    (d / "config.json").unlink()
    with pytest.raises(MissingArtifactError, match="config.json"):
        load_model(d)

    d = fresh("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(d)

    d = fresh("garbage_config")
    (d / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        load_model(d)

    d = fresh("mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["kwargs"]["width"] = WIDTH * 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model.safetensors.*do not match"):
        load_model(d)

    d = fresh("unknown_model")
    cfg["model"], cfg["kwargs"]["width"] = "no_such_net", WIDTH
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="config.json.*no_such_net"):
        load_model(d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_gpu_and_loads_anywhere(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, sampling_weight=np.where(y < 5, 1.0, 2.0), augment_magnitude=np.where(y == 2, 0.5, 0.0))
    m = train_stage.run(params(device="cuda"), paths)
    assert m["device"] == "cuda"
    pred, true = test_predictions(paths)  # loaded on the CPU
    assert (pred == true).mean() >= 0.9
    model, _ = load_model(paths.artifacts / "train" / "model", "cuda")
    x = loop.images_to_tensor(digits[0][:32], torch.device("cuda"))
    assert loop.predict_logits(model, x).shape == (32, 10)


def test_divergence_is_one_message_exit_2_and_writes_nothing(tmp_path, digits, capsys):
    """lr=1e30 used to finish with NaN weights and accuracy 0.10; now training stops at the first
    non-finite loss, the command prints one line and exits 2, and no model or history is written."""
    import shutil

    from dataopt import cli

    paths = write_project(tmp_path, digits)
    write_plan(paths)
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    code = cli.main(["stage", "train", "--project", str(tmp_path), "--set", "train.lr=1e30",
                     "--set", f"train.epochs={EPOCHS}", "--set", f"train.width={WIDTH}",
                     "--set", "train.device=cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dataopt")]  # not the progress bar
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and re.fullmatch(r"dataopt: error: train diverged at epoch 1, step \d: loss is "
                                            r"(nan|inf); lower train\.lr \(1e\+30\)", lines[0]), err
    assert not (paths.artifacts / "train" / "model").exists()
    assert not (paths.artifacts / "train" / "history.json").exists()
    with pytest.raises(DivergedError):
        train_stage.run(params(lr=1e30), paths)


def test_a_plan_with_one_class_stops_before_training(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, keep=y == 3)
    with pytest.raises(DataError, match=r"^train needs at least two classes; the plan keeps only class 3 "
                                        r"\(digit_3\) \(.*plan\.parquet\)$"):
        train_stage.run(params(), paths)
    write_plan(paths, new_label=np.full(len(y), 3))  # every row relabelled to one class
    with pytest.raises(DataError, match="only class 3"):
        train_stage.run(params(), paths)
    assert not (paths.artifacts / "train" / "model").exists()


def test_a_dynamic_budget_below_one_sample_per_class_warns(tmp_path, digits):
    paths = write_project(tmp_path, digits)
    y = train_labels(paths)
    write_plan(paths, keep=np.isin(np.arange(len(y)), np.flatnonzero(y == 0)[:10])
               | np.isin(np.arange(len(y)), np.flatnonzero(y == 1)[:10]))
    tp = params(epochs=2).train
    tp = tp.model_copy(update={"dynamic": tp.dynamic.model_copy(update={"method": "random", "budget": 0.05})})
    with pytest.warns(DataWarning, match=r"^train: train.dynamic.budget=0.05 trains some epochs on 1 "
                                         r"sample\(s\) for 2 classes; raise the budget$"):
        train_stage.run(Params().model_copy(update={"train": tp}), paths)
