"""dataopt.plugins: the loaded families and the method-name check that follows the schema."""
from pathlib import Path

import pytest

from dataopt.config import load_params, validate
from dataopt.errors import ConfigError
from dataopt.plugins import check_methods

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_pass_and_come_back_unchanged():
    params = load_params(ROOT / "params.yaml")
    assert check_methods(params) is params


def test_the_schema_alone_does_not_know_method_names():
    params = validate({"optimize": {"method": "no_such_selector"}})  # shape is fine
    with pytest.raises(ConfigError, match=r"optimize\.method: unknown selector method 'no_such_selector'"):
        check_methods(params)


def test_every_problem_is_listed_once_with_where_it_is():
    params = validate({"ingest": {"source": "ftp"}, "train": {"model": "vgg", "dynamic": {"method": "nope"}},
                       "perceive": {"signals": ["aum", "grandd"]}})
    with pytest.raises(ConfigError) as err:
        check_methods(params)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid params:"
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == ["ingest.source", "perceive.signals", "train.model",
                                                               "train.dynamic"]
    assert all("valid: " in ln for ln in lines[1:])
    assert "sklearn_digits" in lines[1] and "small_cnn" in lines[3] and "infobatch" in lines[4]


def test_adaaugment_kwargs_are_checked_against_adaaugment():
    ok = validate({"train": {"adaaugment": {"enabled": True, "kwargs": {"sigma": 0.2}}}})
    assert check_methods(ok) is ok
    bad = validate({"train": {"adaaugment": {"enabled": True, "kwargs": {"sigma": 0.2, "epochs": 3}}}})
    with pytest.raises(ConfigError,
                       match=r"train\.adaaugment\.kwargs: unknown kwargs \['epochs'\]; valid: .*sigma"):
        check_methods(bad)


def test_an_optimize_step_names_its_family_and_index():
    params = validate({"optimize": {"steps": [{"family": "prune", "method": "moderate", "ratio": 0.5},
                                              {"family": "weight", "method": "nope"}]}})
    with pytest.raises(ConfigError,
                       match=r"optimize\.steps\.1 \(weight nope\): unknown weighter method 'nope'; valid: "):
        check_methods(params)
