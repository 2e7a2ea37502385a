"""Property-based fuzzing of the ingest sources (issue 17) with Hypothesis.

Random bytes as image files, random file and folder names (any bytes the file system allows), random
CSV and Parquet schemas and values, random labels, all through ``dataopt.ingest.pipeline.ingest`` (what
the ingest stage calls). Properties: nothing but a UserError (one message) ever escapes, and every row
read is accounted for: rows in the input = n_read = kept + quarantined, in report.json and in the
tables. The default run is ~40 examples per property; ``-m slow`` runs a bigger campaign.

With ``DATAOPT_FUZZ_CAMPAIGN=1`` a broken property is counted instead of failing, and the module prints
the counts (``pytest -s``): that gives a campaign's figures (cases, tracebacks by place, silent drops).
"""
from __future__ import annotations

import csv
import io
import os
import signal
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dataopt.config import IngestParams
from dataopt.errors import UserError
from dataopt.ingest.pipeline import ingest
from dataopt.schema import QUARANTINE_REASONS

# Pillow warns about random TIFF headers ("Tag data larger than file"): expected here, not a finding
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# derandomized: CI runs the same cases every time
FAST = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=400, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
OUTCOMES: Counter = Counter()  # cases per outcome; printed at the end of the module (pytest -s)
CAMPAIGN = bool(os.environ.get("DATAOPT_FUZZ_CAMPAIGN"))


@pytest.fixture(scope="module", autouse=True)
def _campaign_figures():
    yield
    print(f"\ningest fuzz campaign: {sum(v for k, v in OUTCOMES.items() if k in _CASES)} cases: "
          f"{dict(sorted(OUTCOMES.items()))}")


_CASES = ("user_error", "stopped", "kept", "traceback")


def _broken(what: str, ok: bool, detail: object = "") -> bool:
    """Assert ``ok``, or in a campaign count ``what`` and go on; True when broken."""
    if not CAMPAIGN:
        assert ok, (what, detail)
    elif not ok:
        OUTCOMES[what] += 1
    return not ok


# ---------------------------------------------------------------- strategies
def _image(draw_seed: int, w: int, h: int, mode: str, fmt: str, frames: int) -> bytes:
    rng = np.random.default_rng(draw_seed)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode) for _ in range(frames)]
    buf = io.BytesIO()
    try:
        ims[0].save(buf, fmt, save_all=frames > 1, append_images=ims[1:])
    except (OSError, ValueError, KeyError):  # a mode the format cannot store: a plain PNG instead
        buf = io.BytesIO()
        ims[0].convert("RGB").save(buf, "PNG")
    return buf.getvalue()


valid_images = st.builds(
    _image, st.integers(0, 2**16), st.integers(1, 12), st.integers(1, 12),
    st.sampled_from(["RGB", "L", "P", "RGBA", "1", "I"]), st.sampled_from(["PNG", "GIF", "TIFF", "BMP"]),
    st.integers(1, 3),
)


def _mangle(b: bytes, cut: int, flips: list[int]) -> bytes:
    out = bytearray(b[: max(0, len(b) - cut)])
    for i in flips:
        if out:
            out[i % len(out)] ^= 0xFF
    return bytes(out)


contents = st.one_of(
    valid_images,
    valid_images,
    st.builds(_mangle, valid_images, st.integers(0, 60), st.lists(st.integers(0, 10_000), max_size=4)),
    st.binary(max_size=300),
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"II*\x00", b"not an image\n"]),
)

# one path component: any bytes but "/" and NUL, not "." or ".."; some long ones near the 255-byte limit
name_bytes = st.one_of(st.binary(min_size=1, max_size=24), st.binary(min_size=200, max_size=255)).map(
    lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")).filter(lambda b: b not in (b".", b".."))

# label text: integer spellings, missing spellings, numbers far out of range, any unicode
label_text = st.one_of(
    st.sampled_from(["0", "1", "01", "1.0", " 1 ", "\u0661", "-1", "2", "None", "nan", "null", "", "a", "b"]),
    st.integers(-(10**12), 10**12).map(str),
    st.text(max_size=12),
)


def _params(**kw) -> IngestParams:
    kw.setdefault("max_quarantine_fraction", 1.0)
    return IngestParams(**kw)


def _timeout(*_):
    raise TimeoutError("one ingest case ran for 10 s")


def _check(root: Path, params: IngestParams, rows_in: int | None, hidden: int | None = None):
    """Run ingest; a UserError is an accepted outcome, any other exception fails the property."""
    if CAMPAIGN:  # the old code built a list per class: a huge label ran for minutes (counted as a traceback)
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(10)
    try:
        res = ingest(params, 0, root, workers=1)
    except UserError as err:
        assert str(err).strip()
        OUTCOMES["user_error"] += 1
        return None
    except Exception as exc:
        if not CAMPAIGN:
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        OUTCOMES["traceback"] += 1
        OUTCOMES[f"traceback {type(exc).__name__} at {Path(where.filename).name}:{where.lineno}"] += 1
        return None
    finally:
        signal.alarm(0)
    rep = res.report
    _broken("rows_not_counted", rep["n_read"] == rep["n_valid"] + rep["n_quarantined"]
            and sum(rep["by_reason"].values()) == rep["n_quarantined"] == res.quarantine.num_rows
            and res.samples.num_rows == len(res.images) == rep["n_valid"], rep)
    assert set(rep["by_reason"]) <= set(QUARANTINE_REASONS)
    _broken("over_max_classes", rep["n_classes"] == len(rep["classes"]) <= params.max_classes, rep["n_classes"])
    if rows_in is not None:  # no row silently dropped (or invented) by the reader
        _broken("silent_drop", rep["n_read"] == rows_in, (rep["n_read"], rows_in))
    if hidden is not None:
        _broken("hidden_miscounted", rep.get("n_ignored_hidden") == hidden, (rep.get("n_ignored_hidden"), hidden))
    if res.samples.num_rows:
        labels = np.asarray(res.samples.column("label"))
        assert labels.min() >= 0 and labels.max() < rep["n_classes"]
    OUTCOMES["stopped" if res.error else "kept"] += 1
    return res


# ---------------------------------------------------------------- ImageFolder: names and bytes
folder_tree = st.lists(
    st.tuples(name_bytes, st.lists(st.tuples(name_bytes, contents), max_size=5, unique_by=lambda t: t[0])),
    min_size=1, max_size=4, unique_by=lambda t: t[0],
)


def _imagefolder_case(tree, loose, max_classes):
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(os.fsencode(tmp), b"data")
        os.makedirs(root)
        rows_in = hidden = 0
        for folder, files in tree:
            os.makedirs(os.path.join(root, folder))
            if folder.startswith(b"."):
                hidden += 1  # its files are written but never read
            for name, data in files:
                with open(os.path.join(root, folder, name), "wb") as f:
                    f.write(data)
                if not folder.startswith(b"."):
                    hidden += name.startswith(b".")
                    rows_in += not name.startswith(b".")
        for name, data in loose:
            if not any(name == folder for folder, _ in tree):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(data)
                hidden += name.startswith(b".")
                rows_in += not name.startswith(b".")
        _check(Path(tmp), _params(source="imagefolder", path="data", max_classes=max_classes), rows_in, hidden)


@FAST
@given(folder_tree, st.lists(st.tuples(name_bytes, contents), max_size=2, unique_by=lambda t: t[0]),
       st.integers(2, 5))
def test_imagefolder_any_names_and_bytes(tree, loose, max_classes):
    _imagefolder_case(tree, loose, max_classes)


# ---------------------------------------------------------------- CSV: random schemas and values
csv_cell = st.one_of(label_text, st.sampled_from(["img/x.png", "../x", "/etc/passwd", "img/\x00.png", "img",
                                                  "img/" + "é" * 300, "img/./0.png"]))
csv_path = st.one_of(st.sampled_from([f"img/{i}.png" for i in range(6)]), csv_cell)
csv_row = st.tuples(csv_path, label_text, st.lists(csv_cell, min_size=1, max_size=3))
# mostly a usable header (path, label first), sometimes any
csv_header = st.one_of(
    st.lists(st.sampled_from(["id", "label_name", "extra", "Path", "", "label"]), max_size=3).map(
        lambda extra: ["path", "label", *extra]),
    st.lists(st.sampled_from(["path", "label", "id", "label_name", "extra", "Path", ""]), min_size=1, max_size=5),
)


def _csv_case(header, rows, raw, max_classes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "img").mkdir()
        for i in range(6):
            (root / "img" / f"{i}.png").write_bytes(_image(i, 4, 4, "RGB", "PNG", 1))
        if raw is not None:  # any bytes, named .csv
            (root / "m.csv").write_bytes(raw)
            rows_in = None
        else:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(header)
            for path, label, extra in rows:
                w.writerow([path if c == "path" else label if c == "label" else extra[i % len(extra)]
                            for i, c in enumerate(header)])
            (root / "m.csv").write_text(buf.getvalue(), encoding="utf-8", errors="surrogatepass")
            rows_in = len(rows)
        _check(root, _params(source="csv", path="m.csv", max_classes=max_classes), rows_in)


@FAST
@given(csv_header, st.lists(csv_row, max_size=8),
       st.one_of(st.none(), st.binary(max_size=200)), st.integers(2, 5))
def test_csv_any_schema_and_values(header, rows, raw, max_classes):
    _csv_case(header, rows, raw, max_classes)


# ---------------------------------------------------------------- Parquet: random column types
def _label_column(kind: str, values: list[int], texts: list[str]) -> pa.Array:
    if kind == "int":
        return pa.array(values, type=pa.int64())
    if kind == "float":
        return pa.array([v / 2 if v % 3 == 0 else float(v) for v in values], type=pa.float64())
    if kind == "float_int":
        return pa.array([float(v % 4) if v % 5 else float("nan") for v in values], type=pa.float64())
    if kind == "string":
        return pa.array(texts)
    if kind == "dict":
        return pa.array(texts).dictionary_encode()
    if kind == "list":
        return pa.array([[v] for v in values])
    if kind == "struct":
        return pa.array([{"a": v} for v in values])
    if kind == "binary":
        return pa.array([t.encode("utf-8", "surrogatepass") for t in texts], type=pa.binary())
    if kind == "bool":
        return pa.array([v % 2 == 0 for v in values])
    return pa.nulls(len(values))


parquet_rows = st.lists(st.tuples(contents, st.integers(-3, 2**40), label_text), max_size=8)


def _parquet_case(rows, kind, image_kind, with_id, raw, max_classes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if raw is not None:
            (root / "t.parquet").write_bytes(raw)
            rows_in = None
        else:
            images = [r[0] for r in rows]
            values = [r[1] % 5 if r[1] % 7 else r[1] for r in rows]  # mostly small, some huge
            cols = {
                "image": pa.array(images, type=pa.binary()) if image_kind == "binary"
                else pa.array([len(b) for b in images]) if image_kind == "int" else pa.array([b.hex() for b in images]),
                "label": _label_column(kind, values, [r[2] for r in rows]),
            }
            if with_id:
                cols["id"] = pa.array([v % 4 for v in values])
            pq.write_table(pa.table(cols), root / "t.parquet")
            rows_in = len(rows)
        _check(root, _params(source="parquet", path="t.parquet", id_column="id" if with_id else None,
                             max_classes=max_classes), rows_in)


@FAST
@given(parquet_rows,
       st.sampled_from(["int", "float", "float_int", "string", "dict", "list", "struct", "binary", "bool", "null"]),
       st.sampled_from(["binary", "binary", "binary", "int", "string"]), st.booleans(),
       st.one_of(st.none(), st.none(), st.binary(max_size=200)), st.integers(2, 6))
def test_parquet_any_schema_and_values(rows, kind, image_kind, with_id, raw, max_classes):
    _parquet_case(rows, kind, image_kind, with_id, raw, max_classes)


# ---------------------------------------------------------------- the bigger campaign
@pytest.mark.slow
@SLOW
@given(folder_tree, st.lists(st.tuples(name_bytes, contents), max_size=3, unique_by=lambda t: t[0]),
       st.integers(2, 8))
def test_imagefolder_campaign(tree, loose, max_classes):
    _imagefolder_case(tree, loose, max_classes)


@pytest.mark.slow
@SLOW
@given(csv_header, st.lists(csv_row, max_size=12),
       st.one_of(st.none(), st.binary(max_size=400)), st.integers(2, 8))
def test_csv_campaign(header, rows, raw, max_classes):
    _csv_case(header, rows, raw, max_classes)


@pytest.mark.slow
@SLOW
@given(parquet_rows,
       st.sampled_from(["int", "float", "float_int", "string", "dict", "list", "struct", "binary", "bool", "null"]),
       st.sampled_from(["binary", "int", "string"]), st.booleans(), st.one_of(st.none(), st.binary(max_size=400)),
       st.integers(2, 8))
def test_parquet_campaign(rows, kind, image_kind, with_id, raw, max_classes):
    _parquet_case(rows, kind, image_kind, with_id, raw, max_classes)
