#!/usr/bin/env bash
# Overhead of --engine ray against --engine local: whole-process wall time, 3 alternating runs each.
# Tiny random CLIP and 2,000 512x512 JPEGs from .bench/ (made by `benchmarks/bench.py --prepare`), --no-cache.
set -u
cd "$(dirname "$0")/.."
MODEL=${MODEL:-.bench/tiny-clip}
IMAGES=${IMAGES:-.bench/img512-2000}
for i in 1 2 3; do
  for eng in local ray; do
    s=$(date +%s.%N)
    .venv/bin/pickrank score -p "a photo" --model "$MODEL" --no-cache --engine $eng -q \
        -f jsonl -o "/tmp/pickrank-$eng.jsonl" "$IMAGES" 2>/dev/null
    rc=$?
    e=$(date +%s.%N)
    echo "$eng run$i rc=$rc wall=$(echo "$e - $s" | bc)"
    sleep 5  # let Ray's teardown finish before the next run
  done
done
