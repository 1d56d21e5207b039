#!/usr/bin/env bash
# `make demo`: the whole Sieve flow on generated data, on a laptop, offline.
# Each step is the same CLI a user runs by hand; reruns reuse what is already built.
set -euo pipefail
DEMO=${DEMO:-demo}
PY=${PY:-.venv/bin/python}
mkdir -p "$DEMO"

step() { printf '\n== %s\n' "$*"; }

step "1/1 generate sample shards (img2dataset webdataset format)"
[ -f "$DEMO/shards/00001_stats.json" ] || \
  $PY -m pipelines.sample --out "$DEMO/shards" --n 2000 --shard-size 1000 --corrupt-fraction 0.02

step "built"
echo "  shards:      $DEMO/shards   ($(ls "$DEMO"/shards/*.tar | wc -l) tar shards)"
