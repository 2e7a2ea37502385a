"""Benchmark of the embed stage: OpenCLIP throughput, the kNN graph, peak memory.

Measures, on the GPU when torch sees one (else the CPU), and writes one JSON file
``bench/results/embed_<machine>_<date>.json`` (atomically) plus a table on stdout:

(a) OpenCLIP ViT-B-32 (or --model, --model-config) with randomly initialised weights (no download):
    images per second end to end, from the JPEG bytes of a Parquet file to stored float16 vectors (read
    -> decode -> tensor -> resize to the model's input (224) -> normalise -> model -> float16 ->
    np.save), next to the model-only forward throughput on
    pre-made tensors already on the device, measured in the same run, and their ratio.
    GPU: batched nvjpeg decode (torchvision.io.decode_jpeg(list, device="cuda")), resize and normalise on
    the GPU in a producer thread on its own CUDA stream, bf16 autocast. CPU: the same steps on the CPU.
(b) kNN graph seconds (dataopt.embed.knn.knn_graph, k=10) for 50k x 512 synthetic unit vectors
    (exact) and 1M x 512 (on a GPU; on the CPU only with --big, where it takes the IVF path).
(c) Peak memory per phase (ru_maxrss is the process peak so far; torch.cuda.max_memory_allocated per
    phase), and the peak RSS (VmHWM, and ru_maxrss) of the ingest and embed stages (pixels backend) on
    a 50k CIFAR-10 project in a temporary folder, each stage run first, in its own subprocess.

Examples
--------
  python bench/embed.py                      # everything, CPU defaults (small CLIP run), ~3-5 min on 2 cores
  python bench/embed.py --device cuda        # GPU: 50k images end to end, 1M x 512 kNN
  python bench/embed.py --skip-stage --clip-n 256 --model-n 256
  python bench/embed.py --skip-clip --skip-stage --big    # kNN only, including 1M x 512 on the CPU (IVF)
  python bench/embed.py --skip-clip --skip-stage --knn-n 1000000 --json /tmp/knn.json   # one kNN case
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataopt.embed.knn import available_cores, knn_graph  # noqa: E402
from dataopt.io import save_npy, write_json  # noqa: E402

DEFAULT_PARQUET = ROOT.parent / "shared" / "datasets" / "cifar10" / "train.parquet"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (open_clip.OPENAI_DATASET_MEAN/STD)
STD = (0.26862954, 0.26130258, 0.27577711)
GB = 1024**3


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phase:
    """Times a phase and records its memory: process peak RSS after it, GPU peak allocated during it."""

    def __init__(self, name: str, device: torch.device, record: dict):
        self.name, self.device, self.record = name, device, record

    def __enter__(self) -> "Phase":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = rss_now_bytes()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        mem = {"seconds": round(time.perf_counter() - self.t0, 3),
               "rss_at_start_gb": round(self.rss_start / GB, 3),
               "ru_maxrss_after_gb": round(rss_peak_bytes() / GB, 3)}
        if self.device.type == "cuda":
            mem["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated(self.device) / GB, 3)
        self.record.setdefault("phases", {})[self.name] = mem


def machine_info(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import version  # not `import open_clip`: seconds of imports a kNN-only run skips

    import faiss

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "available_cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "torchvision": version("torchvision"), "open_clip": version("open_clip_torch"),
        "faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus(), "numpy": np.__version__,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "git_commit": commit,
    }


def machine_slug(info: dict[str, Any]) -> str:
    name = info["device_name"] if info["device"] == "cuda" else f"cpu{info['available_cores']}"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# ---------------------------------------------------------------------------------------------- (a) CLIP
def build_model(device: torch.device, name: str = "ViT-B-32", config: Optional[Path] = None):
    """OpenCLIP ``name`` with random weights; ``config``: an OpenCLIP model config JSON registered first
    (an architecture open_clip does not ship, e.g. the GPU script's tiny CPU check)."""
    import open_clip

    if config is not None:
        open_clip.add_model_config(config)
    # pretrained=None: random weights, no download; speed does not depend on the weights
    model = open_clip.create_model(name, pretrained=None)
    return model.eval().to(device)


def input_size(model) -> int:
    """Side of the square image the model's vision tower takes (224 for ViT-B-32)."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def forward(model, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # bf16 autocast on the GPU; float32 on the CPU (CPU bf16 is slower without AMX)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        z = model.encode_image(x)
    return F.normalize(z.float(), dim=-1).half()


def model_only(model, device: torch.device, n: int, batch: int) -> dict[str, Any]:
    """Images/s of the forward pass on pre-made (batch, 3, size, size) tensors already on the device."""
    size = input_size(model)
    x = torch.randn(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
    forward(model, x, device)  # warm-up: kernels, cudnn/cublas heuristics, allocator
    sync(device)
    steps = max(1, -(-n // batch))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = forward(model, x, device)
    sync(device)
    seconds = time.perf_counter() - t0
    assert out.shape[0] == batch
    return {"images": steps * batch, "seconds": round(seconds, 3),
            "images_per_s": round(steps * batch / seconds, 1)}


def preprocess(images: list[torch.Tensor], device: torch.device, mean: torch.Tensor, std: torch.Tensor,
               size: int = 224) -> torch.Tensor:
    """Decoded uint8 CHW images (same size) -> (b, 3, size, size) float normalised, on ``device``."""
    x = torch.stack(images).to(device, non_blocking=True).float().div_(255.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.sub_(mean).div_(std)


def decode(blobs: list[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecation notice (TorchCodec)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def end_to_end(model, device: torch.device, parquet: Path, n: int, batch: int, out_dir: Path) -> dict[str, Any]:
    """Images/s from Parquet JPEG bytes to a stored float16 (n, dim) .npy, decode overlapped with the model.

    A producer thread reads the Parquet batches, decodes (nvjpeg on the GPU, on its own stream), resizes
    and normalises; the main thread runs the model and copies float16 vectors to a host array.
    """
    size, dim = input_size(model), int(model.visual.output_dim)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    # warm-up of decode + model outside the timing (nvjpeg handles, kernels)
    warm = pq.ParquetFile(parquet).read_row_group(0, columns=["image"]).column("image").to_pylist()[:batch]
    forward(model, preprocess(decode(warm, device), device, mean, std, size), device)
    sync(device)

    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    q: queue.Queue = queue.Queue(maxsize=3)
    error: list[BaseException] = []

    def produce() -> None:
        try:
            done = 0
            pf = pq.ParquetFile(parquet)
            for rb in pf.iter_batches(batch_size=batch, columns=["image"]):
                blobs = rb.column(0).to_pylist()[: n - done]
                if not blobs:
                    break
                if stream is not None:
                    with torch.cuda.stream(stream):
                        x = preprocess(decode(blobs, device), device, mean, std, size)
                        ev = torch.cuda.Event()
                        ev.record(stream)
                    q.put((x, ev))
                else:
                    q.put((preprocess(decode(blobs, device), device, mean, std, size), None))
                done += len(blobs)
                if done >= n:
                    break
        except BaseException as e:  # surfaced in the main thread
            error.append(e)
        finally:
            q.put(None)

    t0 = time.perf_counter()
    vectors = np.empty((n, dim), dtype=np.float16)
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    pos = 0
    pending: list[tuple[int, torch.Tensor]] = []
    while (item := q.get()) is not None:
        x, ev = item
        if ev is not None:
            torch.cuda.current_stream(device).wait_event(ev)
            x.record_stream(torch.cuda.current_stream(device))
        z = forward(model, x, device)
        if device.type == "cuda":  # async device->host copy into pinned memory; collected below
            host = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
            host.copy_(z, non_blocking=True)
            pending.append((pos, host))
        else:
            vectors[pos : pos + len(z)] = z.numpy()
        pos += len(z)
    thread.join()
    if error:
        raise error[0]
    sync(device)
    for p, host in pending:
        vectors[p : p + len(host)] = host.numpy()
    save_npy(out_dir / "clip_embeddings.npy", vectors[:pos])
    seconds = time.perf_counter() - t0
    stored = np.load(out_dir / "clip_embeddings.npy", mmap_mode="r")
    assert stored.shape == (pos, dim) and stored.dtype == np.float16 and np.isfinite(stored).all()
    return {"images": pos, "seconds": round(seconds, 3), "images_per_s": round(pos / seconds, 1),
            "batch_size": batch, "decode": f"torchvision.io.decode_jpeg(list, device='{device.type}')",
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "input_size": size, "stored": f"float16 (n, {dim}) .npy"}


# ----------------------------------------------------------------------------------------------- (b) kNN
def knn_case(n: int, d: int, k: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Seconds of ``knn_graph`` on ``n x d`` synthetic unit vectors (clustered, like embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    x = centres[rng.integers(0, 1000, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16).astype(np.float32)  # what the stage searches: the stored float16 values
    idx, dist, info = knn_graph(x, k, use_gpu=device.type == "cuda")
    assert idx.shape == (n, k) and (idx != np.arange(n)[:, None]).all()
    return {"n": n, "d": d, "k": k, "seconds": info["seconds"], "backend": info["backend"],
            "index": info["index"], "info": info}


# -------------------------------------------------------------------------------------- (c) stage memory
CHILD = r"""
import json, resource, sys, time
from dataopt.config import validate
from dataopt.paths import Paths
from dataopt.stages import run_stage
stage, root, raw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t0 = time.perf_counter()
metrics = run_stage(stage, validate(raw), Paths.at(root))
# VmHWM is the peak RSS of this process image; ru_maxrss can carry the launching parent's peak
# (Linux keeps it across fork + exec), so it is reported but VmHWM is the stage's own number
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RESULT " + json.dumps({"metrics": metrics, "seconds": time.perf_counter() - t0,
      "peak_rss_gb": hwm_kb / 1024**2,
      "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))
"""


def run_child(stage: str, root: Path, raw: dict) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, stage, str(root), json.dumps(raw)], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["ru_maxrss_gb"] = round(res["ru_maxrss_gb"], 3)
    res["peak_rss_gb"] = round(res["peak_rss_gb"], 3)
    res["seconds"] = round(res["seconds"], 2)
    return res


def stage_memory(parquet: Path, n: int, workdir: Path) -> dict[str, Any]:
    """Peak RSS of ``ingest`` then ``embed`` (pixels backend, defaults) on ``n`` CIFAR images, each in
    its own subprocess (so each ru_maxrss is that stage's own peak)."""
    raw = {"ingest": {"source": "parquet", "path": str(parquet), "label_column": "label",
                      "limit": n, "test_fraction": 0.2},
           "embed": {"backend": "pixels", "device": "cpu"}}
    ingest = run_child("ingest", workdir, raw)
    embed = run_child("embed", workdir, raw)
    meta = json.loads((workdir / "artifacts" / "embed" / "meta.json").read_text())
    return {"n_images": meta["n"], "n_train": meta["n_train"], "backend": "pixels", "dim": meta["dim"],
            "ingest": ingest, "embed": embed, "embed_peak_rss_gb": embed["peak_rss_gb"],
            "embed_meta_seconds": meta["seconds"], "knn": meta.get("knn")}


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where CLIP and the kNN graph run (auto: cuda when torch sees a GPU)")
    p.add_argument("--parquet", type=Path, default=DEFAULT_PARQUET, help="Parquet file with an 'image' column of JPEG bytes")
    p.add_argument("--clip-n", type=int, help="images end to end (default 256 on the CPU, 50000 on a GPU)")
    p.add_argument("--model-n", type=int, help="images through the model-only pass (default: --clip-n)")
    p.add_argument("--batch-size", type=int, help="CLIP batch (default 64 on the CPU, 1024 on a GPU)")
    p.add_argument("--model", default="ViT-B-32", help="OpenCLIP architecture (random weights)")
    p.add_argument("--model-config", type=Path, help="OpenCLIP model config JSON naming --model (registered first)")
    p.add_argument("--knn-n", type=int, nargs="+",
                   help="rows of the kNN cases (default: 50000, plus 1000000 on a GPU or with --big)")
    p.add_argument("--knn-d", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--big", action="store_true", help="on the CPU also run 1M x d (IVF path; slow)")
    p.add_argument("--stage-n", type=int, default=50_000, help="images ingested for the embed-stage memory run")
    p.add_argument("--skip-clip", action="store_true")
    p.add_argument("--skip-knn", action="store_true")
    p.add_argument("--skip-stage", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of the JSON result")
    p.add_argument("--json", type=Path, help="the JSON result's path (instead of a name in --out)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'cores shared with other jobs')")
    return p.parse_args(argv)


def table(result: dict[str, Any]) -> str:
    rows = [("measure", "value")]
    c = result.get("clip")
    if c:
        dev = result["machine"]["device"]
        rows += [(f"{c['model']} end to end ({dev}, {c['end_to_end']['images']} img)", f"{c['end_to_end']['images_per_s']} img/s"),
                 (f"{c['model']} model only ({dev}, {c['model_only']['images']} img)", f"{c['model_only']['images_per_s']} img/s"),
                 ("end to end / model only", f"{c['ratio']:.2f}")]
    for case in result.get("knn", []):
        rows.append((f"kNN {case['n']:,} x {case['d']}, k={case['k']} ({case['backend']})", f"{case['seconds']:.2f} s"))
    for name, ph in result.get("phases", {}).items():
        extra = f", cuda {ph['cuda_max_allocated_gb']} GB" if "cuda_max_allocated_gb" in ph else ""
        rows.append((f"peak RSS after {name}", f"{ph['ru_maxrss_after_gb']} GB{extra}"))
    s = result.get("stage")
    if s:
        rows.append((f"embed stage peak RSS ({s['n_images']:,} images, pixels)", f"{s['embed_peak_rss_gb']} GB"))
        rows.append((f"ingest stage peak RSS ({s['n_images']:,} images)", f"{s['ingest']['peak_rss_gb']} GB"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no GPU")
    else:
        device = torch.device(args.device)
    gpu = device.type == "cuda"
    clip_n = args.clip_n or (50_000 if gpu else 256)
    model_n = args.model_n or clip_n
    batch = args.batch_size or (1024 if gpu else 64)
    started = dt.datetime.now(dt.timezone.utc)
    result: dict[str, Any] = {"benchmark": "embed", "started_utc": started.isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "note": args.note, "machine": machine_info(device)}

    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        tmp = Path(tmp)
        if not args.skip_stage:  # first, while this process is small (see CHILD on ru_maxrss)
            result["stage"] = stage_memory(args.parquet, args.stage_n, tmp / "stage_project")
        if not args.skip_clip:
            with Phase("clip_model_load", device, result):
                model = build_model(device, args.model, args.model_config)
            with Phase("clip_model_only", device, result):
                only = model_only(model, device, model_n, batch)
            with Phase("clip_end_to_end", device, result):
                e2e = end_to_end(model, device, args.parquet, clip_n, batch, tmp)
            result["clip"] = {"model": args.model, "weights": "random (pretrained=None: no download; the throughput does not depend on the weights)",
                              "model_only": only, "end_to_end": e2e,
                              "ratio": round(e2e["images_per_s"] / only["images_per_s"], 3)}
            del model
            if gpu:
                torch.cuda.empty_cache()
        if not args.skip_knn:
            result["knn"] = []
            cases = args.knn_n or [50_000] + ([1_000_000] if gpu or args.big else [])
            for n in cases:
                with Phase(f"knn_{n}", device, result):
                    case = knn_case(n, args.knn_d, args.k, device, args.seed)
                if not gpu and case["backend"].endswith("IVF"):
                    case["note"] = "CPU IVF (approximate) number, not exact"
                result["knn"].append(case)

    result["seconds_total"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    out = args.json or args.out / f"embed_{machine_slug(result['machine'])}_{started:%Y%m%d}.json"
    write_json(out, result)
    print(table(result))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
