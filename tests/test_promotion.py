"""The champion/challenger rule: paired bootstrap of the accuracy gain, per-class guard, the decision."""
from __future__ import annotations

import time

import numpy as np
import pytest

from dataopt.evaluate.compare import decide_promotion, paired_bootstrap, per_class_accuracy

RULE = dict(min_gain=0.0, max_class_drop=0.05, n_boot=2000, confidence=0.95, random_state=0)


def labels_and_pred(n: int, n_classes: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    wrong = rng.random(n) >= accuracy
    pred = y.copy()
    pred[wrong] = (y[wrong] + rng.integers(1, n_classes, wrong.sum())) % n_classes
    return y, pred


def test_paired_bootstrap_matches_index_resampling():
    """The multinomial draw is the same distribution as resampling row indices: the intervals agree."""
    rng = np.random.default_rng(1)
    a, b = rng.random(800) < 0.8, rng.random(800) < 0.85
    delta, low, high = paired_bootstrap(a, b, n_boot=20000, random_state=0)
    assert delta == pytest.approx(b.mean() - a.mean())
    idx = rng.integers(0, 800, (20000, 800))
    boot = (b[idx].astype(float) - a[idx]).mean(1)
    ref_low, ref_high = np.quantile(boot, [0.025, 0.975])
    assert low == pytest.approx(ref_low, abs=0.004) and high == pytest.approx(ref_high, abs=0.004)
    assert low < delta < high
    # pairing matters: the same outcomes shifted by one row share no pairs and give a wider interval
    _, ul, uh = paired_bootstrap(a, np.roll(a, 1), random_state=0)
    _, pl, ph = paired_bootstrap(a, a, random_state=0)
    assert (pl, ph) == (0.0, 0.0) and uh - ul > 0.03
    with pytest.raises(ValueError, match="paired rows"):
        paired_bootstrap(a, b[:-1])
    with pytest.raises(ValueError, match="no evaluation rows"):
        paired_bootstrap([], [])


def test_per_class_accuracy():
    acc = per_class_accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4)
    assert acc[:3].tolist() == [1.0, 1.0, 0.5] and np.isnan(acc[3])


def test_equal_models_are_not_promoted():
    y, pred = labels_and_pred(2000, 10, 0.9, seed=0)
    p = decide_promotion(pred, pred.copy(), y, 10, **RULE)
    assert not p.promote
    assert p.numbers["delta"] == 0.0 and p.numbers["delta_low"] == 0.0
    assert p.reason.startswith("rejected:") and "not above 0" in p.reason


def test_clearly_better_challenger_is_promoted():
    y, old = labels_and_pred(2000, 10, 0.80, seed=0)
    new = old.copy()
    fix = np.flatnonzero(old != y)[::2]  # half of the champion's errors fixed, nothing broken
    new[fix] = y[fix]
    p = decide_promotion(old, new, y, 10, **RULE)
    assert p.promote, p.reason
    n = p.numbers
    assert n["delta"] == pytest.approx(len(fix) / 2000) and 0 < n["delta_low"] < n["delta"] < n["delta_high"]
    assert n["accuracy"] == pytest.approx(n["champion_accuracy"] + n["delta"])
    assert p.reason.startswith("promoted:") and f"{n['accuracy']:.4f}" in p.reason
    # min_gain above the gain rejects it, with the numbers
    q = decide_promotion(old, new, y, 10, **{**RULE, "min_gain": 0.2})
    assert not q.promote and "< min_gain 0.2" in q.reason


def test_better_overall_but_one_class_collapses_is_rejected_naming_it():
    y, old = labels_and_pred(3000, 10, 0.80, seed=2)
    new = y.copy()  # perfect everywhere ...
    cls3 = np.flatnonzero(y == 3)
    new[cls3[: len(cls3) // 2]] = 4  # ... but class 3 loses half of its accuracy
    names = [f"d{i}" for i in range(10)]
    p = decide_promotion(old, new, y, 10, **RULE, class_names=names)
    assert p.numbers["delta"] > 0.1 and p.numbers["delta_low"] > 0
    assert not p.promote
    assert p.numbers["worst_class"] == "d3" and p.numbers["worst_class_drop"] > 0.2
    assert p.numbers["worst_class_rows"] == len(cls3)
    assert f"class 'd3' drops by {p.numbers['worst_class_drop']:.4f} ({len(cls3)} rows) > max_class_drop 0.05" in p.reason
    with pytest.raises(ValueError, match="champion_pred has 2999 rows"):
        decide_promotion(old[1:], new, y, 10, **RULE)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        decide_promotion(old, new, y, 5, **RULE)


def test_params_rule_is_the_default_rule():
    from dataopt.config import Params

    assert {**Params().promotion.rule(), "random_state": 0} == RULE
    y, old = labels_and_pred(500, 10, 0.8, seed=3)
    assert decide_promotion(old, y, y, 10, **Params().promotion.rule(), random_state=0).promote


def test_no_champion_yet_promotes():
    y, pred = labels_and_pred(100, 3, 0.5, seed=0)
    p = decide_promotion(None, pred, y, 3, **RULE)
    assert p.promote and "no champion yet" in p.reason and p.numbers["accuracy"] == pytest.approx((pred == y).mean())


def test_interval_covers_zero_for_equally_good_classifiers():
    """Two different classifiers, each right on a row with probability 0.8 independently: the true gain
    is 0, so the 95 % interval covers 0 in about 95 % of the seeds and the rule promotes rarely."""
    covered = promoted = 0
    seeds = 200
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 5, 1000)
        a, b = (y.copy() for _ in range(2))
        for pred in (a, b):
            wrong = rng.random(1000) >= 0.8
            pred[wrong] = (y[wrong] + rng.integers(1, 5, wrong.sum())) % 5
        _, low, high = paired_bootstrap(a == y, b == y, random_state=seed)
        covered += low <= 0 <= high
        promoted += decide_promotion(a, b, y, 5, **{**RULE, "max_class_drop": 1.0, "random_state": seed}).promote
    assert 0.90 * seeds <= covered <= 0.99 * seeds
    assert promoted <= 0.06 * seeds


def test_bootstrap_is_vectorised():
    rng = np.random.default_rng(0)
    a, b = rng.random(10_000) < 0.9, rng.random(10_000) < 0.9
    t0 = time.perf_counter()
    paired_bootstrap(a, b, n_boot=2000, random_state=0)
    seconds = time.perf_counter() - t0
    assert seconds < 1.0
    y = rng.integers(0, 10, 10_000)
    t0 = time.perf_counter()
    decide_promotion(y, np.where(a, y, (y + 1) % 10), y, 10, **RULE)
    assert time.perf_counter() - t0 < 1.0
    print(f"paired_bootstrap 10k rows x 2000 draws: {seconds * 1000:.2f} ms")


def test_class_drop_at_the_limit_is_allowed():
    """One error more in a class of 20 rows is a drop of exactly 0.05: allowed at max_class_drop 0.05,
    rejected just below it."""
    y = np.repeat(np.arange(2), 20)
    old = y.copy()
    new = y.copy()
    new[0] = 1  # class 0: 20/20 -> 19/20
    p = decide_promotion(old, new, y, 2, **{**RULE, "min_gain": -1.0})
    assert p.numbers["worst_class_drop"] == 0.05 and p.numbers["worst_class"] == "0"
    assert "drops by" not in p.reason
    q = decide_promotion(old, new, y, 2, **{**RULE, "min_gain": -1.0, "max_class_drop": 0.049})
    assert "class '0' drops by 0.0500 (20 rows) > max_class_drop 0.049" in q.reason


def test_harm_tells_a_worse_challenger_from_one_not_proven_better():
    from dataopt.evaluate.compare import decide_promotion, harm

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    champ = np.where(rng.random(2000) < 0.9, y, (y + 1) % 5)
    same = champ.copy()
    same[:10] = y[:10]  # a few more right: not significant
    assert harm(decide_promotion(champ, same, y, 5)) is None
    worse = np.where(rng.random(2000) < 0.7, y, (y + 1) % 5)
    assert "significantly lower" in harm(decide_promotion(champ, worse, y, 5))
    one_class = champ.copy()
    one_class[y == 3] = 4  # class 3 collapses
    assert "class" in harm(decide_promotion(champ, one_class, y, 5))
    better = np.where(rng.random(2000) < 0.99, y, (y + 1) % 5)
    assert harm(decide_promotion(champ, better, y, 5)) is None


def test_a_class_drop_within_its_noise_blocks_promotion_but_is_no_harm():
    # 100 rows a class: 9 of class 0's right answers become wrong and 3 wrong ones right, -6 points:
    # over max_class_drop, but 9 against 3 discordant rows is within the class's noise
    from dataopt.evaluate.compare import decide_promotion, harm

    y = np.repeat(np.arange(10), 100)
    champ = y.copy()
    champ[::5] = (y[::5] + 1) % 10  # 80 % right in every class
    noisy = champ.copy()
    c0 = np.flatnonzero(y == 0)
    right, wrong = c0[champ[c0] == 0], c0[champ[c0] != 0]
    noisy[right[:9]] = 1
    noisy[wrong[:3]] = 0
    p = decide_promotion(champ, noisy, y, 10)
    assert not p.promote and "class '0' drops by 0.0600" in p.reason
    assert p.numbers["worst_class_delta_high"] >= 0 and harm(p) is None
    collapsed = champ.copy()
    collapsed[c0] = 1  # class 0 lost: significant
    p = decide_promotion(champ, collapsed, y, 10)
    assert p.numbers["worst_class_delta_high"] < 0 and "class '0' drops by 0.8000" in harm(p)
