#!/usr/bin/env bash
# One short check on an offline CUDA machine that has torch/torchvision/numpy/pandas/pyarrow but
# not the rest: installs the wheels carried in .whl/ into a scratch target, points SIEVE_CACHE at
# the carried .cache/sieve (sieve-tiny), runs tests/test_gpu.py, then bench/embed_gpu.py.
# Logs and results go to $OUT (default /tmp/sieve-gpu-out). Ends in about 7 minutes; the
# phases are capped at 260 s (tests) and 220 s (benchmark, which starts nothing new after 150 s).
#
#   bash scripts/gpu_check.sh            # needs .whl/ and .cache/sieve in the working tree
#   TESTS_K="embed_job or uint8" BENCH_ARGS="--models vitb32" bash scripts/gpu_check.sh   # a subset
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sieve-gpu-out}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export SIEVE_CACHE=${SIEVE_CACHE:-$PWD/.cache/sieve}
T0=$(date +%s)
stamp() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

{
  stamp "machine"
  nvidia-smi -L || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,mig.mode.current --format=csv || true
  echo "cores: $(nproc)  python: $($PY --version 2>&1)  cc: $(command -v cc || command -v gcc || echo none)"
  $PY -c 'import torch, torchvision, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "torchvision", torchvision.__version__, "numpy", numpy.__version__);
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  echo "SIEVE_CACHE=$SIEVE_CACHE"; ls -la "$SIEVE_CACHE"/sieve-tiny 2>&1 | head
  stamp "wheels -> $SITE"
  ls .whl/*.whl 2>/dev/null | sed 's|.*/||'
  if ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip --version >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || echo "WHEEL INSTALL FAILED"
  elif ls .whl/*.whl >/dev/null 2>&1; then  # no pip: these wheels have no .data, so unpacking installs them
    echo "no pip: unzipping the wheels"
    $PY -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" .whl/*.whl \
      || echo "WHEEL UNZIP FAILED"
  else
    echo "no .whl/ here: using what is installed"
  fi
} 2>&1 | tee "$OUT/env.txt"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib
import os, sysconfig
print("Python.h:", os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
for name in ("open_clip", "ftfy", "simplejpeg", "braceexpand", "dask", "distributed", "timm", "huggingface_hub",
             "triton", "natten", "faiss"):
    try:
        mod = importlib.import_module(name)
        print(f"import {name}: ok {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001
        print(f"import {name}: {type(exc).__name__}: {exc}")
EOF

stamp "tests/test_gpu.py" | tee "$OUT/gpu_tests.log"
timeout -k 10 260 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --timeout 150 ${TESTS_K:+-k "$TESTS_K"} \
  --durations=15 --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee -a "$OUT/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}

stamp "bench.embed_gpu" | tee "$OUT/bench.log"
rm -f bench/results/embed_gpu.json
timeout -k 10 ${BENCH_TIMEOUT:-220} $PY -m bench.embed_gpu --budget-s 150 ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}
cp bench/results/embed_gpu.json "$OUT/" 2>/dev/null || echo "no bench/results/embed_gpu.json" | tee -a "$OUT/bench.log"

stamp "done: tests rc=$TESTS_RC bench rc=$BENCH_RC" | tee -a "$OUT/gpu_tests.log"
exit $(( TESTS_RC != 0 ? TESTS_RC : BENCH_RC ))
