"""Defaults that fit the machine: `auto` keys take the profile chosen by the device and the train-split
size; written values are never touched; the choice is recorded and printed."""
from __future__ import annotations

import pytest

from dataopt import profiles
from dataopt.config import Params, read_yaml, validate
from dataopt.errors import ConfigError
from dataopt.io import read_json
from dataopt.plugins import check_methods
from dataopt.stages import STAGE_FILE, defaults_applied, machine_defaults, run_stage
from test_evaluate import digits_project

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
ALL_AUTO = {"embed": {"backend": "auto"}, "perceive": {"lr": "auto", "weight_decay": "auto"},
            "train": {"mode": "auto", "lr": "auto", "weight_decay": "auto"}}


def shipped() -> Params:
    """The project's params.yaml: every auto key written `auto`."""
    return validate(read_yaml(ROOT / "params.yaml"))


def test_profile_follows_device_and_train_size():
    big = profiles.LARGE_TRAIN + 1
    assert profiles.choose(big, cuda=False)[0] == "cpu_large"
    assert profiles.choose(profiles.LARGE_TRAIN, cuda=False)[0] == "standard"
    assert profiles.choose(big, cuda=True)[0] == "standard"
    assert "50,000 train images > 5,000" in profiles.choose(50_000, cuda=False)[1]


def test_only_auto_keys_are_filled_and_recorded():
    p = validate({**ALL_AUTO, "perceive": {"lr": 0.2, "weight_decay": "auto"},
                  "train": {"mode": "image", "lr": "auto", "weight_decay": "auto"}})
    resolved, record = profiles.resolve(p, 50_000, cuda=False)
    assert record["profile"] == "cpu_large"
    assert resolved.embed.backend == "whitened_patches" and resolved.perceive.weight_decay == 0.005
    assert resolved.perceive.lr == 0.2 and resolved.train.mode == "image"  # written: kept
    assert "perceive.lr" not in record["applied"] and record["applied"]["train.lr"] == 0.01
    assert "cpu_large (no GPU and 50,000 train images > 5,000): embed.backend=whitened_patches" in \
        profiles.describe(record)
    # nothing auto: nothing applied, nothing to say
    done, again = profiles.resolve(resolved, 50_000, cuda=False)
    assert done == resolved and again["applied"] == {} and profiles.describe(again) == ""


def test_standard_profile_is_the_former_defaults():
    assert {k: profiles.value_of(shipped(), k) for k in profiles.AUTO_KEYS} == dict.fromkeys(profiles.AUTO_KEYS, "auto")
    resolved, _ = profiles.resolve(shipped(), 1_437, cuda=False)
    assert (resolved.embed.backend, resolved.perceive.lr, resolved.perceive.weight_decay) == ("pixels", 0.05, 5e-4)
    assert (resolved.train.mode, resolved.train.lr, resolved.train.weight_decay) == ("image", 0.05, 5e-4)
    assert set(profiles.AUTO_KEYS) == set(profiles.PROFILES["cpu_large"])
    # a params file that leaves the keys out gets the standard values: nothing to fill
    assert profiles.resolve(Params(), 50_000, cuda=False)[1]["applied"] == {}


def test_auto_is_checked_like_any_value():
    with pytest.raises(ConfigError, match="perceive.lr"):
        validate({"perceive": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="train.mode"):
        validate({"train": {"mode": "quick"}})
    with pytest.raises(ConfigError, match="need a named embed.backend"):
        check_methods(validate({"embed": {"backend": "auto", "kwargs": {"dim": 16}}}))
    check_methods(validate({"embed": {"backend": "pixels", "kwargs": {"dim": 16}}}))


def test_run_stage_fills_auto_keys_and_records_why(tmp_path):
    paths = digits_project(tmp_path)
    resolved, record = machine_defaults(shipped(), paths)
    assert resolved.embed.backend == "pixels" and record["profile"] == "standard"
    run_stage("embed", shipped(), paths)
    rec = read_json(paths.artifacts / "embed" / STAGE_FILE)["defaults"]
    assert rec["applied"]["embed.backend"] == "pixels" and "train images <= 5,000" in rec["why"]
    assert read_json(paths.artifacts / "embed" / "meta.json")["backend"] == "pixels"
    assert defaults_applied(paths)["applied"]["embed.backend"] == "pixels"
    # written values: nothing to record
    run_stage("embed", validate({"embed": {"backend": "pixels"}, "perceive": {"lr": 0.05, "weight_decay": 0},
                                 "train": {"mode": "image", "lr": 0.05, "weight_decay": 0}}), paths)
    assert "defaults" not in read_json(paths.artifacts / "embed" / STAGE_FILE)
