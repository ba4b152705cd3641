#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 against the venv's MXNet, with Gloo and without MPI.
# Horovod must see MXNet at build time, so it is built without build isolation after `uv sync`.
# The wheel is relocatable and is cached outside the work tree: a second install does not rebuild.
set -euo pipefail
HOROVOD_VERSION=0.28.1
VENV=${VENV:-.venv}
CACHE=${RN50_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rn50-pipeline/wheels}
PY="$VENV/bin/python"

if "$PY" -c "import horovod.mxnet" 2>/dev/null; then exit 0; fi
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building horovod $HOROVOD_VERSION against MXNet + Gloo (about 3 minutes on 2 cores; cached in $CACHE)"
  # A build needs cmake and a C++ compiler; cmake comes from PyPI when the system has none.
  command -v cmake >/dev/null || uv pip install --python "$PY" -q cmake
  uv pip install --python "$PY" -q pip setuptools wheel packaging
  tmp=$(mktemp -d)
  HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 MAKEFLAGS=-j"$(nproc)" \
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$tmp" "horovod==$HOROVOD_VERSION"
  mv "$tmp"/horovod-*.whl "$CACHE"/
  rm -rf "$tmp"
  wheel=$(ls "$CACHE"/horovod-$HOROVOD_VERSION-*.whl | head -1)
fi
# --no-deps: Horovod's runtime deps (cloudpickle, psutil, pyyaml) are already in the lock.
uv pip install --python "$PY" -q --no-deps "$wheel"
"$PY" -c "import horovod.mxnet as hvd; assert hvd.gloo_built(), 'horovod built without gloo'"
echo "horovod $HOROVOD_VERSION installed from $wheel"
