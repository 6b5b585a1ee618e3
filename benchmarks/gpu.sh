#!/usr/bin/env bash
# pickrank on a GPU (not part of the test suite): builds the PickScore-architecture model (random weights, same
# compute) and prints images per second for
#   case 1: one prompt over 16 JPEGs of 1024x1024, whole process (load included): baseline fp32 once, pickrank
#           fp32 once, then fp16 and bf16;
#   case 3: N_SMALL and N_LARGE JPEGs of 512x512 with the PickScore architecture (the model matters on a GPU),
#           whole-process and start-up-free (marginal) rates, per dtype; plus the tiny model vs the decode loop.
# Needs a CUDA build of torch in the venv; no network. Usage:
#   benchmarks/gpu.sh                       # defaults: DEVICE=cuda DTYPES="fp16 bf16" N_SMALL=2000 N_LARGE=8000
#   DEVICE=cpu DTYPES= CASES=3 N_SMALL=2 N_LARGE=4 benchmarks/gpu.sh   # smoke test of the script on a CPU
#   CASES=serve benchmarks/gpu.sh           # the reward server (benchmarks/serve_bench.py) on the GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PICKRANK=${PICKRANK:-$(dirname "$PY")/pickrank}
DEVICE=${DEVICE:-cuda}
DTYPES=${DTYPES-"fp16 bf16"}   # fp32 is always run once as well
N_SMALL=${N_SMALL:-2000}
N_LARGE=${N_LARGE:-8000}
N1024=${N1024:-16}
CASES=${CASES:-"1 3"}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
unset PICKRANK_CACHE PICKRANK_MODEL
OUT=.bench/gpu
mkdir -p "$OUT"

# Models and images (reused from .bench/ when present).
read -r MODEL TINY IMG1024 SET_SMALL SET_LARGE < <("$PY" - "$N1024" "$N_SMALL" "$N_LARGE" <<'EOF'
import contextlib, sys
sys.path.insert(0, "benchmarks")
import bench
n1024, small, large = map(int, sys.argv[1:])
with contextlib.redirect_stdout(sys.stderr):  # progress messages; stdout carries the paths only
    paths = [bench.ensure_model("pickscore-arch"), bench.ensure_model("tiny-clip"), bench.image_folder(1024, n1024),
             bench.image_folder(512, small), bench.image_folder(512, large)]
print(*paths)
EOF
)
"$PY" -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
nproc | xargs echo "CPU cores:"

# run LABEL N CMD...: time one whole process, print seconds and images/s; the time goes to $OUT/last.
run() {
  local label=$1 n=$2; shift 2
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>"$OUT/stderr.txt" || { echo "FAILED: $label"; tail -5 "$OUT/stderr.txt"; exit 1; }
  t1=$(date +%s.%N)
  awk -v l="$label" -v n="$n" -v a="$t0" -v b="$t1" \
    'BEGIN { printf "  %-52s %6d images %8.2f s %8.1f images/s\n", l, n, b - a, n / (b - a) }'
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }' >"$OUT/last"
}
marginal() {  # LABEL T_SMALL T_LARGE: start-up-free rate between the two set sizes
  awk -v l="$1" -v s="$2" -v t="$3" -v ns="$N_SMALL" -v nl="$N_LARGE" \
    'BEGIN { printf "  %-52s (%d - %d) / (%.2f - %.2f s) = %.1f images/s\n", l " marginal", nl, ns, t, s, (nl - ns) / (t - s) }'
}
score() {  # DTYPE MODEL PATH OUTFILE [extra]
  local dt=$1 model=$2 path=$3 out=$4; shift 4
  "$PICKRANK" score --prompt "a photo of a red cat" --model "$model" --device "$DEVICE" --dtype "$dt" --no-cache \
    -q -f jsonl -o "$out" "$@" "$path"
}

if [[ " $CASES " == *" 1 "* ]]; then
echo "== case 1: one prompt, $N1024 JPEGs of 1024x1024, PickScore architecture, $DEVICE (whole process)"
mapfile -t IMGS < <(ls "$IMG1024"/*.jpg)
run "warm-up run (fills the page cache; ignore)" "$N1024" score fp32 "$MODEL" "$IMG1024" "$OUT/c1-warm.jsonl"
run "baseline reference.py fp32" "$N1024" "$PY" benchmarks/reference.py --device "$DEVICE" \
  --prompt "a photo of a red cat" "$MODEL" "${IMGS[@]}" -o "$OUT/c1-base.jsonl"
for dt in fp32 $DTYPES; do
  run "pickrank $dt" "$N1024" score "$dt" "$MODEL" "$IMG1024" "$OUT/c1-$dt.jsonl"
done

fi

if [[ " $CASES " == *" 3 "* ]]; then
echo "== case 3: 512x512 JPEGs, PickScore architecture, $DEVICE, default workers"
for dt in fp32 $DTYPES; do
  run "pickrank $dt" "$N_SMALL" score "$dt" "$MODEL" "$SET_SMALL" "$OUT/c3-$dt-s.jsonl"; ts=$(cat "$OUT/last")
  run "pickrank $dt" "$N_LARGE" score "$dt" "$MODEL" "$SET_LARGE" "$OUT/c3-$dt-l.jsonl"; tl=$(cat "$OUT/last")
  marginal "pickrank $dt" "$ts" "$tl"
done
echo "== case 3 (decode-bound): tiny model vs the single-process decode loop"
run "pickrank tiny fp32" "$N_LARGE" score fp32 "$TINY" "$SET_LARGE" "$OUT/c3-tiny.jsonl"
run "decode loop (1 process)" "$N_LARGE" "$PY" benchmarks/decode_loop.py "$TINY" "$SET_LARGE"
fi

if [[ " $CASES " == *" serve "* ]]; then
echo "== serve: 32 clients x 4 images of 512x512 against pickrank serve, PickScore architecture, $DEVICE"
"$PY" benchmarks/serve_bench.py --model "$MODEL" --device "$DEVICE" --clients "${SERVE_CLIENTS:-32}" \
  --images "${SERVE_IMAGES:-4}" --rounds "${SERVE_ROUNDS:-5}" --max-batch "${SERVE_MAX_BATCH:-64}" \
  --json "$OUT/serve.json"
fi
