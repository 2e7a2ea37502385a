"""Dynamic selection: budgets, InfoBatch's pruning and rescaling, density_consistency's preference, the
loop training on what a selector picks, and the train stage with ``train.dynamic`` (image and head)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits

from conftest import identity_plan
from dataopt.config import Params, validate
from dataopt.errors import ConfigError, DataError, MissingArtifactError
from dataopt.io import read_json, save_npy, write_parquet
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.registry import DYNAMIC_SELECTORS
from dataopt.stages import run_stage
from dataopt.train import loop
from dataopt.train.trainer import build_selector, train_set_from_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, EPOCHS = 200, 8


def build(name, budget=0.5, **kwargs):
    return DYNAMIC_SELECTORS.build(name, kwargs, budget=budget, random_state=0)


def signals(n=N, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"knn_density": rng.random(n), "semantic_consistency": rng.random(n)})


@pytest.mark.parametrize("name", ["random", "infobatch", "density_consistency"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_every_method_spends_exactly_its_budget(name, budget):
    sel = build(name, budget).fit(N, EPOCHS, signals())
    assert sum(sel.epoch_sizes_) == round(budget * N * EPOCHS) and len(sel.epoch_sizes_) == EPOCHS
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(N)
    for e, k in enumerate(sel.epoch_sizes_, 1):
        chosen, _ = sel.select(e, loss, gen)
        assert len(chosen) == k and len(torch.unique(chosen)) == k  # no sample twice in an epoch
        assert int(chosen.min()) >= 0 and int(chosen.max()) < N


def test_infobatch_anneals_the_last_epochs_on_all_data():
    sizes = build("infobatch", 0.5, delta=0.25).fit(N, EPOCHS).epoch_sizes_
    assert sizes[-2:] == [N, N] and max(sizes[:-2]) < N
    # a budget too small for any full epoch gives up annealing rather than starving the others
    assert max(build("infobatch", 0.1, delta=0.25).fit(N, EPOCHS).epoch_sizes_) < N


def test_infobatch_prunes_well_learned_samples_and_rescales_the_kept_ones():
    sel = build("infobatch", 0.8, delta=0.0).fit(N, 4)  # 40 of 200 pruned per epoch
    loss = torch.ones(N)
    loss[:100] = 0.1  # the first half is well learned (below the mean)
    chosen, w = sel.select(1, loss, torch.Generator().manual_seed(0))
    assert set(range(100, N)) <= set(chosen.tolist())  # no high-loss sample is dropped
    r = 40 / 100
    low = chosen < 100
    assert int((~low).sum()) == 100 and int(low.sum()) == 60
    assert torch.allclose(w[low], torch.full((60,), 1 / (1 - r))) and bool((w[~low] == 1).all())
    assert sel.stats_ == {"selected": 160, "prune_rate": r, "overflow": 0}


def test_infobatch_caps_the_prune_rate_and_prunes_the_rest_uniformly():
    sel = build("infobatch", 0.3, delta=0.0, prune_ratio=0.5).fit(N, 4)  # 140 of 200 pruned
    loss = torch.ones(N)
    loss[:100] = 0.1
    chosen, w = sel.select(1, loss, torch.Generator().manual_seed(0))
    assert sel.stats_["prune_rate"] == 0.5 and sel.stats_["overflow"] == 140 - 50
    assert float(w.max()) == pytest.approx(2.0)  # never more than 1 / (1 - 0.5)
    assert int((chosen >= 100).sum()) < 100  # the overflow also removed high-loss samples


def test_infobatch_first_epoch_without_losses_prunes_uniformly_without_weights():
    sel = build("infobatch", 0.5, delta=0.0).fit(N, 4)
    chosen, w = sel.select(1, torch.full((N,), float("nan")), torch.Generator().manual_seed(0))
    assert len(chosen) == 100 and bool((w == 1).all())
    assert sel.stats_["prune_rate"] == 0.0 and sel.stats_["overflow"] == 100


def test_density_consistency_prefers_sparse_consistent_samples():
    s = signals()
    score = s["knn_density"].rank() * s["semantic_consistency"].rank()
    top, bottom = score.nlargest(40).index.to_numpy(), score.nsmallest(40).index.to_numpy()
    counts = {}
    for sharpness in (1.0, 3.0):
        sel = build("density_consistency", 0.3, sharpness=sharpness).fit(N, 50, s)
        gen = torch.Generator().manual_seed(0)
        c = np.zeros(N)
        for e in range(1, 51):
            np.add.at(c, sel.select(e, torch.zeros(N), gen)[0].numpy(), 1)
        assert c[top].mean() > 2 * c[bottom].mean()
        counts[sharpness] = c
    # a sharper draw concentrates on fewer samples
    assert (counts[3.0] == 0).sum() > (counts[1.0] == 0).sum()


def test_density_consistency_delta_anneals_on_all_data_at_the_same_budget():
    sel = build("density_consistency", 0.5, delta=0.25).fit(N, EPOCHS, signals())
    assert sel.epoch_sizes_[-2:] == [N, N] and max(sel.epoch_sizes_[:-2]) < N
    assert sum(sel.epoch_sizes_) == round(0.5 * N * EPOCHS)
    gen = torch.Generator().manual_seed(0)
    chosen, w = sel.select(EPOCHS, torch.zeros(N), gen)
    assert torch.equal(chosen, torch.arange(N)) and w is None
    early, _ = sel.select(1, torch.zeros(N), gen)
    assert len(early) == sel.epoch_sizes_[0]
    # the default keeps the paper's form: no epoch on all data
    assert max(build("density_consistency", 0.5).fit(N, EPOCHS, signals()).epoch_sizes_) < N


def test_density_consistency_value_normalisation_draws_proportionally_to_the_values():
    s = pd.DataFrame({"knn_density": np.full(N, 0.5), "semantic_consistency": np.full(N, 0.9)})
    s.loc[:9, "knn_density"] = 1.0      # twice as sparse: twice as likely
    s.loc[10:19, "semantic_consistency"] = -0.2  # a negative cosine: floored, never drawn in practice
    sel = build("density_consistency", 0.1, normalise="value").fit(N, 400, s)
    p = torch.softmax(sel.log_p_, 0).numpy()
    assert p[0] / p[100] == pytest.approx(2.0) and p[10] / p[100] == pytest.approx(1e-6)
    gen = torch.Generator().manual_seed(0)
    c = np.zeros(N)
    for e in range(1, 401):
        np.add.at(c, sel.select(e, torch.zeros(N), gen)[0].numpy(), 1)
    assert c[:10].mean() > 1.5 * c[20:].mean() and c[10:20].sum() == 0
    # flatter than the rank form on the same signals: almost every sample is drawn at some point
    rank = build("density_consistency", 0.1).fit(N, 400, signals())
    value = build("density_consistency", 0.1, normalise="value").fit(N, 400, signals())
    assert float(value.log_p_.max() - value.log_p_.median()) < float(rank.log_p_.max() - rank.log_p_.median())


def test_selectors_are_reproducible_for_a_generator_seed():
    s = signals()
    for name in ("random", "infobatch", "density_consistency"):
        runs = [build(name).fit(N, 4, s).select(1, torch.rand(N, generator=torch.Generator().manual_seed(1)),
                                                 torch.Generator().manual_seed(seed))[0] for seed in (0, 0, 1)]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2]), name


def test_bad_configurations_are_named():
    with pytest.raises(ConfigError, match="uniform_full.*1.0"):
        build("uniform_full", 0.5).fit(N, 4)
    with pytest.raises(ConfigError, match="delta"):
        build("infobatch", delta=1.0).fit(N, 4)
    with pytest.raises(ConfigError, match="sharpness"):
        build("density_consistency", sharpness=0).fit(N, 4, signals())
    with pytest.raises(ConfigError, match="normalise"):
        build("density_consistency", normalise="softmax").fit(N, 4, signals())
    with pytest.raises(DataError, match="positive knn_density"):
        build("density_consistency", normalise="value").fit(N, 4, signals() * 0)
    with pytest.raises(ConfigError, match="density_consistency: delta"):
        build("density_consistency", delta=-0.1).fit(N, 4, signals())
    with pytest.raises(DataError, match="perceive"):
        build("density_consistency").fit(N, 4, None)
    with pytest.raises(DataError, match="semantic_consistency"):
        build("density_consistency").fit(N, 4, signals().drop(columns="semantic_consistency"))
    with pytest.raises(DataError, match="199 rows"):
        build("density_consistency").fit(N, 4, signals(199))
    with pytest.raises(ConfigError, match="budget"):
        validate({"train": {"dynamic": {"method": "random", "budget": 1.5}}})
    with pytest.raises(ConfigError, match="nope"):
        check_methods(validate({"train": {"dynamic": {"method": "nope"}}}))


# --- the loop with a selector ----------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """A linear classifier that records which samples (column 0 = index) each training batch held."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x[:, 0].detach().long())
        return self.fc(x)


class Scripted:
    """A selector whose epochs are given: epoch e trains on ``picks[e - 1]`` with loss weights 3."""

    def __init__(self, picks):
        self.picks = [torch.tensor(p) for p in picks]
        self.epoch_sizes_ = [len(p) for p in picks]
        self.losses = []

    def select(self, epoch, last_loss, gen):
        self.losses.append(last_loss.clone())
        self.stats_ = {"selected": len(self.picks[epoch - 1])}
        return self.picks[epoch - 1], torch.full((len(self.picks[epoch - 1]),), 3.0)


def test_loop_trains_each_epoch_on_what_the_selector_picks():
    x = torch.zeros(40, 2)
    x[:, 0] = torch.arange(40.0)
    y = torch.arange(40) % 2
    sel = Scripted([list(range(10)), list(range(10, 40)), list(range(5))])
    m = Recorder()
    reported = []
    hist = loop.fit(m, x, y, loop.FitConfig(epochs=3, batch_size=8, progress=False), selector=sel,
                    on_epoch_loss=lambda epoch, loss: reported.append((epoch, loss.clone())))
    per_epoch = np.split(torch.cat(m.seen).numpy(), np.cumsum([10, 30]))
    assert [sorted(p.tolist()) for p in per_epoch] == [list(range(10)), list(range(10, 40)), list(range(5))]
    assert [h["samples_seen"] for h in hist] == [10, 40, 45] and [h["steps"] for h in hist] == [2, 6, 7]
    assert [h["dyn_selected"] for h in hist] == [10, 30, 5]
    # the selector saw NaN for never-trained samples and the last loss of the trained ones
    assert bool(torch.isnan(sel.losses[0]).all())
    assert bool(torch.isfinite(sel.losses[1][:10]).all()) and bool(torch.isnan(sel.losses[1][10:]).all())
    # on_epoch_loss hands out after each epoch the same per-sample losses the selector sees next
    assert [e for e, _ in reported] == [1, 2, 3]
    assert torch.allclose(reported[0][1], sel.losses[1], equal_nan=True)
    assert torch.allclose(reported[1][1], sel.losses[2], equal_nan=True)
    assert bool(torch.isfinite(reported[2][1][:5]).all()) and not torch.allclose(
        reported[2][1][:5], reported[1][1][:5])  # epoch 3 retrained samples 0-4: their losses moved
    with pytest.raises(ValueError, match="sampling_weights"):
        loop.fit(Recorder(), x, y, loop.FitConfig(epochs=3, progress=False), selector=sel,
                 sampling_weights=torch.ones(40))


def test_selector_weights_scale_the_loss():
    x, y = torch.randn(32, 2), torch.arange(32) % 2
    grads = []
    for weight in (1.0, 3.0):
        class Sel(Scripted):
            def select(self, epoch, last_loss, gen):
                return torch.arange(32), torch.full((32,), weight)
        torch.manual_seed(0)
        m = torch.nn.Linear(2, 2)
        start = m.weight.detach().clone()
        loop.fit(m, x, y, loop.FitConfig(epochs=1, batch_size=32, momentum=0.0, weight_decay=0.0,
                                          progress=False), selector=Sel([list(range(32))]))
        grads.append(m.weight.detach() - start)
    assert torch.allclose(grads[1], 3 * grads[0], atol=1e-6)


# --- the train stage -------------------------------------------------------------------------------------


def stage_params(**train) -> Params:
    return Params.model_validate({"train": {"epochs": 4, "width": 8, "device": "cpu", "batch_size": 64,
                                            **train}})


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_writer) -> Paths:
    paths = digits_writer(tmp_path_factory.mktemp("dyn"), n=500)
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    write_parquet(paths.stage("optimize") / "plan.parquet", identity_plan(s))
    x = load_digits().data[:500]
    save_npy(paths.stage("embed") / "embeddings.npy", ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float16))
    return paths


def write_signals(paths: Paths, **replace) -> None:
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    ids = s.loc[s["split"] == "train", "sample_id"].to_numpy()
    df = pd.concat([pd.DataFrame({"sample_id": ids}), signals(len(ids))], axis=1)
    for k, v in replace.items():
        df[k] = v
    write_parquet(paths.stage("perceive") / "signals.parquet", df)


@pytest.mark.parametrize("mode", ["image", "head"])
def test_stage_trains_at_the_budget_and_records_it(project, mode):
    metrics = run_stage("train", stage_params(mode=mode, dynamic={"method": "random", "budget": 0.5}), project)
    n = metrics["n_train_kept"]
    assert metrics["samples_seen"] == round(0.5 * n * 4)
    assert metrics["dynamic_method"] == "random" and metrics["dynamic_budget"] == 0.5
    history = read_json(project.artifacts / "train" / "history.json")
    assert sum(h["dyn_selected"] for h in history) == metrics["samples_seen"]
    config = read_json(project.artifacts / "train" / "model" / "config.json")
    assert config["train"]["dynamic"] == {"method": "random", "budget": 0.5}
    assert config["train"]["mode"] == mode


def test_stage_density_consistency_reads_the_signals(project):
    p = stage_params(mode="head", dynamic={"method": "density_consistency", "budget": 0.4})
    (project.artifacts / "perceive" / "signals.parquet").unlink(missing_ok=True)
    with pytest.raises(MissingArtifactError, match="perceive"):
        run_stage("train", p, project)
    write_signals(project, sample_id=np.arange(10_000, 10_400))
    with pytest.raises(DataError, match="rows do not match"):
        run_stage("train", p, project)
    write_signals(project)
    metrics = run_stage("train", p, project)
    assert metrics["samples_seen"] == round(0.4 * metrics["n_train_kept"] * 4)


def test_build_selector_refuses_a_plan_with_sampling_weights(project):
    s = pd.read_parquet(project.artifacts / "ingest" / "samples.parquet")
    plan = identity_plan(s)
    plan["sampling_weight"] = np.linspace(1, 2, len(plan))
    ts = train_set_from_plan(s, plan, "plan.parquet")
    tp = stage_params(dynamic={"method": "random", "budget": 0.5}).train
    with pytest.raises(ConfigError, match="sampling weights"):
        build_selector(ts, tp, 0)
    assert build_selector(ts, stage_params().train, 0) is None
