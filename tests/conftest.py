"""Shared fixtures: a small ingested project built from scikit-learn digits, written like ingest does."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import NearestNeighbors

from dataopt.analyze.base import arrow_table
from dataopt.io import save_npy, save_npz, write_parquet
from dataopt.paths import Paths
from dataopt.schema import SAMPLES_COLUMNS

_ARROW = {"int64": pa.int64(), "string": pa.string()}


def write_digits_ingested(
    root: Path, n: int = 600, test_fraction: float = 0.2, noise_rate: float = 0.0, seed: int = 0
) -> Paths:
    """Write ``artifacts/ingest/{samples.parquet, images.npy}`` for the first ``n`` digits under ``root``.

    Images are the 8x8 grey digits scaled to uint8 and repeated to RGB, ``(n, 8, 8, 3)``.
    ``sample_id`` is ``arange(n)``; the split is a seeded shuffle with ``test_fraction`` test rows.
    With ``noise_rate`` > 0 that share of the train rows get a different random label in ``label``;
    ``label_clean`` keeps the true one (as ingest does for injected noise).
    """
    digits = load_digits()
    grey = np.round(digits.images[:n] * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    clean = digits.target[:n].astype(np.int64)
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    split[rng.permutation(n)[: int(round(test_fraction * n))]] = "test"
    label = clean.copy()
    train_idx = np.flatnonzero(split == "train")
    flip = rng.choice(train_idx, int(round(noise_rate * len(train_idx))), replace=False)
    label[flip] = (clean[flip] + rng.integers(1, 10, len(flip))) % 10  # always a different class
    hashes = [hashlib.sha1(img.tobytes()).hexdigest() for img in images]
    first: dict[str, int] = {}
    duplicate_of = []  # sample_id of the first identical image, as ingest records it
    for i, h in enumerate(hashes):
        duplicate_of.append(first.get(h))
        first.setdefault(h, i)
    data = {
        "sample_id": np.arange(n, dtype=np.int64),
        "split": split.tolist(),
        "label": label,
        "label_name": [str(v) for v in label],
        "label_clean": clean,
        "source": [f"sklearn_digits#row={i}" for i in range(n)],
        "source_id": [str(i) for i in range(n)],
        "orig_height": np.full(n, 8, dtype=np.int64),
        "orig_width": np.full(n, 8, dtype=np.int64),
        "orig_mode": ["L"] * n,
        "note": ["converted from L"] * n,
        "content_hash": hashes,
        "duplicate_of": duplicate_of,
        "batch": ["reference"] * n,
    }
    schema = pa.schema([(c, _ARROW[t]) for c, t in SAMPLES_COLUMNS.items()])
    paths = Paths.at(root)
    write_parquet(paths.stage("ingest") / "samples.parquet", pa.table(data, schema=schema))
    save_npy(paths.stage("ingest") / "images.npy", images)
    return paths


@pytest.fixture
def digits_ingested(tmp_path: Path) -> Paths:
    """A project in ``tmp_path`` with ingest outputs for 600 digits (480 train, 120 test, clean labels)."""
    return write_digits_ingested(tmp_path)


@pytest.fixture(scope="session")
def digits_writer():
    """:func:`write_digits_ingested` itself, for module-scoped fixtures (``digits_writer(root, n=...)``)."""
    return write_digits_ingested


# a tiny OpenCLIP architecture (ViT: width 64, 2 layers, patch 8, 32 px; text: width 32, 1 layer) so that
# the open_clip backend is tested offline through the same `pretrained=<checkpoint>` path users take
TINY_OPENCLIP_NAME = "dataopt-tiny-clip"
TINY_OPENCLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_openclip(
    folder: Path, name: str = TINY_OPENCLIP_NAME, seed: int = 0, fmt: str = "safetensors", **overrides
) -> tuple[str, Path, Path]:
    """Write ``<folder>/<name>.json`` (an OpenCLIP model config) and a randomly initialised checkpoint.

    ``fmt`` is ``"safetensors"`` or ``"pt"`` (a plain state_dict, loadable with ``weights_only=True``);
    ``overrides`` replace top-level config keys (e.g. ``embed_dim=16`` for a mismatching architecture).
    Returns ``(model_name, model_config_path, checkpoint_path)``.
    """
    import json

    import torch
    from open_clip.model import CLIP

    from dataopt.train.loop import seeded

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_OPENCLIP_CONFIG, **overrides}
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(cfg, indent=2))
    with seeded(seed):
        state = CLIP(**cfg).state_dict()
    checkpoint = folder / f"{name}-seed{seed}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    else:
        torch.save(state, checkpoint)
    return name, config_path, checkpoint


@pytest.fixture(scope="session")
def tiny_openclip_checkpoint(tmp_path_factory) -> tuple[str, Path, Path]:
    """``(model_name, model_config_path, checkpoint_path)`` of a tiny random OpenCLIP model (safetensors).

    Use it as ``embed.backend=open_clip`` with ``embed.kwargs = {model: <name>, model_config: <path>,
    pretrained: <checkpoint>}``.
    """
    return write_tiny_openclip(tmp_path_factory.mktemp("tiny_openclip"))


def write_signals_project(root, n_train=300, n_test=60, n_classes=4, dim=16, noise=0.2,
                          clean_known=True, seed=0, pred_clean=True, interleave=False) -> Paths:
    """Fabricate the ingest/embed/perceive artifacts that analyze and optimize read.

    Train rows carry planted label noise (``label_clean`` keeps the truth when ``clean_known``);
    noisy rows get high ``loss_early``; out-of-fold probabilities mostly predict the clean label;
    ``interleave`` mixes train and test rows so that row-mapping bugs show.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    split = (np.where(rng.permutation(n) < n_train, "train", "test") if interleave
             else np.array(["train"] * n_train + ["test"] * n_test))
    clean = rng.integers(0, n_classes, n)
    label = clean.copy()
    flip = (rng.random(n) < noise) & (split == "train")
    label[flip] = (clean[flip] + rng.integers(1, n_classes, flip.sum())) % n_classes
    ids = np.arange(n, dtype=np.int64) * 7 + 1000
    samples = {
        "sample_id": ids, "split": split, "label": label, "label_name": [f"c{c}" for c in label],
        "label_clean": [int(c) for c in clean] if clean_known else [None] * n,
        "source": [f"img/{i}.png" for i in range(n)], "source_id": [""] * n,
        "orig_height": np.full(n, 8), "orig_width": np.full(n, 8), "orig_mode": ["RGB"] * n,
        "note": [""] * n, "content_hash": [f"h{i}" for i in range(n)], "duplicate_of": [None] * n,
        "batch": ["reference"] * n,
    }
    paths = Paths.at(root)
    write_parquet(paths.stage("ingest") / "samples.parquet", arrow_table(SAMPLES_COLUMNS, samples))
    centres = rng.normal(size=(n_classes, dim))
    z = centres[clean] + 0.6 * rng.normal(size=(n, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    save_npy(paths.stage("embed") / "embeddings.npy", z.astype(np.float16))
    tr = split == "train"
    is_noisy = (label != clean)[tr]
    m = int(tr.sum())
    loss = np.where(is_noisy, np.clip(rng.normal(2.4, 0.5, m), 0.05, None), rng.gamma(1.5, 0.15, m))
    # out-of-fold probabilities that mostly predict the clean label (a good proxy)
    logits = rng.normal(0, 0.5, (m, n_classes))
    logits[np.arange(m), clean[tr]] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = clean[tr] if pred_clean else probs.argmax(1)
    signals = pd.DataFrame({
        "sample_id": ids[tr], "label": label[tr], "loss_early": loss,
        "loss_last": loss * 0.5, "pred_label": pred,
        "class_center_distance": rng.random(m), "el2n": rng.random(m),
    })
    write_parquet(paths.stage("perceive") / "signals.parquet", signals)
    save_npz(paths.stage("perceive") / "dynamics.npz", sample_id=ids[tr], probs=probs.astype(np.float32))
    zt = z[tr].astype(np.float16).astype(np.float32)
    dist, ind = NearestNeighbors(n_neighbors=6).fit(zt).kneighbors(zt)
    save_npz(paths.stage("embed") / "knn.npz", sample_id=ids[tr], indices=ind[:, 1:],
             distances=dist[:, 1:].astype(np.float32))
    return paths


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run faster on one torch thread, much faster when the CPU is shared; restored
    after the module (use: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def map_interrupted_after_two(fn, specs):
    """A ``map_shards`` for the embed stage whose run dies (KeyboardInterrupt) after two shards."""
    for spec in specs[:2]:
        fn(spec)
    raise KeyboardInterrupt


def map_fresh_workers(fn, specs):
    """A ``map_shards`` that runs each shard as a remote worker would: a pickled function and spec,
    no model in memory (the fitted state comes from the shard folder on disk)."""
    import pickle

    from dataopt.embed.run import forget

    out = []
    for spec in specs:
        forget()
        out.append(pickle.loads(pickle.dumps(fn))(pickle.loads(pickle.dumps(spec))))
    return out


def identity_plan(samples: pd.DataFrame, keep: np.ndarray | None = None) -> pd.DataFrame:
    """A plan over the train rows of ``samples`` that changes nothing but ``keep`` (all by default)."""
    tr = samples[samples["split"] == "train"]
    n = len(tr)
    return pd.DataFrame({
        "sample_id": tr["sample_id"].to_numpy(), "keep": np.ones(n, bool) if keep is None else keep,
        "weight": np.ones(n), "sampling_weight": np.ones(n), "augment_magnitude": np.zeros(n),
        "new_label": tr["label"].to_numpy(), "reason": np.full(n, "test"),
    })


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The API URL of one Prefect server on 127.0.0.1 for the whole session (what `dataopt server start`
    runs). Without a server every `dataopt run` starts and stops a temporary API, ~8 s on 2 cores; the
    end-to-end tests share this one instead. test_reliability keeps the temporary API, whose crash
    cleanness it tests."""
    import os
    import signal
    import socket
    import sys

    from dataopt.cli_service import _start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-server")
    (home / ".dataopt").mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    url = f"http://127.0.0.1:{port}"
    # what `dataopt server start` runs, started and awaited by the same helper
    pid = _start("prefect", [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], url + "/api/health", home, env)
    url += "/api"
    yield url
    os.killpg(pid, signal.SIGTERM)  # the server and its workers (_start made it a session leader)


@pytest.fixture
def shared_prefect(prefect_server, monkeypatch) -> str:
    """This test's flows (and the subprocesses it starts) use the session's Prefect server."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    return prefect_server
