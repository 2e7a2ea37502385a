"""Tests of the ingest stage: every source, every quarantine reason, conversions, ids, split, noise."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataopt import registry
from dataopt.config import validate
from dataopt.errors import DataError
from dataopt.ingest import labels as lab
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.schema import QUARANTINE_COLUMNS, QUARANTINE_REASONS, SAMPLES_COLUMNS
from dataopt.stages import ingest as stage
from dataopt.stages import run_stage

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- helpers
def _rgb(seed: int, size=(16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def _huge_png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with almost no pixel data (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _params(**ingest):
    return check_methods(validate({"seed": 0, "ingest": ingest}))


def _run(tmp_path: Path, **ingest) -> tuple[dict, pd.DataFrame, np.ndarray, pd.DataFrame, dict]:
    paths = Paths.at(tmp_path)
    metrics = run_stage("ingest", _params(**ingest), paths)
    out = paths.artifacts / "ingest"
    samples = pq.read_table(out / "samples.parquet").to_pandas()
    images = np.load(out / "images.npy", mmap_mode="r")
    quarantine = pq.read_table(out / "quarantine.parquet").to_pandas()
    report = json.loads((out / "report.json").read_text())
    return metrics, samples, images, quarantine, report


def _reasons(quarantine: pd.DataFrame) -> dict[str, str]:
    return dict(zip(quarantine["source"], quarantine["reason"]))


def _check_contract(tmp_path: Path, samples: pd.DataFrame, images: np.ndarray, report: dict) -> None:
    out = tmp_path / "artifacts" / "ingest"
    schema = pq.read_schema(out / "samples.parquet")
    assert schema.names == list(SAMPLES_COLUMNS)
    for name, typ in SAMPLES_COLUMNS.items():
        assert str(schema.field(name).type) == typ, name
    qschema = pq.read_schema(out / "quarantine.parquet")
    assert qschema.names == list(QUARANTINE_COLUMNS)
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3
    assert len(images) == len(samples) == report["n_valid"]
    assert report["n_read"] == report["n_valid"] + report["n_quarantined"]
    assert sum(report["by_reason"].values()) == report["n_quarantined"]
    assert report["n_train"] + report["n_test"] == report["n_valid"]
    assert samples["sample_id"].is_unique
    assert set(samples["split"]) <= {"train", "test"}
    assert (out / "metrics.json").exists()


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def ingest_folder(tmp_path: Path) -> Path:
    """An imagefolder with good images and every kind of bad input; returns the dataset root."""
    root = tmp_path / "data" / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    good = {}
    for i in range(6):
        good[f"cat/good{i}.png"] = _png_bytes(_rgb(i))
        good[f"dog/good{i}.jpg"] = _jpeg_bytes(_rgb(100 + i))
    for rel, b in good.items():
        (root / rel).write_bytes(b)
    # odd modes, all 16x16
    arr = _rgb(7)
    (root / "cat/grey.png").write_bytes(_png_bytes(arr, "L"))
    (root / "cat/palette.png").write_bytes(_png_bytes(arr, "P"))
    rgba = np.dstack([arr, np.full((16, 16), 128, np.uint8)])
    buf = io.BytesIO(); Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    (root / "cat/alpha.png").write_bytes(buf.getvalue())
    buf = io.BytesIO(); Image.fromarray(arr).convert("CMYK").save(buf, "JPEG")
    (root / "dog/cmyk.jpg").write_bytes(buf.getvalue())
    u16 = np.full((16, 16), 65535, np.uint16); u16[:8] = 32768
    buf = io.BytesIO(); Image.fromarray(u16).save(buf, "PNG")
    (root / "dog/sixteen.png").write_bytes(buf.getvalue())
    (root / "dog/wrong_size.png").write_bytes(_png_bytes(_rgb(9, (24, 20))))
    (root / "dog/dup_of_good0.png").write_bytes(good["cat/good0.png"])
    # bad inputs
    (root / "cat/empty.png").write_bytes(b"")
    jpg = _jpeg_bytes(_rgb(11))
    (root / "cat/truncated.jpg").write_bytes(jpg[: len(jpg) - 40])
    (root / "cat/random.png").write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "cat/notes.txt").write_text("this is not an image\n")
    (root / "dog/bomb.png").write_bytes(_huge_png_header(10_000, 8_000))
    png = bytearray(_png_bytes(_rgb(12)))
    png[60:200] = bytes(b ^ 0x5A for b in png[60:200])  # a PNG header with scrambled pixel data
    (root / "dog/corrupt.png").write_bytes(bytes(png))
    (root / "loose.png").write_bytes(_png_bytes(_rgb(13)))  # not inside a class folder -> no label
    (root / ".DS_Store").write_bytes(b"junk")  # hidden: ignored and counted
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png_bytes(_rgb(14)))
    os.symlink(outside, root / "dog" / "link_out.png")
    return root


BAD = {
    "cat/empty.png": "empty_file",
    "cat/truncated.jpg": "truncated_image",
    "cat/random.png": "corrupt_image",
    "cat/notes.txt": "not_an_image",
    "dog/bomb.png": "decompression_bomb",
    "dog/corrupt.png": "corrupt_image",
    "loose.png": "missing_label",
    "dog/link_out.png": "path_escapes_root",
}


# ---------------------------------------------------------------- sources
def test_sources_registered():
    assert {"sklearn_digits", "imagefolder", "parquet", "csv"} <= set(registry.SOURCES.names())


def test_digits_default_is_deterministic(tmp_path):
    m, s, im, q, rep = _run(tmp_path / "a")
    _check_contract(tmp_path / "a", s, im, rep)
    assert len(s) == 1797 and im.shape == (1797, 8, 8, 3) and len(q) == 0
    assert im.max() == 255 and im.min() == 0
    assert (im[..., 0] == im[..., 2]).all()  # grey replicated to RGB
    assert rep["n_converted"] == {"L": 1797} and rep["classes"] == [str(i) for i in range(10)]
    # stratified 20 % test split: every class within one sample of 20 %
    counts = s.groupby(["label", "split"]).size().unstack()
    frac = counts["test"] / counts.sum(axis=1)
    assert (abs(frac - 0.2) < 0.02).all()
    assert m["n_test"] == (s["split"] == "test").sum() == 359
    assert s["label_clean"].isna().all()  # no clean labels known, no noise injected
    _, s2, im2, _, _ = _run(tmp_path / "b")
    pd.testing.assert_frame_equal(s, s2)
    assert np.array_equal(im, im2)
    s3 = pq.read_table(_seeded(tmp_path / "c", 1)).to_pandas()
    assert set(s3["sample_id"]) != set(s["sample_id"])  # another seed, another split -> other test ids
    assert (s3["split"] != s["split"]).any()


def _seeded(root: Path, seed: int) -> Path:
    paths = Paths.at(root)
    run_stage("ingest", validate({"seed": seed}), paths)
    return paths.artifacts / "ingest" / "samples.parquet"


def test_imagefolder_quarantines_every_bad_kind(tmp_path, ingest_folder):
    m, s, im, q, rep = _run(tmp_path, source="imagefolder", path=str(ingest_folder))
    _check_contract(tmp_path, s, im, rep)
    got = _reasons(q)
    assert got == BAD
    for src, detail in zip(q["source"], q["detail"]):
        assert src in detail  # each detail names its file
    assert "10000x8000" in q.set_index("source").at["dog/bomb.png", "detail"]
    kept = set(s["source"])
    assert {f"cat/good{i}.png" for i in range(6)} | {f"dog/good{i}.jpg" for i in range(6)} <= kept
    assert len(kept) == 12 + 7
    assert rep["by_reason"]["corrupt_image"] == 2 and rep["n_quarantined"] == len(BAD)
    assert set(rep["by_reason"]) == set(QUARANTINE_REASONS)
    assert rep["n_ignored_hidden"] == 1
    assert rep["classes"] == ["cat", "dog"] and rep["image_size"] == [16, 16]
    assert im.shape[1:] == (16, 16, 3)
    by = s.set_index("source")
    assert by.at["cat/grey.png", "orig_mode"] == "L" and "converted from L" in by.at["cat/grey.png", "note"]
    assert "converted from P" in by.at["cat/palette.png", "note"]
    assert "alpha" in by.at["cat/alpha.png", "note"] and by.at["cat/alpha.png", "orig_mode"] == "RGBA"
    assert by.at["dog/cmyk.jpg", "orig_mode"] == "CMYK" and "CMYK" in by.at["dog/cmyk.jpg", "note"]
    assert by.at["dog/sixteen.png", "orig_mode"].startswith("I")
    assert "16-bit" in by.at["dog/sixteen.png", "note"]
    assert rep["n_converted"]["CMYK"] == 1 and rep["n_converted"]["L"] == 1
    assert by.at["dog/wrong_size.png", "note"].startswith("resized from 20x24 to 16x16")
    assert (by.at["dog/wrong_size.png", "orig_height"], by.at["dog/wrong_size.png", "orig_width"]) == (24, 20)
    assert rep["n_resized"] == 1
    # 16-bit scaled, not clipped: 65535 -> 255 and 32768 -> 128
    six = im[s.index[s["source"] == "dog/sixteen.png"][0]]
    assert six[8:].min() == 255 and six[:8].max() == 128
    # alpha 128 composited on white: pixels lighten
    a = im[s.index[s["source"] == "cat/alpha.png"][0]].astype(int)
    assert np.array_equal(a, np.rint(_rgb(7) * (128 / 255) + 255 * (127 / 255)).astype(int))
    # lossless PNG stored exactly; the exact duplicate points at the first occurrence
    g0 = s.index[s["source"] == "cat/good0.png"][0]
    assert np.array_equal(im[g0], _rgb(0))
    assert by.at["dog/dup_of_good0.png", "duplicate_of"] == by.at["cat/good0.png", "sample_id"]
    assert s["duplicate_of"].notna().sum() == rep["n_exact_duplicates"] == 1
    assert by.at["dog/dup_of_good0.png", "content_hash"] == by.at["cat/good0.png", "content_hash"]
    assert (s["label_name"] == s["source"].str.split("/").str[0]).all()
    assert m["n_quarantined"] == len(BAD) and m["n_valid"] == len(s)
    # raw data untouched
    assert (ingest_folder / "cat/truncated.jpg").stat().st_size > 0 and (ingest_folder / "cat/empty.png").exists()


def test_imagefolder_max_pixels_and_image_size(tmp_path, ingest_folder):
    (ingest_folder / "bird").mkdir()  # a second declared class: ingest stops on fewer than two
    (ingest_folder / "bird" / "b.png").write_bytes(_png_bytes(_rgb(20)))
    _, s, im, q, rep = _run(tmp_path, source="imagefolder", path=str(ingest_folder), max_pixels=300,
                            image_size=8, classes=["dog", "bird"], max_quarantine_fraction=1.0)
    got = _reasons(q)
    assert got["dog/wrong_size.png"] == "decompression_bomb"  # 24*20 > 300, checked before decoding
    assert got["cat/good0.png"] == "unknown_label"
    assert "'cat'" in q.set_index("source").at["cat/good0.png", "detail"]
    assert im.shape[1:] == (8, 8, 3) and rep["n_resized"] == len(s)
    dog = s["source"].str.startswith("dog/")
    assert set(s.loc[dog, "label_name"]) == {"dog"} and (s.loc[dog, "label"] == 0).all()
    assert s.loc[~dog, "source"].tolist() == ["bird/b.png"] and (s.loc[~dog, "label"] == 1).all()


def test_csv_manifest(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for i in range(8):
        (root / "img" / f"{i}.png").write_bytes(_png_bytes(_rgb(i)))
    (tmp_path / "escape.png").write_bytes(_png_bytes(_rgb(50)))
    os.symlink(tmp_path / "escape.png", root / "img" / "sneaky.png")
    rows = [
        ("img/0.png", "cat", "a"), ("img/1.png", "dog", "b"), ("img/2.png", "cat", "c"),
        ("img/3.png", "dog", "d"), ("img/4.png", "", "e"),  # missing label
        ("img/5.png", "horse", "f"),  # unknown label
        ("img/6.png", "cat", "a"),  # duplicate id
        ("../escape.png", "cat", "g"), (str(tmp_path / "escape.png"), "dog", "h"),
        ("img/sneaky.png", "dog", "i"), ("img/missing.png", "cat", "j"), ("img/7.png", "dog", "k"),
    ]
    pd.DataFrame(rows, columns=["path", "label", "id"]).to_csv(root / "manifest.csv", index=False)
    _, s, im, q, rep = _run(tmp_path, source="csv", path="data/manifest.csv", classes=["cat", "dog"],
                            max_quarantine_fraction=0.6)
    _check_contract(tmp_path, s, im, rep)
    got = _reasons(q)
    assert got == {
        "img/4.png": "missing_label", "img/5.png": "unknown_label", "img/6.png": "duplicate_id",
        "../escape.png": "path_escapes_root", str(tmp_path / "escape.png"): "path_escapes_root",
        "img/sneaky.png": "path_escapes_root", "img/missing.png": "missing_file",
    }
    det = q.set_index("source")["detail"]
    assert "img/0.png" in det["img/6.png"] and "'a'" in det["img/6.png"]
    assert "horse" in det["img/5.png"]
    assert q.set_index("source").at["img/6.png", "source_id"] == "a"
    assert sorted(s["source"]) == [f"img/{i}.png" for i in (0, 1, 2, 3, 7)]
    assert rep["classes"] == ["cat", "dog"]
    by = s.set_index("source")
    assert by.at["img/1.png", "label"] == 1 and by.at["img/1.png", "label_name"] == "dog"
    assert by.at["img/0.png", "source_id"] == "a"
    assert (tmp_path / "escape.png").exists()


def _parquet_table(n: int, seed: int, with_clean: bool) -> pa.Table:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    names = np.array(["ant", "bee", "cow"])
    cols = {
        "id": pa.array(np.arange(n, dtype=np.int32)),
        "image": pa.array([_png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)],
                          type=pa.binary()),
        "noisy": pa.array(((labels + (np.arange(n) % 5 == 0)) % 3).astype(np.int16)),
        "label_name": pa.array(names[labels]).dictionary_encode(),
        "extra": pa.array(np.zeros(n)),
    }
    if with_clean:
        cols["label"] = pa.array(labels.astype(np.int16))
    else:
        cols["truth"] = pa.array(labels.astype(np.int16))
    return pa.table(cols)


def test_parquet_bytes_with_eval_path(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    t = _parquet_table(30, 0, True)
    images = t.column("image").to_pylist()
    images[4] = b""  # empty bytes
    images[7] = images[7][:20]  # truncated
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, type=pa.binary()))
    pq.write_table(t, data / "train.parquet")
    pq.write_table(_parquet_table(12, 1, False), data / "test.parquet")
    _, s, im, q, rep = _run(tmp_path, source="parquet", path="data/train.parquet",
                            eval_path="data/test.parquet", label_column="noisy", clean_label_column="label",
                            id_column="id", eval_label_column="truth")
    _check_contract(tmp_path, s, im, rep)
    assert _reasons(q) == {"train.parquet#row=4": "empty_file", "train.parquet#row=7": "truncated_image"}
    assert set(q["split"]) == {"train"}
    assert rep["classes"] == ["ant", "bee", "cow"]  # from label_name, matched to the clean column
    tr, te = s[s["split"] == "train"], s[s["split"] == "test"]
    assert len(tr) == 28 and len(te) == 12
    assert te["source"].str.startswith("test.parquet#row=").all()
    # train: label from `noisy`, clean from `label`; every 5th row disagrees
    rows = tr["source"].str.split("=").str[1].astype(int).to_numpy()
    assert (tr["label_clean"].to_numpy() == rows % 3).all()
    assert ((tr["label"] != tr["label_clean"]).to_numpy() == (rows % 5 == 0)).all()
    assert rep["label_noise"]["disagreement"]["train"] == pytest.approx(((rows % 5) == 0).mean(), abs=1e-6)
    assert te["label_clean"].isna().all() and (te["label"].to_numpy() == np.arange(12) % 3).all()
    assert (s["label_name"] == np.array(["ant", "bee", "cow"])[s["label"]]).all()
    assert tr["source_id"].tolist()[:3] == ["0", "1", "2"]
    # same id in train and test files -> different sample ids (the split is part of the key)
    assert s["sample_id"].is_unique
    # limit takes the first rows of each file
    _, s2, _, _, _ = _run(tmp_path / "lim", source="parquet", path=str(data / "train.parquet"),
                          eval_path=str(data / "test.parquet"), label_column="noisy", limit=5,
                          eval_label_column="truth", max_quarantine_fraction=0.5)
    assert sorted(s2["source"]) == sorted([f"train.parquet#row={i}" for i in (0, 1, 2, 3)]
                                          + [f"test.parquet#row={i}" for i in range(5)])


def test_parquet_path_column_and_string_labels(tmp_path):
    data = tmp_path / "d"
    (data / "px").mkdir(parents=True)
    for i in range(10):
        (data / "px" / f"{i}.png").write_bytes(_png_bytes(_rgb(i, (8, 8))))
    t = pa.table({"file": [f"px/{i}.png" for i in range(10)] + ["../../x.png"],
                  "y": ["b", "a"] * 5 + ["a"]})
    pq.write_table(t, data / "m.parquet")
    _, s, im, q, rep = _run(tmp_path, source="parquet", path=str(data / "m.parquet"), path_column="file",
                            label_column="y", test_fraction=0.4)
    assert _reasons(q) == {"../../x.png": "path_escapes_root"}
    assert rep["classes"] == ["a", "b"] and rep["n_test"] == 4 and rep["n_train"] == 6
    assert (s["label_name"] == np.where(s["label"] == 0, "a", "b")).all()


def test_missing_column_is_a_clear_error(tmp_path):
    data = tmp_path / "x.parquet"
    pq.write_table(_parquet_table(3, 0, True), data)
    with pytest.raises(DataError, match=r"no column 'nope'.*label_column.*available"):
        _run(tmp_path, source="parquet", path=str(data), label_column="nope")


# ---------------------------------------------------------------- noise, ids, bounds
@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_noise_only_in_train(tmp_path, kind):
    _, clean, _, _, _ = _run(tmp_path / "clean")
    _, s, _, _, rep = _run(tmp_path / "noisy", noise={"kind": kind, "rate": 0.3, "seed": 3})
    assert (s["sample_id"] == clean["sample_id"]).all() and (s["split"] == clean["split"]).all()
    tr, te = s["split"] == "train", s["split"] == "test"
    assert (s.loc[tr, "label_clean"] == clean.loc[tr, "label"]).all()  # pre-noise label kept
    assert (s.loc[te, "label"] == clean.loc[te, "label"]).all()  # test untouched
    assert s.loc[te, "label_clean"].isna().all()
    flipped = (s["label"] != clean["label"]).to_numpy()
    realised = flipped[tr.to_numpy()].mean()
    assert realised == pytest.approx(0.3, abs=0.04)
    assert rep["label_noise"]["injected"]["realised_rate"] == pytest.approx(realised, abs=1e-6)
    new, old = s.loc[flipped, "label"].to_numpy(), clean.loc[flipped, "label"].to_numpy()
    if kind == "pair":
        assert (new == (old + 1) % 10).all()
    else:
        assert (new != old).all() and len(np.unique(new - old)) > 5
    assert (s["label_name"] == s["label"].astype(str)).all()


def test_noise_keeps_clean_column(tmp_path):
    data = tmp_path / "t.parquet"
    pq.write_table(_parquet_table(60, 0, True), data)
    _, s, _, _, _ = _run(tmp_path, source="parquet", path=str(data), label_column="noisy",
                         clean_label_column="label", noise={"kind": "pair", "rate": 0.5, "seed": 0})
    rows = s["source"].str.split("=").str[1].astype(int).to_numpy()
    assert (s["label_clean"].to_numpy() == rows % 3).all()  # from the column, not the pre-noise label


def test_exif_orientation_applied():
    from dataopt.ingest.decode import decode

    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255  # a white strip on the left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=100)
    reason, _, rgb, note, resized = decode(None, buf.getvalue(), (20, 10))
    assert reason is None and not resized and "EXIF orientation 6" in note
    assert rgb.shape == (20, 10, 3) and rgb[:4].mean() > 250 and rgb[-4:].mean() < 5  # strip now on top


def test_sample_ids():
    ids = lab.sample_ids(["train", "test"], ["a.png", "a.png"])
    assert ids.dtype == np.int64 and (ids >= 0).all() and ids[0] != ids[1]
    assert (lab.sample_ids(["train"], ["a.png"]) == ids[:1]).all()  # stable
    with pytest.raises(DataError, match="collision"):
        lab.sample_ids(["train", "train"], ["a.png", "a.png"])


def test_too_many_quarantined_raises_after_writing(tmp_path, ingest_folder):
    with pytest.raises(DataError) as err:
        _run(tmp_path, source="imagefolder", path=str(ingest_folder), max_quarantine_fraction=0.1)
    msg = str(err.value)
    share = len(BAD) / (len(BAD) + 19)
    assert f"{share:.3f}" in msg and "0.1" in msg and "quarantine.parquet" in msg and "corrupt_image" in msg
    out = tmp_path / "artifacts" / "ingest"
    assert len(pq.read_table(out / "quarantine.parquet")) == len(BAD)
    assert not (out / "samples.parquet").exists()


def test_no_valid_sample_raises(tmp_path):
    root = tmp_path / "bad" / "cls"
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"")
    (root / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no valid sample"):
        _run(tmp_path, source="imagefolder", path=str(root.parent))
    q = pq.read_table(tmp_path / "artifacts" / "ingest" / "quarantine.parquet").to_pandas()
    assert _reasons(q) == {"cls/a.png": "empty_file", "cls/b.png": "corrupt_image"}


def test_empty_quarantine_written(tmp_path):
    _run(tmp_path, limit=50)
    q = pq.read_table(tmp_path / "artifacts" / "ingest" / "quarantine.parquet")
    assert q.num_rows == 0 and q.schema.names == list(QUARANTINE_COLUMNS)


# ---------------------------------------------------------------- shared CIFAR-10N
@pytest.mark.shared
def test_cifar10n_first_rows(tmp_path):
    train = SHARED / "cifar10" / "train.parquet"
    if not train.exists():
        pytest.skip(f"{train} is absent")
    m, s, im, q, rep = _run(tmp_path, source="parquet", path=str(train),
                            eval_path=str(SHARED / "cifar10" / "test.parquet"), label_column="random_label1",
                            clean_label_column="label", id_column="id", eval_label_column="label", limit=2000)
    _check_contract(tmp_path, s, im, rep)
    assert len(q) == 0 and im.shape == (4000, 32, 32, 3) and rep["n_train"] == rep["n_test"] == 2000
    assert rep["classes"][:3] == ["airplane", "automobile", "bird"] and rep["n_classes"] == 10
    tr = s[s["split"] == "train"]
    rate = (tr["label"] != tr["label_clean"]).mean()
    assert 0.12 < rate < 0.23  # CIFAR-10N random_label1 disagrees with the clean label on ~17 %
    assert m["label_disagreement"] == pytest.approx(rate, abs=1e-6)
    assert (tr["source_id"].to_numpy()[:3] == ["0", "1", "2"]).all()
