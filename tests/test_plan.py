"""optimize.steps: validation, composition of the five families into one plan, and the train stage
honouring plan.json (training directives, augmentation policy, MixUp soft targets)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dataopt.config import Params, TrainParams, load_params, validate
from dataopt import image_kernels
from dataopt.errors import ConfigError, DataWarning
from dataopt.io import read_json, write_json, write_parquet
from dataopt.plugins import check_methods
from dataopt.registry import AUGMENTERS, PERTURBERS, RESAMPLERS
from dataopt.schema import PLAN_COLUMNS
from dataopt.stages import run_stage
from dataopt.stages.optimize import _inputs
from dataopt.train import loop
from dataopt.train.trainer import plan_training, train_model, train_set_from_plan

from conftest import write_digits_ingested, write_signals_project

ROOT = Path(__file__).resolve().parents[1]
CHAIN = [
    {"family": "prune", "method": "noise_filter", "kwargs": {"threshold": 0.5}},
    {"family": "prune", "method": "moderate", "ratio": 0.5},
    {"family": "weight", "method": "p_clean"},
    {"family": "augment", "method": "randaugment", "kwargs": {"magnitude": 9}},
]


def steps_params(steps, seed=0) -> Params:
    return Params().model_copy(update={"seed": seed,
                                       "optimize": validate({"optimize": {"steps": steps}}).optimize})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    paths = write_signals_project(tmp_path_factory.mktemp("plan"), n_train=240, n_test=40, interleave=True)
    run_stage("analyze", Params(), paths)
    return paths


def read_plan(paths):
    return (pd.read_parquet(paths.artifacts / "optimize" / "plan.parquet"),
            read_json(paths.artifacts / "optimize" / "plan.json"))


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("step,match", [
    ({"family": "filter", "method": "x"}, "unknown family 'filter'; valid: resample, weight, perturb, augment, prune"),
    ({"family": "prune", "method": "nope"}, r"unknown selector method 'nope'; valid: .*moderate.*random"),
    ({"family": "augment", "method": "randaugment", "kwargs": {"strength": 3}},
     r"unknown kwargs \['strength'\]; valid: num_ops, magnitude, num_magnitude_bins"),
    ({"family": "weight", "method": "p_clean", "ratio": 0.5}, "ratio is only valid for family 'prune'"),
    ({"family": "augment", "method": "mixup", "n_keep": 10}, "n_keep is only valid for family 'prune'"),
    ({"family": "prune", "method": "none", "ratio": 0.5}, "method 'none' takes no ratio"),
    ({"family": "prune", "method": "moderate", "kwargs": {"ratio": 0.5}}, "give it as the step's own key"),
    ({"family": "prune", "method": "moderate", "ratio": 0.5, "n_keep": 3}, "ratio or n_keep, not both"),
    ({"family": "prune", "method": "moderate", "size": 3},
     r"unknown step key\(s\) \['size'\]; valid: family, method, kwargs, ratio, n_keep"),
])
def test_step_errors_name_the_valid_values(step, match):
    with pytest.raises(ConfigError, match=match):
        check_methods(validate({"optimize": {"steps": [step]}}))


def test_simple_keys_still_select_with_method_and_ratio():
    """`dvc exp run -S optimize.ratio=0.5` edits params.yaml; the simple keys stay in charge."""
    params = check_methods(load_params(ROOT / "params.yaml", ["optimize.ratio=0.5"]))
    assert params.optimize.steps is None
    steps = params.optimize.plan_steps()
    assert [(s.family, s.method, s.ratio) for s in steps] == [("prune", "moderate", 0.5),
                                                              ("weight", "p_clean", None)]
    random = check_methods(load_params(ROOT / "params.yaml", ["optimize.method=random", "optimize.ratio=0.3",
                                                              "optimize.weighting=none"])).optimize.plan_steps()
    assert [(s.method, s.ratio) for s in random] == [("random", 0.3), ("none", None)]


# ---------------------------------------------------------------- composition

def test_the_example_chain_yields_one_coherent_plan(project):
    metrics = run_stage("optimize", steps_params(CHAIN), project)
    plan, summary = read_plan(project)
    analysis = pd.read_parquet(project.artifacts / "analyze" / "analysis.parquet")
    n = len(plan)
    p = analysis["p_clean"].to_numpy()
    keep = plan["keep"].to_numpy()
    survivors = p >= 0.5
    assert survivors.sum() > n // 2  # enough rows survive the filter for the ratio to bind
    assert not (keep & ~survivors).any()
    assert keep.sum() == round(0.5 * n) == metrics["n_kept"]
    np.testing.assert_allclose(plan.loc[keep, "weight"], p[keep])
    np.testing.assert_allclose(plan["augment_magnitude"], 9 / 30)
    assert (plan["sampling_weight"] == 1).all()
    np.testing.assert_array_equal(plan["new_label"], pd.read_parquet(
        project.artifacts / "perceive" / "signals.parquet")["label"])

    r = plan["reason"]
    assert r[keep].str.match(r"1 noise_filter: .*; 2 moderate: kept.*; 3 p_clean.*; "
                             r"4 randaugment: magnitude 0\.30").all()
    filtered = ~survivors
    assert r[filtered].str.match(r"1 noise_filter: ").all() and not r[filtered].str.contains("; 2 ").any()
    pruned = survivors & ~keep
    assert r[pruned].str.contains("; 2 moderate: dropped").all() and not r[pruned].str.contains("3 p_clean").any()

    steps = summary["steps"]
    assert [(s["step"], s["family"], s["method"]) for s in steps] == [
        (1, "prune", "noise_filter"), (2, "prune", "moderate"), (3, "weight", "p_clean"),
        (4, "augment", "randaugment")]
    assert steps[0]["counts"] == {"kept": int(survivors.sum()), "dropped": int(filtered.sum())}
    assert steps[1]["counts"] == {"kept": int(keep.sum()), "dropped": int(pruned.sum())}
    assert steps[2]["counts"]["changed"] == int((keep & (p != 1)).sum())
    assert steps[3]["counts"]["changed"] == int(keep.sum())
    assert steps[1]["params"]["ratio"] == 0.5
    assert summary["augment"] == {"image": {"policy": "randaugment", "num_ops": 2, "magnitude": 9,
                                            "num_magnitude_bins": 31}}
    assert summary["train"] == {}
    labels = analysis["label"] if "label" in analysis else plan["new_label"]
    share = plan.groupby(labels.to_numpy())["keep"].mean()
    assert summary["kept_share_per_class"] == {str(k): pytest.approx(v) for k, v in share.items()}
    assert summary["weight"]["mean"] == pytest.approx(p[keep].mean())
    assert "method" not in summary  # the simple keys' summary only for the simple form
    assert metrics["step1_noise_filter_kept"] == survivors.sum()
    assert metrics["step2_moderate_dropped"] == pruned.sum()
    assert metrics["step4_randaugment_changed"] == keep.sum()
    assert metrics["augment_policy"] == "randaugment"
    assert metrics["steps"] == "prune:noise_filter -> prune:moderate -> weight:p_clean -> augment:randaugment"
    again = run_stage("optimize", steps_params(CHAIN), project)
    again.pop("seconds", None), metrics.pop("seconds", None)
    assert again == metrics and read_plan(project)[0].equals(plan)


def test_each_family_applies_its_rule(project):
    steps = [
        {"family": "weight", "method": "p_clean"},
        {"family": "weight", "method": "p_clean"},
        {"family": "resample", "method": "class_balanced_over"},
        {"family": "perturb", "method": "relabel", "kwargs": {"threshold": 0.0}},
        {"family": "perturb", "method": "label_smoothing", "kwargs": {"epsilon": 0.1}},
        {"family": "augment", "method": "randaugment"},
        {"family": "augment", "method": "magnitude_from_plan", "kwargs": {"signal": "loss_last"}},
        {"family": "augment", "method": "mixup", "kwargs": {"alpha": 0.3}},
        {"family": "augment", "method": "smote"},
    ]
    metrics = run_stage("optimize", steps_params(steps), project)
    plan, summary = read_plan(project)
    lazy, _, labels = _inputs(project)
    p = lazy.get("p_clean")
    assert plan["keep"].all()
    np.testing.assert_allclose(plan["weight"], p * p)  # weights multiply
    fit = lambda reg, name, kw=None: reg.build(name, kw or {}, random_state=0).fit(  # noqa: E731
        **{r: lazy.get(r) for r in reg.get(name).requires}, keep=np.ones(len(p), bool))
    np.testing.assert_allclose(plan["sampling_weight"], fit(RESAMPLERS, "class_balanced_over").sampling_weight_)
    relabel = fit(PERTURBERS, "relabel", {"threshold": 0.0})
    np.testing.assert_array_equal(plan["new_label"], relabel.new_label_)
    assert metrics["n_relabelled"] == int((relabel.new_label_ != labels).sum()) > 0
    assert summary["train"] == {"label_smoothing": 0.1}  # merged directives
    mags = fit(AUGMENTERS, "magnitude_from_plan", {"signal": "loss_last"}).augment_magnitude_
    np.testing.assert_allclose(plan["augment_magnitude"], mags)  # the later step sets the magnitude ...
    assert summary["augment"]["image"]["policy"] == "randaugment"  # ... and the policy stays
    assert summary["augment"]["mix"] == {"policy": "mixup", "alpha": 0.3}
    assert summary["augment"]["features"]["policy"] == "smote"
    assert metrics["augment_policy"] == "randaugment+mixup+smote"
    assert metrics["train_directives"] == "label_smoothing"
    assert plan["reason"].str.match(r"1 p_clean weight .*; 2 p_clean weight .*; 3 ").all()
    assert set(summary["inputs"]) >= {"p_clean", "analysis", "probs", "signals", "labels"}


def test_a_prune_step_never_revives_rows_and_counts_the_original_set(project):
    steps = [{"family": "prune", "method": "random", "ratio": 0.8},
             {"family": "prune", "method": "moderate", "n_keep": 100},
             {"family": "prune", "method": "random", "ratio": 0.9}]
    run_stage("optimize", steps_params(steps), project)
    plan, summary = read_plan(project)
    assert plan["keep"].sum() == 100  # 0.9 of the original is more than remain: all 100 stay
    counts = [s["counts"] for s in summary["steps"]]
    assert counts[0]["kept"] == 192 and counts[1] == {"kept": 100, "dropped": 92}
    assert counts[2] == {"kept": 100, "dropped": 0}


# ---------------------------------------------------------------- the train stage honours plan.json

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    paths = write_digits_ingested(tmp_path_factory.mktemp("digits"), n=240)
    samples = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    images = np.load(paths.artifacts / "ingest" / "images.npy")
    return paths, samples, images


def train_set(samples, magnitude=0.0, plan_json=None):
    tr = samples[samples["split"] == "train"]
    n = len(tr)
    plan = pd.DataFrame({"sample_id": tr["sample_id"].to_numpy(), "keep": True, "weight": 1.0,
                         "sampling_weight": 1.0, "augment_magnitude": magnitude,
                         "new_label": tr["label"].to_numpy(), "reason": [""] * n})[list(PLAN_COLUMNS)]
    return train_set_from_plan(samples, plan, "plan.parquet", plan_json)


TP = TrainParams(width=4, epochs=2, batch_size=64, lr=0.05)
RANDAUG = {"image": {"policy": "randaugment", "num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31}}


def state(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_train_honours_the_augment_policy_deterministically(digits):
    _, samples, images = digits
    ts = train_set(samples, 0.3, {"augment": RANDAUG})
    loss_fn, augment_fn, owns = plan_training(ts, TP)
    assert loss_fn is None and owns and augment_fn is not None
    x = loop.images_to_tensor(images[ts.rows[:64]], torch.device("cpu"))
    out = augment_fn(x, torch.arange(64), 1, torch.Generator().manual_seed(0))
    assert (out != image_kernels.normalise(x)).flatten(1).any(1).float().mean() > 0.5  # batches differ
    cpu = torch.device("cpu")
    m1, h1, _ = train_model(images, ts, TP, 0, cpu, progress=False)
    m2, h2, _ = train_model(images, ts, TP, 0, cpu, progress=False)
    assert torch.equal(state(m1), state(m2)) and h1[-1]["loss"] == h2[-1]["loss"]
    plain, _, _ = train_model(images, train_set(samples, 0.3), TP, 0, cpu, progress=False)
    assert not torch.equal(state(m1), state(plain))  # the policy changed training
    assert augment_fn.translate is None  # train.translate unset: width // 8
    assert plan_training(ts, TP.model_copy(update={"translate": 1}))[1].translate == 1


def test_train_uses_soft_targets_with_mixup_and_plan_directives(digits):
    _, samples, images = digits
    ts = train_set(samples, 0.0, {"augment": {"mix": {"policy": "mixup", "alpha": 0.4}},
                                  "train": {"label_smoothing": 0.2}})
    loss_fn, augment_fn, _ = plan_training(ts, TP)
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    w = torch.ones(8)
    augment_fn.mix = None
    torch.testing.assert_close(loss_fn(logits, y, w, 1, torch.arange(8)),
                               F.cross_entropy(logits, y, label_smoothing=0.2))
    augment_fn.mix = 0.3  # a mixed batch: lam * L(y) + (1 - lam) * L(roll y) = CE on soft targets
    one = F.one_hot(y, 10).float()
    soft = 0.3 * one + 0.7 * one.roll(1, 0)
    soft = 0.8 * soft + 0.2 / 10
    torch.testing.assert_close(loss_fn(logits, y, w, 1, torch.arange(8)),
                               -(soft * F.log_softmax(logits, 1)).sum(1).mean())
    cpu = torch.device("cpu")
    m1, h1, _ = train_model(images, ts, TP, 0, cpu, progress=False)
    m2, _, _ = train_model(images, ts, TP, 0, cpu, progress=False)
    assert np.isfinite(h1[-1]["loss"]) and torch.equal(state(m1), state(m2))


def test_train_stage_reports_the_honoured_directives(digits):
    paths, samples, _ = digits
    tr = samples[samples["split"] == "train"]
    n = len(tr)
    plan = pd.DataFrame({"sample_id": tr["sample_id"].to_numpy(), "keep": True, "weight": 1.0,
                         "sampling_weight": 1.0, "augment_magnitude": 0.5,
                         "new_label": tr["label"].to_numpy(), "reason": [""] * n})[list(PLAN_COLUMNS)]
    write_parquet(paths.stage("optimize") / "plan.parquet", plan)
    write_json(paths.stage("optimize") / "plan.json",
               {"augment": {**RANDAUG, "features": {"policy": "smote", "k": 5}},
                "train": {"label_smoothing": 0.1}})
    params = Params().model_copy(update={"train": TP.model_copy(update={"epochs": 1, "device": "cpu"})})
    metrics = run_stage("train", params, paths)
    assert metrics["augment_policy"] == "randaugment"  # features-space SMOTE is for head-only training
    assert metrics["train_directives"] == "label_smoothing"
    write_json(paths.stage("optimize") / "plan.json", {"train": {"warp": 1}})
    with pytest.raises(ConfigError, match="unknown directives"):
        run_stage("train", params, paths)


def test_directives_of_weighters_reach_the_plan(project):
    # focal and self-paced are weighters whose effect lives in the loss: their train_ directives
    # must be merged into plan.json like a perturber's
    steps = [{"family": "weight", "method": "focal", "kwargs": {"gamma": 2.0}},
             {"family": "perturb", "method": "label_smoothing", "kwargs": {"epsilon": 0.05}}]
    run_stage("optimize", steps_params(steps), project)
    plan, summary = read_plan(project)
    assert summary["train"] == {"focal": {"gamma": 2.0}, "label_smoothing": 0.05}
    assert summary["steps"][0]["train"] == {"focal": {"gamma": 2.0}}
    assert (plan["weight"] == 1.0).all()


def test_simple_form_lets_a_threshold_selector_use_its_threshold(project):
    # optimize.method=noise_filter with the default ratio 1.0 filters by p_clean, not "keep all"
    params = Params().model_copy(update={"optimize": validate(
        {"optimize": {"method": "noise_filter", "kwargs": {"threshold": 0.5}}}).optimize})
    run_stage("optimize", params, project)
    plan, _ = read_plan(project)
    p_clean = pd.read_parquet(project.artifacts / "analyze" / "analysis.parquet")["p_clean"]
    np.testing.assert_array_equal(plan["keep"], p_clean >= 0.5)
    assert 0 < plan["keep"].sum() < len(plan)


# ---------------------------------------------------------------- warnings

def test_a_plan_keeping_fewer_samples_than_classes_warns_and_records_it(project):
    """4 classes, n_keep 1: the run goes on, but plan.json and the user are told."""
    steps = [{"family": "prune", "method": "random", "n_keep": 1}]
    with pytest.warns(DataWarning, match=r"^optimize: the plan keeps 1 sample\(s\) for 4 classes: 3 classes "
                                         r"get no training sample \(the train stage needs two classes\)"):
        metrics = run_stage("optimize", steps_params(steps), project)
    _, summary = read_plan(project)
    assert len(summary["warnings"]) == 1 and "keeps 1 sample(s) for 4 classes" in summary["warnings"][0]
    assert metrics["n_warnings"] == 1


def test_a_plan_dropping_a_whole_class_warns_and_a_full_plan_does_not(project):
    labels = _inputs(project)[2]
    import warnings

    from dataopt.optimize.plan import plan_warnings

    keep = labels != 2
    assert plan_warnings(keep, labels, labels) == [
        "the plan keeps no sample of 1 of 4 classes (label 2); the model cannot learn them"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        run_stage("optimize", steps_params(CHAIN[1:2]), project)  # ratio 0.5 keeps every class
    assert read_plan(project)[1]["warnings"] == []
