#!/usr/bin/env bash
# One command for a machine with a GPU: set up what it needs, run the kernel tests compiled (not
# interpreted), bench.kernels, bench.memory and bench.train_throughput, and append every result
# with the device named to bench/RESULTS.md (and copy that section to the output folder).
#
#   bench/gpu_check.sh                   on the GPU machine (its python3: 3.12, CUDA torch, triton)
#   bench/gpu_check.sh --device cpu      here, at toy sizes, kernel tests interpreted (a test runs it)
#
# Options: --device cuda|cpu   --out DIR (default: $OUT when set, else bench/gpu-check-<time>)
#          --results FILE (default bench/RESULTS.md)   --pytest-args "ARGS" (default "tests/kernels")
#
# Setup. The repository root is the `ithaca` package and `pip install -e .` wants Python 3.11, so a
# link /tmp/ithaca-src/ithaca -> this checkout goes on PYTHONPATH. What the GPU image lacks
# (megatron-core, webdataset, braceexpand; the benchmark peers liger-kernel, cut-cross-entropy,
# fla) travels as wheels in .whl/ (bench/gpu_wheels.sh fetches them here; carry `.whl` with the
# run). A peer that is missing is reported as skipped by bench.kernels; flash-attn cannot be built
# in a lease (see ../shared/notes/gpu-machine.md), so our Triton kernels stand in its place.
# Every step runs even if an earlier one fails; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
RESULTS=bench/RESULTS.md
OUT_DIR=${OUT:-bench/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
PYTEST_ARGS="tests/kernels"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    --pytest-args) PYTEST_ARGS=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown option $1 (see the comment at the top of bench/gpu_check.sh)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
if [ -z "${PYTHON:-}" ]; then  # the lent GPU machine's python3; here, the project's .venv
  PYTHON=python3
  [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
"$PYTHON" -c "import torch, triton" || { echo "gpu_check.sh: $PYTHON cannot import torch and triton; set PYTHON" >&2; exit 2; }
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: torch sees no CUDA device here; run it on the GPU machine, or --device cpu" >&2; exit 2
fi
mkdir -p "$OUT_DIR"

# --- setup -------------------------------------------------------------------------------------
mkdir -p /tmp/ithaca-src
ln -sfn "$PWD" /tmp/ithaca-src/ithaca
export PYTHONPATH="/tmp/ithaca-src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# Never the checkout root on sys.path (`-m` would put it first): its kernels/, data/, models/ are
# names other packages use (transformers imports a `kernels`); ithaca comes from /tmp/ithaca-src.
export PYTHONSAFEPATH=1
export PYTHONUNBUFFERED=1  # (the kernel tests set ITHACA_POISON themselves; benchmarks must not)
unset ITHACA_POISON
if [ "$DEVICE" = cuda ]; then
  unset TRITON_INTERPRET  # compiled kernels: the point of this run
  export DS_ACCELERATOR=cuda
  WHERE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")
  MEMORY_ARGS=""
else
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
  WHERE="CPU ($(nproc) cores), toy sizes"
  MEMORY_ARGS="--lengths 512 1024 2048 --tokens 1024 --vocab 4096 --dim 64 --layer-seq 1024 --layer-dim 128"
fi
VERSIONS=$("$PYTHON" -c "import sys, torch, triton; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}')")
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
STAMP=$(date -u +%Y-%m-%d)

# --- steps -------------------------------------------------------------------------------------
FAILED=0
SECTION="$OUT_DIR/RESULTS-section.md"
{
  echo
  echo "## gpu_check on $WHERE ($STAMP, commit $COMMIT)"
  echo
  echo "Command: \`bench/gpu_check.sh --device $DEVICE\`; $VERSIONS."
} > "$SECTION"

step() {  # step NAME TIMEOUT COMMAND...: run, keep its output, record it in the section
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
  local code=$?
  tail -n 40 "$OUT_DIR/$name.txt"
  {
    echo
    echo "### $name ($((SECONDS - started)) s, exit $code)"
    echo
    echo "\`$*\`"
    echo
    if [ "$name" = kernel-tests ]; then
      echo '```'; tail -n 25 "$OUT_DIR/$name.txt"; echo '```'
    elif [ $code -eq 0 ]; then
      grep -E '^(#|\||\(|$)' "$OUT_DIR/$name.txt" | grep -v '^$' | sed 's/^(\(.*\)$/\n(\1\n/'
    else
      echo '```'; tail -n 30 "$OUT_DIR/$name.txt"; echo '```'
    fi
  } >> "$SECTION"
  [ $code -eq 0 ] || FAILED=1
}

# shellcheck disable=SC2086  # PYTEST_ARGS and MEMORY_ARGS are word lists on purpose
step kernel-tests 1500 "$PYTHON" -m pytest -q -p no:cacheprovider $PYTEST_ARGS
step bench-kernels 1500 "$PYTHON" -m ithaca.bench.kernels --device "$DEVICE"
# shellcheck disable=SC2086
step bench-memory 900 "$PYTHON" -m ithaca.bench.memory --device "$DEVICE" $MEMORY_ARGS
step bench-train-throughput 1200 "$PYTHON" -m ithaca.bench.train_throughput --device "$DEVICE"

cat "$SECTION" >> "$RESULTS"
echo "appended $(wc -l < "$SECTION") lines to $RESULTS; outputs in $OUT_DIR"
exit $FAILED
