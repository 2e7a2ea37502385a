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
