#!/usr/bin/env bash
# Downloads the wheels the GPU image lacks (grain and its missing dependencies, tensorboardX)
# into .whl/ (git-ignored), for the device tool: name `.whl` in `carry` and start the command
# with `bash launch/install_gpu_wheels.sh && export PYTHONPATH=/tmp/site:$PWD`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl grain==0.2.18 array-record portpicker tensorboardX
ls -la .whl
