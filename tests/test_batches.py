"""Batches: `dataopt batch add` copies, validates, freezes and records new data; ingest reads it beside the
reference with its provenance in a `batch` column."""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataopt import batches
from dataopt.cli import main
from dataopt.config import IngestParams, Params
from dataopt.errors import DataError, UserError
from dataopt.ingest.add import add_batch, remove_batch_files
from dataopt.ingest.pipeline import ingest
from dataopt.paths import Paths


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder(root: Path, n_per_class: int = 3) -> Path:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            (root / c / f"{i}.png").write_bytes(_png(10 * i + (100 if c == "dog" else 0)))
    return root


def _parquet(path: Path, labels, bad: int = 0) -> Path:
    images = [_png(5 * i) for i in range(len(labels))]
    for i in range(bad):
        images[i] = b"not an image"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}), path)
    return path


@pytest.fixture
def project(tmp_path):
    paths = Paths.at(tmp_path / "proj")
    paths.root.mkdir()
    yield paths
    for folder in (paths.data / "batches").glob("*"):  # read-only folders: pytest cannot clean them alone
        remove_batch_files(folder)


def test_add_copies_validates_freezes_and_records(project, tmp_path):
    src = _imagefolder(tmp_path / "src")
    entry = add_batch(project, src, "round1", IngestParams(), 0)
    folder = project.data / "batches" / "round1"
    copied = sorted(p.relative_to(folder / "images").as_posix() for p in folder.rglob("*.png"))
    assert copied == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in folder.rglob("*"))
    assert all(not (p.stat().st_mode & stat.S_IWUSR) for p in [folder, *folder.rglob("*")])
    assert (src / "cat" / "0.png").stat().st_mode & stat.S_IWUSR  # the source is never touched
    manifest = json.loads(batches.manifest_path(project).read_text())["batches"]
    assert [e["name"] for e in manifest] == ["round1"] and manifest[0] == entry
    assert entry["kind"] == "imagefolder" and entry["rows"] == entry["n_valid"] == 6
    assert entry["classes"] == ["cat", "dog"] and entry["source"] == str(src.resolve())
    assert entry["content_hash"] == batches.content_hash(folder)
    batches.verify(project, entry)  # unchanged: no error


def test_a_batch_changed_in_place_is_refused(project, tmp_path):
    entry = add_batch(project, _imagefolder(tmp_path / "src"), "b", IngestParams(), 0)
    f = project.data / "batches" / "b" / "images" / "cat" / "0.png"
    f.chmod(0o644)
    f.write_bytes(_png(77))
    with pytest.raises(DataError, match="changed since it was added"):
        batches.verify(project, entry)


def test_names_are_unique_and_checked(project, tmp_path):
    src = _imagefolder(tmp_path / "src")
    add_batch(project, src, "b", IngestParams(), 0)
    with pytest.raises(UserError, match="already exists"):
        add_batch(project, src, "b", IngestParams(), 0)
    for bad in ("reference", "../x", ".hidden", "a b"):
        with pytest.raises(UserError, match="batch name"):
            add_batch(project, src, bad, IngestParams(), 0)
    assert add_batch(project, src, None, IngestParams(), 0)["name"] == "batch-002"  # default names count up


def test_a_mostly_bad_batch_is_refused_and_nothing_is_left(project, tmp_path):
    src = _parquet(tmp_path / "bad.parquet", [0, 1, 0, 1], bad=3)
    with pytest.raises(DataError, match="batch 'bad' refused: .*3 of 4 rows quarantined"):
        add_batch(project, src, "bad", IngestParams(), 0)
    assert not any((project.data / "batches").iterdir())
    assert batches.read_manifest(project) == []


def test_bad_rows_are_counted_with_their_reason(project, tmp_path):
    entry = add_batch(project, _parquet(tmp_path / "b.parquet", [0, 1, 0, 1, 1], bad=1), "b", IngestParams(), 0)
    assert (entry["rows"], entry["n_valid"], entry["n_quarantined"]) == (5, 4, 1)
    assert entry["quarantine_reasons"] == {"not_an_image": 1}


def test_csv_batches_bring_the_images_they_name(project, tmp_path):
    src = tmp_path / "csvsrc"
    (src / "img").mkdir(parents=True)
    rows = []
    for i in range(4):
        (src / "img" / f"{i}.png").write_bytes(_png(40 * i))
        rows.append({"path": f"img/{i}.png", "label": "a" if i % 2 else "b"})
    (src / "unrelated.bin").write_bytes(b"x" * 100)
    pd.DataFrame(rows).to_csv(src / "labels.csv", index=False)
    entry = add_batch(project, src / "labels.csv", "c", IngestParams(), 0)
    folder = project.data / "batches" / "c"
    assert entry["n_valid"] == 4 and (folder / "img" / "3.png").exists()
    assert not (folder / "unrelated.bin").exists()


def test_ingest_reads_the_reference_and_the_listed_batches(project, tmp_path):
    add_batch(project, _parquet(tmp_path / "b.parquet", [0, 1, 2, 3, 4, 5]), "new", IngestParams(), 0)
    p = Params().ingest.model_copy(update={"batches": ["new"]})
    result = ingest(p, 0, project.root)
    s = result.samples.to_pandas()
    new = s[s["batch"] == "new"]
    assert len(new) == 6 and (new["split"] == "train").all()
    assert new["source"].str.startswith("batches/new/").all()
    assert (s["batch"] == "reference").sum() == 1797 and s["sample_id"].is_unique
    assert len(result.images) == len(s) and result.images.shape[1:] == (8, 8, 3)
    # the batch's pixels, decoded beside a built-in (pre-decoded) source, land on their own rows
    assert not np.array_equal(result.images[new.index[1]], result.images[new.index[2]])
    assert result.quarantine.schema.names[-1] == "batch"


def test_ingest_refuses_an_unknown_batch(project):
    with pytest.raises(UserError, match="no batch in"):
        ingest(Params().ingest.model_copy(update={"batches": ["nope"]}), 0, project.root)


def _params_file(root: Path) -> None:
    (root / "params.yaml").write_text("seed: 0\n")


def test_cli_batch_add_and_list(project, tmp_path, capsys):
    _params_file(project.root)
    src = _imagefolder(tmp_path / "src")
    assert main(["batch", "add", str(src), "--name", "photos", "--project", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert "added batch 'photos': 6 valid of 6 rows" in out and "not a DVC project" in out
    assert main(["batch", "list", "--project", str(project.root)]) == 0
    assert "photos" in capsys.readouterr().out
    # user errors: one line, exit code 2
    assert main(["batch", "add", str(src), "--name", "photos", "--project", str(project.root)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["batch", "add", str(tmp_path / "missing"), "--project", str(project.root)]) == 2
    assert "batch source not found" in capsys.readouterr().err
    assert main(["batch", "add", "--project", str(project.root)]) == 2
    assert main(["drift", "nope", "--project", str(project.root)]) == 2
    assert "unknown batch 'nope'" in capsys.readouterr().err


def test_dataopt_creates_data_folder(tmp_path):
    _params_file(tmp_path)
    assert main(["batch", "list", "--project", str(tmp_path)]) == 0
    assert (tmp_path / "data").is_dir()


def test_a_batch_of_known_images_runs_through_the_chain_with_its_provenance(project, tmp_path):
    """A batch of images the reference already has: every row's duplicate_of is a 64-bit sample id
    (found by the retrain flow: perceive cast them to float64 with overflow checks and failed)."""
    from dataopt.stages import run_stage

    add_batch(project, demo_batch_file(tmp_path), "copy", IngestParams(), 0,
              {"id_column": "id", "label_name_column": None})
    params = Params.model_validate({"ingest": {"batches": ["copy"]}, "perceive": {"epochs": 1, "early_epochs": 1, "folds": 2}})
    for name in ("ingest", "embed", "perceive", "analyze", "optimize"):
        run_stage(name, params, project)
    corpus = json.loads((project.artifacts / "perceive" / "corpus.json").read_text())
    assert corpus["duplicate_rate"] > 0.1
    # provenance: flags and plan decisions per batch of origin
    flags = json.loads((project.artifacts / "analyze" / "analysis.json").read_text())["by_batch"]
    plan = json.loads((project.artifacts / "optimize" / "plan.json").read_text())["by_batch"]
    samples = pd.read_parquet(project.artifacts / "ingest" / "samples.parquet")
    held = samples[(samples["split"] == "holdout")]
    assert set(held["batch"]) == {"copy"} and 50 <= len(held) <= 70  # 0.2 of each class of 300 rows
    assert set(flags) == set(plan) == {"reference", "copy"} and plan["copy"]["n"] == 300 - len(held)
    assert 0 <= flags["copy"]["label_issue_mean"] <= 1 and plan["copy"]["kept_sum"] <= 300 - len(held)
    # the held-out rows are never trained on: not perceived as train rows, not in the plan, not trained
    from dataopt.train.trainer import train_set_from_plan

    signals = pd.read_parquet(project.artifacts / "perceive" / "signals.parquet", columns=["sample_id"])
    table = pd.read_parquet(project.artifacts / "optimize" / "plan.parquet")
    assert not set(held["sample_id"]) & (set(signals["sample_id"]) | set(table["sample_id"]))
    trained = train_set_from_plan(samples, table, "plan.parquet").rows
    assert len(trained) and not set(held.index) & set(trained.tolist())


def test_each_batch_holds_out_a_stable_stratified_share(project, tmp_path):
    """A seeded share of each class of each batch is held out (split "holdout"); adding another batch
    never changes which rows of the first are; the reference's rows (the test split evaluate scores)
    are the same as without batches, and nothing new appears in a run without batches."""
    labels = [0] * 10 + [1] * 10
    for name in ("a", "b"):
        add_batch(project, _parquet(tmp_path / f"{name}.parquet", labels), name, IngestParams(), 0)

    def ingested(names, **kw):
        return ingest(Params().ingest.model_copy(update={"batches": names, **kw}), 0, project.root)

    none, one, two = ingested([]), ingested(["a"]), ingested(["a", "b"])
    s1, s2 = one.samples.to_pandas(), two.samples.to_pandas()
    held = s1[s1["split"] == "holdout"]
    assert set(held["batch"]) == {"a"} and held.groupby("label").size().tolist() == [2, 2]
    held_a = s2[(s2["split"] == "holdout") & (s2["batch"] == "a")]
    assert held_a["sample_id"].tolist() == held["sample_id"].tolist()
    assert (s2.loc[s2["batch"] == "b", "split"] == "holdout").sum() == 4
    ref = none.samples.to_pandas()
    assert s2[s2["batch"] == "reference"][["sample_id", "split", "label"]].equals(ref[["sample_id", "split", "label"]])
    assert two.report["n_test"] == none.report["n_test"] and two.report["n_holdout"] == {"a": 4, "b": 4}
    assert two.metrics["n_holdout"] == 8 and two.report["n_train"] == none.report["n_train"] + 32
    assert "n_holdout" not in none.report and "n_holdout" not in none.metrics
    # another seed holds out other rows; a share of 0 holds out none (every batch row trains)
    other = ingest(Params().ingest.model_copy(update={"batches": ["a"]}), 1, project.root).samples.to_pandas()
    assert set(other.loc[other["split"] == "holdout", "source"]) != set(held["source"])
    assert (ingested(["a"], batch_holdout=0.0).samples.to_pandas().query("batch == 'a'")["split"] == "train").all()


def demo_batch_file(tmp_path: Path) -> Path:
    from dataopt.demo import demo_batch

    return demo_batch("clean", tmp_path / "clean.parquet", rows=300)
