#!/usr/bin/env bash
# On the GPU machine: installs the carried wheels of .whl/ into /tmp/site (see fetch_gpu_wheels.sh).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
