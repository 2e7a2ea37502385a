"""params.yaml validation and --set overrides (dataopt.config)."""
import time
from pathlib import Path

import pytest

from dataopt.config import (Params, apply_overrides, load_params, parse_override, read_yaml,
                            validate)
from dataopt.errors import ConfigError
from dataopt.plugins import check_methods

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_is_valid_and_complete():
    raw = read_yaml(ROOT / "params.yaml")
    params = validate(raw)
    # every key of the model is written in params.yaml (the file documents all of them)
    dumped = Params().model_dump(mode="json")
    for section, value in dumped.items():
        assert section in raw, f"params.yaml lacks section {section!r}"
        if isinstance(value, dict):
            missing = set(value) - set(raw[section] or {})
            assert not missing, f"params.yaml section {section!r} lacks keys {sorted(missing)}"
    assert params.orchestration.cache is True


def test_unknown_section_lists_valid_sections():
    with pytest.raises(ConfigError) as err:
        validate({"trian": {"epochs": 3}})
    msg = str(err.value)
    assert "trian: unknown section" in msg
    for name in ("ingest", "train", "tracking", "orchestration"):
        assert name in msg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        validate({"train": {"epoch": 3}})
    msg = str(err.value)
    assert "train.epoch: unknown key" in msg
    assert "epochs" in msg and "batch_size" in msg


def test_unknown_nested_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"ingest\.noise\.kinds: unknown key; valid: kind, rate"):
        validate({"ingest": {"noise": {"kinds": "pair"}}})


def test_unknown_method_lists_registered_names():
    with pytest.raises(ConfigError) as err:
        check_methods(validate({"optimize": {"method": "no_such_selector"}}))
    msg = str(err.value)
    assert "no_such_selector" in msg and "valid:" in msg
    assert "moderate" in msg and "random" in msg


def test_unknown_method_kwarg_is_rejected():
    with pytest.raises(ConfigError, match="unknown kwargs"):
        check_methods(validate({"optimize": {"method": "random", "kwargs": {"bogus_kw": 1}}}))


@pytest.mark.parametrize("raw, where", [
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"optimize": {"ratio": 1.5}}, "optimize.ratio"),
    ({"orchestration": {"task_runner": "ray"}}, "orchestration.task_runner"),
    ({"tracking": {"enabled": "maybe"}}, "tracking.enabled"),
])
def test_bad_type_or_range_names_the_key(raw, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        validate(raw)


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        validate(["not", "a", "mapping"])


def test_parse_override_values_are_yaml():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("optimize.ratio=0.5") == (["optimize", "ratio"], 0.5)
    assert parse_override("ingest.path=null") == (["ingest", "path"], None)
    assert parse_override("ingest.classes=[a, b]") == (["ingest", "classes"], ["a", "b"])
    assert parse_override("tracking.experiment=a=b") == (["tracking", "experiment"], "a=b")


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train.epochs=[unclosed"])
def test_parse_override_rejects_bad_syntax(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_overrides_apply_nested_and_validate():
    raw = read_yaml(ROOT / "params.yaml")
    out = apply_overrides(raw, ["ingest.noise.kind=symmetric", "ingest.noise.rate=0.2",
                                "train.epochs=2"])
    params = validate(out)
    assert params.ingest.noise.kind == "symmetric"
    assert params.ingest.noise.rate == 0.2
    assert params.train.epochs == 2
    assert read_yaml(ROOT / "params.yaml") == raw  # the input dict is not modified


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 0}, ["seed.x=1"])


def test_override_of_unknown_key_fails_validation(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="train.epoch: unknown key"):
        load_params(tmp_path / "params.yaml", ["train.epoch=3"])


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_flat_covers_every_leaf():
    flat = Params().flat()
    assert flat["train.epochs"] == Params().train.epochs
    assert flat["ingest.noise.kind"] == "none"
    assert "tracking.experiment" in flat and "orchestration.cache" in flat


BILLION_LAUGHS = ("[&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], "
                  "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], "
                  "&e [*d, *d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e, *e], "
                  "&g [*f, *f, *f, *f, *f, *f, *f, *f, *f], &h [*g, *g, *g, *g, *g, *g, *g, *g, *g], "
                  "&i [*h, *h, *h, *h, *h, *h, *h, *h, *h]]")


def test_override_refuses_yaml_aliases_at_once():
    """A billion-laughs --set value is one ConfigError naming the key, before anything expands."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        load_params(ROOT / "params.yaml", [f"optimize.kwargs.score={BILLION_LAUGHS}"])
    assert time.perf_counter() - t0 < 0.5
    msg = str(exc.value)
    assert "\n" not in msg and "optimize.kwargs.score" in msg and "aliases" in msg
    assert len(msg) < 200  # the value is not echoed
    with pytest.raises(ConfigError, match="anchors"):
        parse_override("train.epochs=&a 3")


def test_params_file_refuses_aliases_and_oversize(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"seed: 0\noptimize:\n  kwargs:\n    score: {BILLION_LAUGHS}\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        load_params(bomb)
    assert time.perf_counter() - t0 < 0.5
    assert "\n" not in str(exc.value) and str(bomb) in str(exc.value) and "line 4" in str(exc.value)
    big = tmp_path / "big.yaml"
    big.write_text("seed: 0\n" + "# padding\n" * 110_000)
    with pytest.raises(ConfigError, match="larger than 1000000 bytes"):
        read_yaml(big)


def test_override_value_size_and_depth_are_bounded():
    with pytest.raises(ConfigError, match="at most 10000") as exc:
        parse_override("optimize.kwargs.score=" + "x" * 10_001)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 200
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_override("optimize.kwargs.score=" + "[" * 5000 + "]" * 5000)
    assert parse_override("optimize.kwargs.score=" + "x" * 9_000)[1] == "x" * 9_000
