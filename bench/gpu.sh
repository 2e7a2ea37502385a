#!/usr/bin/env bash
# The GPU measurements the README lacks, for a lent H100 (~10 minutes), each its own `timeout <cap>`
# run of a bench script (caps sum to 9.3 min), each writing <out>/<section>.json as it finishes:
#   clip       OpenCLIP ViT-B-32 images/s end to end (Parquet JPEG -> float16 .npy) vs model only, same run
#   knn        the 1M x 512 kNN graph (dataopt.embed.knn.knn_graph)
#   patches    the whitened_patches embedder on 50k CIFAR-10 images, and the head on its features
#   airbench   airbench on clean CIFAR-10, our recipe, then + fp16, + alternating flips, + the whitening
#              bias trained 3 epochs only (airbench94's items), each alone and all three
#   selection  density x consistency vs InfoBatch vs random at 30/50/70 % (clean and CIFAR-10N labels)
# <out>/gpu_summary.json lists each section's status (ok / timed out / failed, exit code, seconds),
# rewritten after every section; a section that fails or times out does not stop the others.
# The machine has no internet: CLIP runs with random weights (same compute; the JSON says so).
#
#   bash bench/gpu.sh                     # on the GPU machine (data: --data, GPU_BENCH_DATA, ../shared/datasets, ./shared/datasets)
#   bash bench/gpu.sh --toy               # every section at toy size on the CPU (GPU_TOY=1 too): the CI check
#   bash bench/gpu.sh --out DIR --data DIR  # results in DIR (default bench/results/gpu; GPU_BENCH_OUT too)
# PYTHON picks the interpreter (default: python); GPU_BENCH_CAP_S=N caps every section at N seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "bench/gpu.sh: error: $*" >&2; exit 2; }

toy=${GPU_TOY:-0}
data=${GPU_BENCH_DATA:-}
out=${GPU_BENCH_OUT:-bench/results/gpu}
py=${PYTHON:-python}
while (($#)); do
  case $1 in
    --toy) toy=1 ;;
    --data) (($# > 1)) || die "--data needs a folder"; data=$2; shift ;;
    --out) (($# > 1)) || die "--out needs a folder"; out=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (usage: bash bench/gpu.sh [--toy] [--data DIR] [--out DIR])" ;;
  esac
  shift
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# the data: a folder holding cifar10/{train,test}.parquet (the layout of ../shared/datasets)
has_cifar() { [[ -f $1/cifar10/train.parquet && -f $1/cifar10/test.parquet ]]; }
if [[ -n $data ]]; then
  has_cifar "$data" || die "no CIFAR-10 under '$data' (needs cifar10/train.parquet and cifar10/test.parquet)"
elif has_cifar ../shared/datasets; then
  data=../shared/datasets
elif has_cifar ./shared/datasets; then
  data=./shared/datasets
elif [[ $toy == 1 ]]; then  # the toy run checks code paths, so digits in the CIFAR layout do
  data=$tmp/digits
  "$py" -c 'import sys; sys.path.insert(0, "bench"); from common import write_digits_cifar; write_digits_cifar(sys.argv[1])' "$data"
else
  die "no CIFAR-10 at ../shared/datasets or ./shared/datasets; pass --data DIR (or GPU_BENCH_DATA=DIR) with cifar10/{train,test}.parquet"
fi
if [[ $toy != 1 ]]; then
  "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    || die "torch sees no CUDA GPU; 'bash bench/gpu.sh --toy' runs every section at toy size on the CPU"
fi
mkdir -p "$out"
summary=$out/gpu_summary.json
records=$tmp/sections.tsv
: >"$records"

# one section: its command under `timeout cap`, its output in <out>/<name>.log, its status in the summary
section() {
  local name=$1 cap=$2 rc status start seconds
  shift 2
  echo "== $name (cap ${cap} s)"
  start=$(date +%s%N)
  set +e
  timeout --kill-after=5 "$cap" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  seconds=$(( ($(date +%s%N) - start) / 1000000 ))e-3
  if ((rc == 124 || rc == 137)); then status="timed out"
  elif ((rc != 0)); then status=failed
  elif [[ ! -f $out/$name.json ]]; then status=failed rc=0  # exit 0 but nothing written
  else status=ok
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$cap" "$seconds" >>"$records"
  write_summary
  echo "== $name: $status (exit $rc, $(( ${seconds%e-3} / 1000 )) s)"
}

write_summary() {
  "$py" - "$records" "$summary" "$toy" "$data" <<'PY'
import datetime as dt, json, os, sys, tempfile
records, summary, toy, data = sys.argv[1:]
sections = {}
for line in open(records):
    name, status, rc, cap, seconds = line.rstrip("\n").split("\t")
    folder = os.path.dirname(summary) or "."
    sections[name] = {"status": status, "exit_code": int(rc), "cap_s": int(cap), "seconds": round(float(seconds), 1),
                      "json": f"{name}.json" if os.path.exists(os.path.join(folder, f"{name}.json")) else None,
                      "log": f"{name}.log"}
doc = {"script": "bench/gpu.sh", "mode": "toy (CPU, tiny sizes: a check of the code paths)" if toy == "1"
       else "gpu", "data": data, "written_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
       "sections": sections}
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(summary) or ".", suffix=".json.tmp")
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, summary)  # atomic: a reader sees the old summary or the new one
PY
}

train=$data/cifar10/train.parquet
if [[ $toy == 1 ]]; then
  # an OpenCLIP architecture small enough for the CPU (weights cannot be downloaded anyway)
  cat >"$tmp/dataopt-tiny-clip.json" <<'JSON'
{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
JSON
  note="bench/gpu.sh --toy: tiny sizes on the CPU, a check of the code path, not a measurement"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny work on shared cores: one thread each is fastest
  clip=(--device cpu --model dataopt-tiny-clip --model-config "$tmp/dataopt-tiny-clip.json" --clip-n 256 --batch-size 64)
  knn=(--device cpu --knn-n 8000 --knn-d 64)
  patches=(--device cpu --n 256 --n-patches 32 --fit-patches 5000 --epochs 1)
  small=(--device cpu --n 128 --n-test 64 --width 4 --batch-size 64 --lr 0.4 --seeds 1)
  airbench=("${small[@]}" --epochs 1)
  selection=("${small[@]}" --epochs 2 --proxy-epochs 1 --proxy-folds 2 --labels clean)
  caps=(60 60 60 60 60)
else
  note="bench/gpu.sh on a lent GPU; no internet there, so OpenCLIP runs with random weights (same compute)"
  clip=(--device cuda --clip-n 50000 --batch-size 1024)
  knn=(--device cuda --knn-n 1000000 --knn-d 512)
  patches=(--device cuda --n 50000)
  airbench=(--device cuda --seeds 2)
  selection=(--device cuda --seeds 2 --labels clean random_label1)
  caps=(75 90 85 120 190)  # seconds; 560 in all (H100 estimates from bench/results/dynamic_cuda*.json)
fi
if [[ -n ${GPU_BENCH_CAP_S:-} ]]; then  # one cap for every section (a quick look; the tests)
  caps=("$GPU_BENCH_CAP_S" "$GPU_BENCH_CAP_S" "$GPU_BENCH_CAP_S" "$GPU_BENCH_CAP_S" "$GPU_BENCH_CAP_S")
fi

section clip "${caps[0]}" "$py" bench/embed.py --skip-stage --skip-knn --parquet "$train" "${clip[@]}" \
  --json "$out/clip.json" --note "$note"
section knn "${caps[1]}" "$py" bench/embed.py --skip-stage --skip-clip "${knn[@]}" --json "$out/knn.json" --note "$note"
section patches "${caps[2]}" "$py" bench/patches.py --data "$data/cifar10" "${patches[@]}" --json "$out/patches.json"
section airbench "${caps[3]}" "$py" bench/dynamic.py --data "$data/cifar10" --parts timing --recipe-items \
  "${airbench[@]}" --out "$out/airbench.json"
section selection "${caps[4]}" "$py" bench/dynamic.py --data "$data/cifar10" --parts dynamic \
  --methods random infobatch density_consistency --budgets 0.3 0.5 0.7 "${selection[@]}" --out "$out/selection.json"

echo "wrote $summary"
"$py" -c 'import json, sys; s = json.load(open(sys.argv[1]))["sections"]; sys.exit(any(v["status"] != "ok" for v in s.values()))' "$summary"
