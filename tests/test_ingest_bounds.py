"""Bounded, validated ingest inputs (issue 17): label normalisation and bounds, non-scalar label columns,
unreadable paths and files as one message or a quarantine row, multi-frame and EXIF notes, one-class data."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataopt import cli
from dataopt.config import IngestParams
from dataopt.errors import DataError
from dataopt.ingest import labels as lab
from dataopt.ingest.decode import decode
from dataopt.ingest.pipeline import ingest


def _png(seed: int, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _csv(root: Path, labels: list[str]) -> Path:
    """A CSV manifest with one distinct image per label, under ``root``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        (root / "img" / f"{i}.png").write_bytes(_png(i))
    pd.DataFrame({"path": [f"img/{i}.png" for i in range(len(labels))], "label": labels}).to_csv(
        root / "m.csv", index=False)
    return root / "m.csv"


def _ingest(tmp_path: Path, **kw):
    kw.setdefault("max_quarantine_fraction", 1.0)
    return ingest(IngestParams(**kw), 0, tmp_path, workers=1)


def _check_counts(res) -> None:
    rep = res.report
    assert rep["n_read"] == rep["n_valid"] + rep["n_quarantined"]
    assert sum(rep["by_reason"].values()) == rep["n_quarantined"] == res.quarantine.num_rows
    assert res.samples.num_rows == len(res.images) == rep["n_valid"]


# ---------------------------------------------------------------- label normalisation and bounds
def test_normalise_label():
    assert [lab.normalise(v) for v in ("1", " 01 ", "1.0", "\u0661", "+1", 1, 1.0, np.int16(1))] == [1] * 8
    for missing in (None, "", "  ", "None", "nan", "NaN", "null", "NULL", float("nan")):
        assert lab.normalise(missing) is None, missing
    assert lab.normalise(" cat ") == "cat"
    assert lab.normalise("1_000") == "1_000" and lab.normalise("1e3") == "1e3"  # not integer-like
    assert lab.normalise("-3") == -3 and lab.normalise("1.5") == "1.5"


def test_integer_like_labels_are_one_class(tmp_path):
    path = _csv(tmp_path, ["1", "01", "1.0", "\u0661", "0", "0", " 0 ", "00"])
    res = _ingest(tmp_path, source="csv", path=str(path))
    _check_counts(res)
    assert res.report["classes"] == ["0", "1"] and res.report["n_quarantined"] == 0


def test_missing_label_spellings_are_quarantined(tmp_path):
    path = _csv(tmp_path, ["a", "b", "a", "b", "None", "nan", "null", "NULL"])
    res = _ingest(tmp_path, source="csv", path=str(path))
    _check_counts(res)
    assert res.report["classes"] == ["a", "b"]
    assert res.report["by_reason"]["missing_label"] == 4


def test_huge_label_value_stops_before_allocating(tmp_path):
    path = _csv(tmp_path, ["0", "1", "0", "1", "100000000"])
    with pytest.raises(DataError, match=r"'label'.*100000001 classes.*ingest.max_classes=1000"):
        _ingest(tmp_path, source="csv", path=str(path))


def test_too_many_string_classes(tmp_path):
    path = _csv(tmp_path, [f"c{i}" for i in range(12)])
    with pytest.raises(DataError, match=r"'label'.*12 distinct.*ingest.max_classes=10"):
        _ingest(tmp_path, source="csv", path=str(path), max_classes=10)
    assert _ingest(tmp_path, source="csv", path=str(path), max_classes=12).report["n_classes"] == 12


def test_declared_classes_are_bounded_and_normalised(tmp_path):
    path = _csv(tmp_path, ["01", "2", " 1", "x"])
    res = _ingest(tmp_path, source="csv", path=str(path), classes=["1", "2"])
    assert res.report["classes"] == ["1", "2"] and res.report["by_reason"]["unknown_label"] == 1
    with pytest.raises(DataError, match="ingest.classes has 3 names.*max_classes=2"):
        _ingest(tmp_path, source="csv", path=str(path), classes=["1", "2", "3"], max_classes=2)


@pytest.mark.parametrize("column,kind", [
    (pa.array([[0], [1]] * 3), "list"),
    (pa.array([{"a": 0}, {"a": 1}] * 3), "struct"),
    (pa.array([b"0", b"1"] * 3, type=pa.binary()), "binary"),
    (pa.array([0.5, 1.0] * 3), "double"),
])
def test_non_scalar_parquet_labels_rejected(tmp_path, column, kind):
    t = pa.table({"image": pa.array([_png(i) for i in range(6)], type=pa.binary()), "label": column})
    pq.write_table(t, tmp_path / "t.parquet")
    with pytest.raises(DataError, match=rf"t.parquet: label column 'label' has type {kind}"):
        _ingest(tmp_path, source="parquet", path="t.parquet")


def test_integer_valued_float_labels_accepted(tmp_path):
    t = pa.table({"image": pa.array([_png(i) for i in range(6)], type=pa.binary()),
                  "label": pa.array([0.0, 1.0, None] * 2)})
    pq.write_table(t, tmp_path / "t.parquet")
    res = _ingest(tmp_path, source="parquet", path="t.parquet")
    _check_counts(res)
    assert res.report["classes"] == ["0", "1"] and res.report["by_reason"]["missing_label"] == 2


def test_fewer_than_two_classes_stops(tmp_path):
    root = tmp_path / "one" / "cat"
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"{i}.png").write_bytes(_png(i))
    res = _ingest(tmp_path, source="imagefolder", path="one")
    _check_counts(res)
    assert res.error and "1 class" in res.error and "at least 2" in res.error and "'cat'" in res.error


# ---------------------------------------------------------------- unreadable inputs
def test_nul_byte_in_paths(tmp_path):
    with pytest.raises(DataError, match="ingest.path.*NUL"):
        _ingest(tmp_path, source="csv", path="m\0.csv")
    path = _csv(tmp_path, ["a", "b", "a", "b"])
    with path.open("a") as f:
        f.write('"img/\x00.png",a\n')
    res = _ingest(tmp_path, source="csv", path=str(path))
    _check_counts(res)
    q = res.quarantine.to_pandas()
    assert q["reason"].tolist() == ["missing_file"] and "NUL" in q["detail"][0]


def test_non_utf8_file_and_folder_names(tmp_path):
    root = os.fsencode(tmp_path / "data")
    for cls in (b"caf\xe9", b"dog"):
        os.makedirs(os.path.join(root, cls))
        for i in range(3):
            name = b"im\xff%d.png" % i if cls == b"dog" else b"%d.png" % i
            with open(os.path.join(root, cls, name), "wb") as f:
                f.write(_png(i + len(cls)))
    res = _ingest(tmp_path, source="imagefolder", path="data")
    _check_counts(res)
    assert res.report["n_valid"] == 6 and res.report["classes"] == ["caf\\xe9", "dog"]
    assert "dog/im\\xff0.png" in res.samples.column("source").to_pylist()


def test_text_file_named_parquet(tmp_path):
    (tmp_path / "t.parquet").write_text("path,label\na.png,0\n")
    with pytest.raises(DataError, match=r"t.parquet.*not a readable Parquet file"):
        _ingest(tmp_path, source="parquet", path="t.parquet")


def test_cli_exit_2_one_line(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("ingest:\n  source: parquet\n  path: t.parquet\n")
    (tmp_path / "t.parquet").write_text("not parquet")
    code = cli.main(["stage", "ingest", "--project", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dataopt: error: ") and "t.parquet" in err[0]


# ---------------------------------------------------------------- notes
def _frames(fmt: str, n: int, **kw) -> bytes:
    ims = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(n)]
    buf = io.BytesIO()
    ims[0].save(buf, fmt, save_all=True, append_images=ims[1:], **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF"])
def test_multi_frame_noted(fmt):
    reason, _, rgb, note, _ = decode(None, _frames(fmt, 3), (8, 8))
    assert reason is None and "first of 3 frames" in note
    assert rgb.max() == 0  # the first frame (black) is kept
    assert "frames" not in decode(None, _frames(fmt, 1), (8, 8))[3]


def test_invalid_exif_orientation_not_applied():
    im = Image.fromarray(np.zeros((6, 10, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 9
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    reason, _, rgb, note, _ = decode(None, buf.getvalue(), (6, 10))
    assert reason is None and rgb.shape == (6, 10, 3)
    assert "applied" not in note and "EXIF orientation 9 ignored" in note


def test_an_extreme_aspect_ratio_is_resized_in_bounded_memory():
    # a 1 x 200k image covering a 32 x 32 target was resized to 32 x 6.4M pixels first (600 MB), then cropped
    import tracemalloc

    from dataopt.ingest.decode import fit_size

    rgb = np.full((1, 200_000, 3), 200, np.uint8)
    tracemalloc.start()
    out, note = fit_size(rgb, (32, 32))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (32, 32, 3) and (out == 200).all() and "centre crop" in note
    assert peak < 200e6
