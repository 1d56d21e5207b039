#!/usr/bin/env bash
# `make demo`: the whole Sieve flow on generated data, on a laptop, offline.
# Each step is the same command a user runs by hand; reruns reuse what is already built.
set -euo pipefail
DEMO=${DEMO:-demo}
PY=${PY:-.venv/bin/python}
mkdir -p "$DEMO"

started=$SECONDS
last=$SECONDS
step() {
  if [ "$last" != "$SECONDS" ] || [ "$started" != "$SECONDS" ]; then
    printf '   (%d s)\n' $((SECONDS - last))
  fi
  last=$SECONDS
  printf '\n== %s\n' "$*"
}

step "1/10 generate sample shards (img2dataset webdataset format)"
[ -f "$DEMO/shards/00001_stats.json" ] || \
  $PY -m pipelines.generate --out "$DEMO/shards" --n 2000 --shard-size 1000 --corrupt-fraction 0.02

step "2/10 the bundled models: sieve-tiny CLIP and the watermark detector (unpacked into the cache once)"
$PY -m models.train sieve-tiny --if-missing
$PY -m models.train watermark --if-missing

step "3/10 embed + score the shards into a collection (Dask; finished parts are skipped)"
$PY -m pipelines.embed "$DEMO/shards" "$DEMO/collection" --scores nsfw,watermark,toxicity

step "4/10 build the FAISS indices"
[ -f "$DEMO/collection/indices/image.json" ] || $PY -m indices.build "$DEMO/collection" --max-index-memory 100M

step "5/10 search"
$PY - "$DEMO/collection" <<'PYEOF'
import sys
from indices.search import Searcher
for row in Searcher(sys.argv[1]).query(text="a red circle", k=3):
    print(f"  {row['similarity']:.3f}  {row['key']}  {row['caption']}")
PYEOF

step "6/10 SQL over the collection's metadata (DuckDB)"
$PY -m curation.sql "$DEMO/collection" \
  "SELECT size, count(*) AS n, round(avg(clip_similarity), 3) AS mean_similarity FROM samples WHERE status = 'ok' GROUP BY size ORDER BY n DESC"

step "7/10 a subset spec: LAION's filters, no small shapes (a few pixels at 32x32); counts after each clause"
mkdir -p "$DEMO/collection/subsets"
[ -f "$DEMO/collection/subsets/demo.yaml" ] || cat > "$DEMO/collection/subsets/demo.yaml" <<'YAML'
name: demo
description: what the demo HDiT trains on - LAION's filters, medium and large shapes only
where: "size != 'small'"
filters: laion
YAML
$PY -m curation.subset "$DEMO/collection" demo --dry-run

step "8/10 export the subset as training shards (images by byte range, embeddings, manifest)"
$PY -m curation.export "$DEMO/collection" demo --out "$DEMO/export" --shard-size 1000

step "9/10 train a small HDiT on the export for 2 minutes, sample from it, audit the samples for copies of the collection"
[ -f "$DEMO/hdit/state.json" ] || \
  $PY -m hdit_train.train --data "$DEMO/export" --config hdit_train/configs/demo.yaml --out "$DEMO/hdit" --max-minutes 2
$PY -m hdit_train.sample --ckpt "$DEMO/hdit" --prompt "a red circle" --n 8 --steps 50 --sampler dpmpp_2m_sde --cfg 4 --sigma-max 20 \
  --out "$DEMO/hdit_grid.png" --audit "$DEMO/collection"

step "10/10 CLIP-guided generation and an edit (VQGAN-CLIP on the bundled sieve-vqgan, unpacked into the cache once)"
$PY -m models.train sieve-vqgan --if-missing
$PY -m hdit_train.guide --prompts "a red star:1|a blue star:-0.5" --generator vqgan --size 64 --steps 40 --cutn 8 \
  --seed 0 --out "$DEMO/guided.png"
[ -f "$DEMO/edit_me.png" ] || $PY - "$DEMO" <<'PYEOF'
import io, sys
from PIL import Image
from collection.shards import list_shards, read_shard
raw = next(s for s in read_shard(list_shards(sys.argv[1] + "/shards")[0]) if s.image)
Image.open(io.BytesIO(raw.image)).convert("RGB").save(sys.argv[1] + "/edit_me.png")
print(f"  editing training sample {raw.key}: {raw.caption!r}")
PYEOF
$PY -m hdit_train.guide --prompts "a yellow star" --init "$DEMO/edit_me.png" --init-weight 1 --generator vqgan \
  --size 64 --steps 30 --step-size 0.02 --cutn 8 --seed 0 --out "$DEMO/edited.png"

step "built in $((SECONDS - started)) s"
echo "  shards:      $DEMO/shards      ($(ls "$DEMO"/shards/*.tar | wc -l) tar shards)"
echo "  collection:  $DEMO/collection  (metadata/, img_emb/, text_emb/, _done/, indices/, subsets/)"
echo "  export:      $DEMO/export      (webdataset shards + manifest.json of subset 'demo')"
echo "  HDiT run:    $DEMO/hdit        (checkpoint.safetensors, loss.jsonl, samples/)"
echo "  samples:     $DEMO/hdit_grid.png  (memorisation audit: $DEMO/hdit_grid_audit/)"
echo "  guidance:    $DEMO/guided.png, $DEMO/edit_me.png -> $DEMO/edited.png"
echo "  serve it:    $PY -m indices.serve --collection demo=$DEMO/collection --port 1234"
echo "  explore it:  $(dirname "$PY")/streamlit run webui/app.py -- --collection $DEMO/collection   (then open http://localhost:8501)"
