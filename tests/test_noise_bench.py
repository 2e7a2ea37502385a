"""bench/noise.py: saved dynamics (--save-dynamics) re-analysed (--from-dynamics) give the same results,
on a tiny synthetic parquet shaped like CIFAR-10N; the file's size at n = 50,000."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataopt.io import save_npy, save_npz, write_parquet
from dataopt.paths import Paths
from dataopt.perceive.dynamics import Dynamics

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
noise = pytest.importorskip("noise")
common = pytest.importorskip("common")
pytest.importorskip("cleanlab")

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
    """A random 32x32 JPEG tinted by its class (so the proxy learns something)."""
    px = rng.integers(0, 120, size=(32, 32, 3))
    px[:, :, label % 3] += 60 + 12 * label
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _cifar10n_like(folder: Path, n_train: int = 300, n_test: int = 40, seed: int = 0) -> Path:
    """train.parquet / test.parquet with CIFAR-10N's columns (id, image, label, label_name,
    aggre_label, random_label1, source_path); ~10% / ~20% of the noisy labels differ from ``label``."""
    rng = np.random.default_rng(seed)

    def table(n: int, noisy: bool) -> pa.Table:
        label = np.arange(n) % 10
        cols = {"id": pa.array(np.arange(n), pa.int32()),
                "image": pa.array([_jpeg(rng, int(c)) for c in label], pa.binary()),
                "label": pa.array(label, pa.int16()),
                "label_name": pa.array([CLASSES[c] for c in label]).dictionary_encode()}
        if noisy:
            for col, rate in (("aggre_label", 0.1), ("random_label1", 0.2)):
                flip = rng.random(n) < rate
                noisy_label = np.where(flip, (label + rng.integers(1, 10, n)) % 10, label)
                cols[col] = pa.array(noisy_label, pa.int16())
        cols["source_path"] = pa.array([f"{'train' if noisy else 'test'}/{CLASSES[c]}/{i:04d}.jpg"
                                        for i, c in enumerate(label)])
        return pa.table(cols)

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(n_train, True), folder / "train.parquet")
    pq.write_table(table(n_test, False), folder / "test.parquet")
    return folder


def _strip_seconds(run: dict) -> dict:
    return {name: {k: v for k, v in m.items() if k != "seconds"} for name, m in run["methods"].items()}


def test_save_then_from_dynamics_reproduces_the_direct_run(tmp_path: Path, capsys):
    data = _cifar10n_like(tmp_path / "cifar10n")
    dyn_dir, direct_out, again_out = tmp_path / "dyn", tmp_path / "direct", tmp_path / "again"
    common = ["--label-columns", "random_label1", "aggre_label"]
    assert noise.main(["--data", str(data), "--n", "0", "--seeds", "1", *common,
                       "--embed-kwargs", '{"dim": 16}', "--perceive-model", "small_cnn", "--width", "4",
                       "--epochs", "2", "--folds", "2", "--batch-size", "64", "--lr", "0.1",
                       "--weight-decay", "0.001",
                       "--augment", "crop", "--label-smoothing", "0.1",
                       "--out", str(direct_out), "--save-dynamics", str(dyn_dir)]) == 0
    assert sorted(p.name for p in dyn_dir.iterdir()) == ["aggre_label_s0.npz", "random_label1_s0.npz"]
    assert noise.main(["--from-dynamics", str(dyn_dir), *common, "--out", str(again_out)]) == 0
    printed = capsys.readouterr().out
    assert "proxy small_cnn (2 epochs on cpu)" in printed

    for col in ("random_label1", "aggre_label"):
        direct = json.loads((direct_out / f"noise_{col}.json").read_text())
        again = json.loads((again_out / f"noise_{col}.json").read_text())
        (d_run,), (a_run,) = direct["runs"], again["runs"]
        assert d_run["n"] == a_run["n"] == 300
        assert 0.05 < d_run["true_noise_rate"] < 0.35
        assert _strip_seconds(d_run) == _strip_seconds(a_run)  # every detector and cleanlab, exactly
        assert set(d_run["methods"]) >= {"gmm", "bmm", "confident_learning", "cl_mixture", "cleanlab"}
        for key in ("true_noise_rate", "oof_accuracy", "oof_accuracy_vs_clean"):
            assert d_run[key] == a_run[key]
        assert direct["summary"] == again["summary"]
        # where the probabilities came from: the proxy run's meta, kept by the saved file
        src = a_run["dynamics"]
        assert src["source"].startswith("saved dynamics (perceive on ")
        assert src["file"].endswith(f"{col}_s0.npz")
        assert src["network"] == "small_cnn" and src["device"] == "cpu" and src["epochs_completed"] == 2
        assert src["perceive"]["augment"] == "crop" and src["perceive"]["label_smoothing"] == 0.1
        assert src["perceive"]["batch_size"] == 64 and src["perceive"]["lr"] == 0.1
        assert src["perceive"]["weight_decay"] == 0.001
        assert src["oof_accuracy"] == d_run["dynamics"]["oof_accuracy"] == d_run["oof_accuracy"]
        assert again["dynamics_from"] == str(dyn_dir) and direct["dynamics_from"] == "perceive (this run)"


def _perceived_project(root: Path, n: int, epochs: int, k: int = 10, C: int = 10, dim: int = 32,
                       seed: int = 0) -> Paths:
    """The artifacts analyze reads, with realistic value types: a noisy proxy's dynamics, the signal
    catalogue's column types (float64 means, float32-exact last-epoch values, integers, a bool),
    hash-like sample ids, a random kNN graph."""
    rng = np.random.default_rng(seed)
    paths = Paths.at(root)
    sid = rng.integers(0, 2**62, n)
    clean = rng.integers(0, C, n)
    label = np.where(rng.random(n) < 0.17, rng.integers(0, C, n), clean)
    write_parquet(paths.stage("ingest") / "samples.parquet", pa.table({
        "sample_id": pa.array(sid, pa.int64()), "split": pa.array(["train"] * n),
        "label": pa.array(label, pa.int64()), "label_name": pa.array([CLASSES[c] for c in label]),
        "label_clean": pa.array(clean, pa.int64())}))
    save_npy(paths.stage("embed") / "embeddings.npy", rng.normal(size=(n, dim)).astype(np.float32))
    save_npz(paths.stage("embed") / "knn.npz", sample_id=sid, indices=rng.integers(0, n, (n, k)),
             distances=np.sort(rng.uniform(0.2, 1.0, (n, k)), axis=1).astype(np.float32))
    logits = (rng.normal(size=(epochs, n, C)) * np.linspace(1, 4, epochs)[:, None, None]).astype(np.float32)
    logits[:, np.arange(n), clean] += 2.0
    p = np.exp(logits - logits.max(2, keepdims=True))
    p /= p.sum(2, keepdims=True)
    rows = np.arange(n)
    p_y = p[:, rows, label]
    other = p.copy()
    other[:, rows, label] = -1
    z_other = logits.copy()
    z_other[:, rows, label] = -np.inf
    Dynamics(sample_id=sid, fold=rng.integers(0, 4, n), loss=-np.log(p_y), p_label=p_y,
             margin=p_y - other.max(2), correct=p.argmax(2) == label,
             logit_margin=logits[:, rows, label] - z_other.max(2),
             error_norm=np.linalg.norm(p - np.eye(C, dtype=np.float32)[label], axis=2),
             feature_norm=rng.uniform(5, 15, (epochs, n)).astype(np.float32),
             center_distance=rng.uniform(0, 20, (epochs, n)).astype(np.float32), probs=p[-1],
             epochs_completed=epochs, epochs_per_fold=np.full(4, epochs)).save(
        paths.stage("perceive") / "dynamics.npz")
    cols = {"sample_id": pa.array(sid, pa.int64()), "label": pa.array(label, pa.int64())}
    for i in range(14):  # means / variances / kNN statistics: full float64 mantissas
        cols[f"f64_{i}"] = pa.array(rng.normal(size=n), pa.float64())
    for i in range(4):  # last-epoch values stored from float32
        cols[f"f32_{i}"] = pa.array(rng.normal(size=n).astype(np.float32).astype(np.float64), pa.float64())
    cols["forgetting"] = pa.array(rng.integers(0, 4, n), pa.int64())
    cols["pred_label"] = pa.array(p[-1].argmax(1), pa.int64())
    cols["correct_last"] = pa.array(p[-1].argmax(1) == label, pa.bool_())
    table = pa.table(cols).replace_schema_metadata({b"dataopt.signals": b'{"f64_0": {}}'})
    write_parquet(paths.stage("perceive") / "signals.parquet", table)
    return paths


def test_saved_inputs_are_lossless_for_what_the_detectors_read(tmp_path: Path):
    src = _perceived_project(tmp_path / "src", n=500, epochs=5)
    size = noise.save_dynamics(src.root, tmp_path / "x_s0.npz", {"label_column": "x", "seed": 0,
                                                                  "oof_accuracy": 0.5})
    inputs, meta = noise.saved_inputs(tmp_path / "x_s0.npz")
    assert size == (tmp_path / "x_s0.npz").stat().st_size and meta["oof_accuracy"] == 0.5
    a = src.artifacts
    sig_a = pq.read_table(a / "perceive" / "signals.parquet").to_pandas()
    pd.testing.assert_frame_equal(sig_a, inputs["signals"], check_exact=True)
    da = Dynamics.load(a / "perceive" / "dynamics.npz")
    np.testing.assert_array_equal(inputs["probs"], da.probs)
    assert inputs["probs"].dtype == np.float32
    db = common.saved_dynamics(*common.read_dynamics(tmp_path / "x_s0.npz"))
    for name in ("sample_id", "fold", "correct", "probs", "epochs_per_fold"):
        np.testing.assert_array_equal(getattr(da, name), getattr(db, name))
    assert db.probs.dtype == np.float32 and da.epochs_completed == db.epochs_completed == 5
    for name in ("loss", "p_label", "margin", "logit_margin", "error_norm", "feature_norm",
                 "center_distance"):
        x, y = getattr(da, name), getattr(db, name)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(y, x, rtol=2e-3, atol=1e-4)  # float16
    samples = pq.read_table(a / "ingest" / "samples.parquet")
    np.testing.assert_array_equal(inputs["label_clean"], samples.column("label_clean").to_numpy())
    with np.load(a / "embed" / "knn.npz") as ka:
        np.testing.assert_array_equal(ka["indices"], inputs["knn_indices"])
        np.testing.assert_allclose(ka["distances"], inputs["knn_distances"], rtol=1e-3)


def test_files_saved_before_center_distance_give_it_as_nan(tmp_path: Path):
    src = _perceived_project(tmp_path / "src", n=200, epochs=3)
    noise.save_dynamics(src.root, tmp_path / "x_s0.npz", {"label_column": "x", "seed": 0})
    with np.load(tmp_path / "x_s0.npz") as z:
        old = {k: z[k] for k in z.files if k != "center_distance"}
    np.savez_compressed(tmp_path / "old_s0.npz", **old)
    db = common.saved_dynamics(*common.read_dynamics(tmp_path / "old_s0.npz"))
    assert db.center_distance.shape == (3, 200) and np.isnan(db.center_distance).all()
    assert np.isfinite(db.loss).all()
    np.savez_compressed(tmp_path / "broken_s0.npz", **{k: v for k, v in old.items() if k != "loss"})
    with pytest.raises(KeyError, match="loss"):  # only center_distance may be missing
        common.saved_dynamics(*common.read_dynamics(tmp_path / "broken_s0.npz"))


def test_a_missing_dynamics_file_names_the_command_that_writes_it(tmp_path: Path):
    with pytest.raises(SystemExit) as err:
        common.read_dynamics(tmp_path / "random_label1_s0.npz")
    msg = str(err.value)
    assert "\n" not in msg and "random_label1_s0.npz not found" in msg
    assert common.REGENERATE_DYNAMICS in msg and "--save-dynamics bench/dynamics" in msg


def test_dynamic_bench_reads_a_saved_proxy_for_the_first_rows(tmp_path: Path, capsys):
    pytest.importorskip("torch")
    dynamic = pytest.importorskip("dynamic")
    src = _perceived_project(tmp_path / "src", n=300, epochs=4)
    noise.save_dynamics(src.root, tmp_path / "random_label1_s0.npz", {"label_column": "random_label1",
                                                                       "seed": 0, "network": "airbench"})
    labels = pq.read_table(src.artifacts / "ingest" / "samples.parquet").column("label").to_numpy()
    d = Dynamics.load(src.artifacts / "perceive" / "dynamics.npz")
    proxy, about = dynamic.saved_proxy(tmp_path, "random_label1", labels[:120])
    np.testing.assert_array_equal(proxy["probs"], d.probs[:120])
    np.testing.assert_array_equal(proxy["fold"], d.fold[:120])
    assert proxy["loss"].shape == (4, 120) and proxy["features"] is None
    np.testing.assert_allclose(proxy["loss"], d.loss[:, :120], rtol=2e-3, atol=1e-4)  # float16
    assert about["network"] == "airbench" and about["dynamics_epochs"] == [1, 2, 3, 4]
    other = labels[:120].copy()
    other[7] = (other[7] + 1) % 10
    with pytest.raises(SystemExit, match="does not hold these 120 rows' random_label1 labels"):
        dynamic.saved_proxy(tmp_path, "random_label1", other)
    with pytest.raises(SystemExit, match="aggre_label_s0.npz not found"):
        dynamic.saved_proxy(tmp_path, "aggre_label", labels[:120])
    dynamic.parse_args(["--parts", "curated", "--proxy-dynamics", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse's error: the option would be silently unused
        dynamic.parse_args(["--parts", "dynamic", "--proxy-dynamics", str(tmp_path)])
    assert "--proxy-dynamics feeds the curated part only" in capsys.readouterr().err


def test_file_stays_under_15_mb_at_50k_rows(tmp_path: Path):
    """n = 50,000, C = k = 10, 20 epochs of incompressible synthetic values (an upper bound for real
    runs): the per-epoch arrays are thinned to fit, keeping the early-loss window and the last epoch."""
    src = _perceived_project(tmp_path / "src", n=50_000, epochs=20)
    size = noise.save_dynamics(src.root, tmp_path / "big_s0.npz", {"label_column": "big", "seed": 0})
    meta, arrays = common.read_dynamics(tmp_path / "big_s0.npz")
    kept = meta["dynamics_epochs"]
    print(f"\n20 epochs, n = 50,000: {size / 1e6:.2f} MB, epochs kept {kept}")
    assert size < 15e6
    assert kept[:3] == [1, 2, 3] and kept[-1] == 20 and 4 <= len(kept) < 20 and kept == sorted(set(kept))
    da = Dynamics.load(src.artifacts / "perceive" / "dynamics.npz")
    db = common.saved_dynamics(meta, arrays)
    assert db.epochs_completed == len(kept) and db.loss.shape == (len(kept), 50_000)
    np.testing.assert_array_equal(db.correct, da.correct[np.array(kept) - 1])
    np.testing.assert_array_equal(db.probs, da.probs)


def test_unthinned_when_it_fits_and_an_error_when_nothing_fits(tmp_path: Path):
    src = _perceived_project(tmp_path / "src", n=400, epochs=6)
    noise.save_dynamics(src.root, tmp_path / "a_s0.npz", {"label_column": "a", "seed": 0})
    _, meta = noise.saved_inputs(tmp_path / "a_s0.npz")
    assert meta["dynamics_epochs"] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="over 0.0 MB even with the dynamics of"):
        noise.save_dynamics(src.root, tmp_path / "b_s0.npz", {"label_column": "b", "seed": 0}, max_bytes=1000)
    assert not (tmp_path / "b_s0.npz").exists()


def test_skip_analysis_only_saves(tmp_path: Path):
    data = _cifar10n_like(tmp_path / "cifar10n", n_train=120, n_test=20)
    args = ["--data", str(data), "--n", "0", "--seeds", "1", "--label-columns", "aggre_label",
            "--embed-kwargs", '{"dim": 8}', "--hidden", "0", "--epochs", "2", "--folds", "2",
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--skip-analysis needs --save-dynamics"):
        noise.main([*args, "--skip-analysis"])
    assert noise.main([*args, "--skip-analysis", "--save-dynamics", str(tmp_path / "dyn")]) == 0
    assert (tmp_path / "dyn" / "aggre_label_s0.npz").exists() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="no random_label1_s<seed>.npz in"):
        noise.main(["--from-dynamics", str(tmp_path / "dyn"), "--label-columns", "random_label1"])


def test_dynamic_bench_parses_density_consistency_variants(capsys):
    pytest.importorskip("torch")
    dynamic = pytest.importorskip("dynamic")
    args = dynamic.parse_args(["--dc-variants", "rank:1:0", "value:0.5:0.125"])
    assert args.dc_variants == [("rank", 1.0, 0.0), ("value", 0.5, 0.125)]
    assert dynamic.parse_args([]).dc_variants is None  # the product of the three lists then
    for bad in ("rank:1", "softmax:1:0", "value:x:0"):
        with pytest.raises(SystemExit):
            dynamic.parse_args(["--dc-variants", bad])
        assert "NORMALISE:SHARPNESS:DELTA" in capsys.readouterr().err


def test_dynamic_bench_chooses_the_variant_on_the_val_half_and_reports_the_heldout_half():
    pytest.importorskip("torch")
    dynamic = pytest.importorskip("dynamic")
    cell = lambda val, heldout: {"accuracy_val_mean": val, "accuracy_heldout_mean": heldout}
    entry = {"full": cell(60, 61), "infobatch@0.3": cell(50, 51), "infobatch@0.5": cell(55, 56),
             # a wins on val over both budgets, b only on heldout: the choice must not see heldout
             "density_consistency@0.3": cell(52, 40), "density_consistency@0.5": cell(56, 41),
             "density_consistency[delta=0.1]@0.3": cell(51, 90),
             "density_consistency[delta=0.1]@0.5": cell(54, 90),
             "density_consistency[sharpness=2]@0.3": cell(99, 99)}  # lacks a budget: no candidate
    choice = dynamic.chosen_on_val(entry, [0.3, 0.5])
    assert choice["variant"] == "density_consistency"
    assert choice["candidates"] == ["density_consistency", "density_consistency[delta=0.1]"]
    assert choice["0.3"] == {"density_consistency": 40, "infobatch": 51} and choice["full_heldout"] == 61
    del entry["density_consistency[delta=0.1]@0.5"]
    assert dynamic.chosen_on_val(entry, [0.3, 0.5]) is None  # one candidate: nothing was chosen


def test_saved_dynamics_reader_names_a_missing_file_and_a_foreign_format(tmp_path: Path):
    from common import read_dynamics

    with pytest.raises(SystemExit, match=r"nope_s0\.npz not found: .* regenerate it with python bench/noise\.py"):
        read_dynamics(tmp_path / "nope_s0.npz")
    np.savez(tmp_path / "old_s0.npz", meta=np.array(json.dumps({"format": 0})), label=np.zeros(3))
    with pytest.raises(SystemExit, match=r"old_s0\.npz: dynamics format 0 is not 1; regenerate it with python bench/noise\.py"):
        read_dynamics(tmp_path / "old_s0.npz")
    np.savez(tmp_path / "ok_s0.npz", meta=np.array(json.dumps({"format": 1, "n": 3})), label=np.arange(3))
    meta, arrays = read_dynamics(tmp_path / "ok_s0.npz")
    assert meta == {"format": 1, "n": 3} and list(arrays) == ["label"]


def test_bench_readme_documents_the_command_that_writes_bench_dynamics():
    readme = (BENCH / "README.md").read_text()
    flat = " ".join(readme.replace("\\\n", " ").split())
    assert " ".join(common.REGENERATE_DYNAMICS.split()) in flat


@pytest.mark.parametrize("model", ["head", "airbench"])
def test_dynamic_bench_proxy_is_the_perceive_oof_run_with_the_bench_recipe(tmp_path: Path, model: str, monkeypatch):
    """Bench.proxy trains OOFDynamics with the evaluated models' recipe, and its outputs feed the
    density_consistency signals and the curated part's analysis."""
    pytest.importorskip("faiss")
    dynamic = pytest.importorskip("dynamic")
    from dataopt.perceive import dynamics as dynamics_mod

    real_fit, cfgs = dynamics_mod.fit, []

    def spy(model, x, y, cfg, **kw):
        cfgs.append(cfg)
        return real_fit(model, x, y, cfg, **kw)

    monkeypatch.setattr(dynamics_mod, "fit", spy)
    data = _cifar10n_like(tmp_path / "cifar10n", n_train=120, n_test=20)
    args = dynamic.parse_args(["--data", str(data), "--device", "cpu", "--model", model, "--width", "4",
                               "--pca-dim", "16", "--proxy-epochs", "1", "--proxy-folds", "2", "--momentum", "0.7",
                               "--translate", "1"])
    bench = dynamic.Bench(args)
    y = bench.labels["random_label1"]
    proxy = bench.proxy(y, seed=1)
    recipe = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "augment",
              "translate", "lookahead")
    expected = {k: getattr(bench.cfg(0, 1), k) for k in recipe}
    assert [{k: getattr(c, k) for k in recipe} for c in cfgs] == [expected] * 2
    assert expected["momentum"] == 0.7 and expected["lookahead"] == (model == "airbench")
    assert proxy["loss"].shape == (1, 120) and sorted(set(proxy["fold"])) == [0, 1]
    np.testing.assert_allclose(proxy["probs"].sum(1), 1, atol=1e-5)
    assert proxy["features"].shape == (120, dynamic.HEAD_HIDDEN if model == "head" else 16)
    signals, _ = dynamic.density_consistency_signals(proxy, y)
    assert len(signals) == 120 and np.isfinite(signals.to_numpy()).all()
    p_clean, info = dynamic.p_clean_gated(proxy, y, 1, "gmm")
    assert p_clean.shape == (120,) and 0 <= info["flagged"] <= 120
