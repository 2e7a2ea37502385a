"""dataopt.io: JSON files hold no NaN or Infinity."""
import json
import math

import numpy as np

from dataopt.io import read_json, write_json


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_turns_non_finite_floats_into_null(tmp_path):
    obj = {"nan": float("nan"), "inf": math.inf, "ninf": -np.inf, "np": np.float32("nan"),
           "ok": 0.5, "n": 3, "nested": [{"a": np.float64("inf")}, (1.0, float("nan"))],
           "array": np.array([1.0, np.nan, np.inf]), "text": "NaN"}
    path = tmp_path / "m.json"
    write_json(path, obj)
    back = _strict(path.read_text())  # valid JSON: no bare NaN / Infinity token
    assert back == {"nan": None, "inf": None, "ninf": None, "np": None, "ok": 0.5, "n": 3,
                    "nested": [{"a": None}, [1.0, None]], "array": [1.0, None, None], "text": "NaN"}
    assert read_json(path) == back
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left
