#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels bench/gpu_check.sh installs on the lent GPU
# machine (Python 3.12, no index there): what its image lacks for our code (megatron-core,
# webdataset, braceexpand) and the benchmark peers (liger-kernel, cut-cross-entropy, fla). They go
# to .whl/ (git-ignored); name `.whl` in the device run's carry. About 5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p .whl
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 fla-core==0.6.0 flash-linear-attention==0.6.0
ls -l .whl
