#!/usr/bin/env bash
# Install the project's Python environment into .venv from uv.lock, then Horovod (built once, cached).
#   MXNET_BUILD=cpu (default): the `mxnet` wheel — laptops, CI, CPU demo.
#   MXNET_BUILD=gpu: the `mxnet-cu110` wheel for a bare-metal CUDA 11 host. GPU clusters normally train
#                    inside the NGC MXNet container instead (infra/Dockerfile), which brings its own MXNet.
set -euo pipefail
cd "$(dirname "$0")/.."
MXNET_BUILD=${MXNET_BUILD:-cpu}
case "$MXNET_BUILD" in cpu|gpu) ;; *) echo "MXNET_BUILD must be cpu or gpu, not '$MXNET_BUILD'" >&2; exit 2;; esac

if ! command -v uv >/dev/null 2>&1; then
  echo "installing uv (the resolver/installer this project uses) with pip, hash-checked"
  python3 -m pip install -q --user --require-hashes --no-deps -r scripts/requirements/uv.txt
  export PATH="$HOME/.local/bin:$PATH"
fi
# --frozen: exactly uv.lock, whose every distribution carries a sha256 that uv checks before installing.
# --inexact keeps Horovod, which is not in the lock because it must be built against the installed MXNet.
# Byte-compiled once here: the tests start many short Python processes, and some environments set
# PYTHONDONTWRITEBYTECODE, which would make each of them recompile pandas, Prefect and MXNet.
uv sync --frozen --inexact --compile-bytecode --extra "$MXNET_BUILD" --extra test
bash scripts/build-horovod.sh
