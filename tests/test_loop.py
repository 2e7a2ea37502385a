"""The continuous loop's pure parts: the landing rule (a marker file), the decision log, the triggers."""
from __future__ import annotations

import os
import threading

from dataopt import loop
from dataopt.paths import Paths


def test_only_batches_with_a_ready_marker_are_taken(tmp_path):
    inc = tmp_path / "incoming"
    (inc / "photos").mkdir(parents=True)
    (inc / "half.parquet").write_bytes(b"...")  # still being copied: no marker
    (inc / "round2.parquet").write_bytes(b"x")
    (inc / "round2.parquet.ready").touch()
    (inc / "photos.ready").touch()
    (inc / "ghost.ready").touch()  # a marker without data is ignored
    found = {name: item.name for name, item, _ in loop.complete_batches(inc)}
    assert found == {"photos": "photos", "round2": "round2.parquet"}
    assert loop.complete_batches(tmp_path / "missing") == []


def test_a_taken_batch_is_archived_not_deleted(tmp_path):
    inc = tmp_path / "incoming"
    inc.mkdir()
    (inc / "b.csv").write_text("path,label\n")
    (inc / "b.csv.ready").touch()
    (name, item, marker), = loop.complete_batches(inc)
    dest = loop.archive(inc, item, marker, "refused", "no valid row")
    assert dest.parent.name == ".refused" and dest.read_text() == "path,label\n"
    assert not marker.exists() and loop.complete_batches(inc) == []
    assert "no valid row" in next(dest.parent.glob("*.reason.txt")).read_text()


def test_the_decision_log_keeps_whole_lines_under_concurrent_writers(tmp_path):
    paths = Paths.at(tmp_path)
    big = "x" * 2000

    def write(k):
        for i in range(50):
            loop.record(paths, "drift_checked", batch=f"{k}-{i}", why=big)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = loop.decisions(paths)
    assert len(entries) == 200 and all(e["why"] == big for e in entries)
    with open(loop.log_path(paths), "a") as f:  # a writer killed mid-line
        f.write('{"event": "promo')
    assert len(loop.decisions(paths, ["drift_checked"])) == 200
    assert os.path.getsize(loop.log_path(paths)) > 0


def test_retrain_triggers():
    r = loop.retrain_reason
    assert r(["drift"], True, 0, 1.0, 1000, None) == "the drift check flagged the batch"
    assert r(["drift"], False, 5000, 1.0, 1000, None) is None  # new data is not a trigger unless asked
    assert "5000 new rows" in r(["new_data"], False, 5000, 1.0, 1000, None)
    assert r(["new_data"], False, 10, 1.0, 1000, None) is None
    assert "25.0 h since" in r(["age"], None, 0, 25.0, 1000, 24.0)
    assert r(["age"], None, 0, 2.0, 1000, 24.0) is None
    assert r(["age"], None, 0, None, 1000, 24.0) == "never trained"


def test_retrain_scores_both_models_on_each_new_batchs_held_out_rows(tmp_path):
    """The retrain flow's batch numbers (:func:`loop.holdout_scores`): each new batch's held-out rows
    only, against the batch's labels, for the challenger and the champion (None when there is none)."""
    import numpy as np
    import pandas as pd

    from dataopt.io import save_npy, write_parquet

    paths = Paths.at(tmp_path)
    split = ["test", "train", "holdout", "holdout", "train", "holdout", "holdout", "holdout"]
    batch = ["reference", "reference", "new", "new", "new", "old", "other", "other"]
    write_parquet(paths.stage("ingest") / "samples.parquet",
                  pd.DataFrame({"split": split, "label": [0, 1, 0, 1, 1, 0, 0, 1], "batch": batch}))
    save_npy(paths.stage("ingest") / "images.npy", np.arange(8, dtype=np.uint8).reshape(8, 1, 1, 1))

    class Guess:  # predicts class `pixel % k`
        def __init__(self, k):
            self.k = k

        def predict(self, images):
            return np.eye(3)[images.reshape(len(images)) % self.k]

    sets = loop.holdout_sets(paths, ["new", "other", "none"])
    assert list(sets) == ["new", "other"] and sets["new"][1].tolist() == [0, 1]
    scores = loop.holdout_scores({"champion": None, "challenger": Guess(2)}, sets)
    assert scores == {"new": {"n": 2, "champion_accuracy": None, "challenger_accuracy": 1.0},
                      "other": {"n": 2, "champion_accuracy": None, "challenger_accuracy": 1.0}}
    assert loop.holdout_scores({"champion": Guess(1), "challenger": Guess(2)}, sets)["other"] == {
        "n": 2, "champion_accuracy": 0.5, "challenger_accuracy": 1.0}
