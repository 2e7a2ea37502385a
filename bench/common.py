"""Helpers shared by the benchmark scripts (run as ``python bench/<name>.py``, so this folder is on
``sys.path``)."""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and whose epilog is its
    ``Examples`` section, with ``--data`` defaulting to ``../shared/datasets/cifar10``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc[doc.index("Examples"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=CIFAR10,
                    help="CIFAR-10N folder (train.parquet, test.parquet)")
    return ap


def dynamics_file(directory: Path, label_column: str, seed: int) -> Path:
    """Where ``bench/noise.py --save-dynamics`` writes (and ``--from-dynamics`` / ``bench/selection.py
    --dynamics`` read) one run's out-of-fold dynamics."""
    return Path(directory) / f"{label_column}_s{seed}.npz"


DYNAMICS_FORMAT = 1  # of the files bench/noise.py --save-dynamics writes

# the command that writes bench/dynamics/ (git-ignored: the out-of-fold dynamics of the README's H100
# airbench run); bench/README.md documents it, and every reader of a missing file names it
REGENERATE_DYNAMICS = (
    "python bench/noise.py --n 0 --seeds 2 --label-columns random_label1 aggre_label --perceive-model airbench "
    "--width 64 --epochs 12 --folds 4 --augment flip_crop --label-smoothing 0.2 --batch-size 1024 --lr 1.5 "
    "--weight-decay 0.00133 --device cuda --save-dynamics bench/dynamics --skip-analysis"
)

# optimiser recipes of the benchmarks' evaluation networks: airbench94's, and the head's (the airbench
# learning rate makes a head on pixel-PCA features diverge)
RECIPES = {
    "airbench": {"batch_size": 1024, "lr": 1.5, "momentum": 0.85, "weight_decay": 0.00133, "label_smoothing": 0.2},
    "head": {"batch_size": 256, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.0},
}


def require_dynamics(path: Path) -> Path:
    """``path``, or an exit with one line naming the command that writes it when it is absent (scripts
    call it before their long parts, so a missing file stops them at once)."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} not found: bench/dynamics/ is not in git; regenerate it with "
                         f"{REGENERATE_DYNAMICS}")
    return path


def read_dynamics(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta (JSON) and the arrays of a ``bench/noise.py --save-dynamics`` file; a missing file or
    one of another format exits with one line naming it and the command that writes it."""
    path = require_dynamics(path)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != DYNAMICS_FORMAT:
        raise SystemExit(f"{path}: dynamics format {meta.get('format')} is not {DYNAMICS_FORMAT}; "
                         f"regenerate it with {REGENERATE_DYNAMICS}")
    return meta, arrays


DYN_FLOAT16 = ("loss", "margin", "logit_margin", "error_norm", "feature_norm", "center_distance")


def saved_dynamics(meta: dict, arrays: dict[str, np.ndarray]):
    """The :class:`dataopt.perceive.Dynamics` of a :func:`read_dynamics` file: ``DYN_FLOAT16`` arrays
    from their float16 planes, ``p_label`` as ``exp(-loss)``, only the epochs kept
    (``meta["dynamics_epochs"]``). Files saved before ``center_distance`` existed give it as NaN; any
    other missing array is a KeyError."""
    from dataopt.perceive.dynamics import Dynamics

    n, E = int(meta["n"]), len(meta["dynamics_epochs"])  # E < epochs_completed when thinned
    d = arrays
    dyn16 = {name: np.full((E, n), np.nan, np.float32) if name == "center_distance" and name not in d
             else unshuffle16(d[name], (E, n)) for name in DYN_FLOAT16}
    return Dynamics(sample_id=d["sample_id"].astype(np.int64), fold=d["fold"].astype(np.int64),
                    p_label=np.exp(-dyn16["loss"]), correct=np.unpackbits(d["correct"], axis=1, count=n).astype(bool),
                    probs=d["probs"], epochs_completed=E, epochs_per_fold=d["epochs_per_fold"], **dyn16)


def unshuffle16(planes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of ``shape`` from the float16 byte planes ``bench/noise.py`` stores."""
    return np.ascontiguousarray(planes.T).view(np.float16).reshape(shape).astype(np.float32)


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row positions of a class-stratified subset of ``n`` rows (all rows when n = 0)."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.floor(counts / counts.sum() * n).astype(int)
    take[: n - take.sum()] += 1
    rows = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(rows))


def decode_images(table) -> np.ndarray:
    """The ``image`` column (encoded bytes) of a CIFAR-10 parquet table as uint8 ``(n, H, W, 3)``."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])


def split_cifar_rows(sizes: dict[str, int], pool_test: int, seed: int, train_labels: np.ndarray,
                     test_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Disjoint stratified train row sets (``sizes``: name -> rows, in order) and ``pool_test`` test rows:
    the split bench/drift.py caches its embeddings under, which bench/stream.py reuses."""
    order = np.random.default_rng(seed).permutation(len(train_labels))
    out, start = {}, 0
    for name, n in sizes.items():
        # a stratified subset of a larger random block keeps the classes balanced in every set
        block = order[start:start + 2 * n]
        out[name] = block[stratified_subset(train_labels[block], n, seed)]
        start += 2 * n
    out["pool_test"] = stratified_subset(test_labels, pool_test, seed)
    return out


def write_digits_cifar(folder: Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """``folder/cifar10/{train,test}.parquet`` in the CIFAR-10 layout (``id``, ``image`` as 32x32 RGB
    JPEG bytes, ``label``, ``label_name``) made from scikit-learn's digits, which every install has:
    the stand-in of ``bench/gpu.sh --toy`` where ``../shared/datasets`` is absent. Returns ``folder``."""
    import pyarrow as pa
    from PIL import Image
    from sklearn.datasets import load_digits

    from dataopt.io import write_parquet

    d = load_digits()
    grey = np.round(d.images * (255 / 16)).astype(np.uint8)
    test = np.random.default_rng(seed).random(len(grey)) < test_fraction
    out = Path(folder) / "cifar10"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", np.flatnonzero(~test)), ("test", np.flatnonzero(test))):
        images = []
        for i in rows:
            buf = io.BytesIO()
            Image.fromarray(grey[i]).resize((32, 32), Image.NEAREST).convert("RGB").save(buf, "JPEG", quality=95)
            images.append(buf.getvalue())
        write_parquet(out / f"{name}.parquet", pa.table({
            "id": rows.astype(np.int32), "image": pa.array(images, pa.binary()),
            "label": d.target[rows].astype(np.int16), "label_name": [str(c) for c in d.target[rows]]}))
    return Path(folder)


# the CIFAR-10 stream of bench/stream.py (simulated loop) and bench/stream_flows.py (the real flows)
PRIOR_CLASSES = (2, 3, 4)  # bird, cat, deer at a third of their share
EXTRA_FLIPS = 0.20  # points of symmetric noise added to random_label1 in the second worse-label batch
# the stream, in order: (name, kind, argument); clean and corrupted batches come from the corrupted
# rows' pool, the others from the rest, so no row is in two batches
STREAM = [("clean_1", "clean", "rest"), ("clean_2", "clean", "rest"), ("noise_s3", "corrupt", "gaussian_noise_s3"),
          ("human_labels", "labels", 0.0), ("prior", "prior", None), ("contrast_s4", "corrupt", "contrast_s4"),
          ("clean_3", "clean", "corrupt_pool"), ("human+flips", "labels", EXTRA_FLIPS),
          ("blur_s3", "corrupt", "gaussian_blur_s3"), ("clean_4", "clean", "corrupt_pool")]
