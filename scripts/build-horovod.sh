#!/usr/bin/env bash
# Build (once per flavour) and install Horovod 0.28.1 against the venv's MXNet.
#   MXNET_BUILD=cpu (default): Gloo only, no MPI, no GPU operations.
#   MXNET_BUILD=gpu: allreduce/broadcast/allgather on the GPU through NCCL (HOROVOD_GPU_OPERATIONS=NCCL),
#                    Gloo for the control plane, MPI too when an MPI compiler (mpicxx) is on PATH.
#                    Needs the CUDA toolkit (nvcc) and NCCL (HOROVOD_NCCL_HOME, or in the CUDA paths).
# Horovod must see MXNet at build time, so it is built without build isolation after `uv sync`.
# The wheel is relocatable and is cached outside the work tree, keyed by flavour (and CUDA version):
#   $CACHE/horovod-0.28.1/cpu/horovod-0.28.1-*.whl
#   $CACHE/horovod-0.28.1/gpu-cuda<X.Y>/horovod-0.28.1-*.whl
# each beside a <wheel>.sha256 record written when it was built; a wheel whose digest no longer matches
# its record is thrown away and rebuilt, never installed. A CPU wheel is never reused for a GPU install.
# Supply chain: the Horovod sdist, the build tools and (when the system has none) cmake are installed only
# with --require-hashes from scripts/requirements/{horovod,build-tools,cmake}.txt.
# Migration: a wheel cached by older versions of this script directly in $CACHE (Gloo-only, the only
# thing they built) becomes the cpu flavour's wheel, its digest recorded on the way.
set -euo pipefail
HOROVOD_VERSION=0.28.1
VENV=${VENV:-.venv}
MXNET_BUILD=${MXNET_BUILD:-cpu}
CACHE=${RN50_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rn50-pipeline/wheels}
PY="$VENV/bin/python"
REQ="$(cd "$(dirname "$0")" && pwd)/requirements"

case "$MXNET_BUILD" in
  cpu)
    FLAVOUR=cpu
    CHECK="hvd.gloo_built()"
    WHAT="Gloo"
    ;;
  gpu)
    if ! command -v nvcc >/dev/null 2>&1; then
      echo "MXNET_BUILD=gpu: Horovod's NCCL operations need the CUDA toolkit, and nvcc is not on PATH" >&2
      exit 2
    fi
    CUDA_VERSION=$(nvcc --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p' | head -1)
    if [ -z "$CUDA_VERSION" ]; then echo "MXNET_BUILD=gpu: cannot read the CUDA version from nvcc --version" >&2; exit 2; fi
    FLAVOUR="gpu-cuda$CUDA_VERSION"
    CHECK="hvd.nccl_built() and hvd.gloo_built()"
    WHAT="NCCL + Gloo (CUDA $CUDA_VERSION)"
    ;;
  *) echo "MXNET_BUILD must be cpu or gpu, not '$MXNET_BUILD'" >&2; exit 2;;
esac

# Already installed with the right operations: nothing to do.
if "$PY" -c "import horovod.mxnet as hvd, sys; sys.exit(0 if ($CHECK) else 1)" 2>/dev/null; then exit 0; fi

DIR="$CACHE/horovod-$HOROVOD_VERSION/$FLAVOUR"
mkdir -p "$DIR"

sha256() { "$PY" -c 'import hashlib, sys; h = hashlib.sha256(); f = open(sys.argv[1], "rb"); [h.update(b) for b in iter(lambda: f.read(1 << 20), b"")]; print(h.hexdigest())' "$1"; }

# One-time migration of the flat layout (cpu only: the old script built nothing else).
if [ "$FLAVOUR" = cpu ]; then
  for legacy in "$CACHE"/horovod-"$HOROVOD_VERSION"-*.whl; do
    [ -f "$legacy" ] || continue
    name=$(basename "$legacy")
    if [ ! -f "$DIR/$name" ]; then
      mv "$legacy" "$DIR/$name"
      echo "$(sha256 "$DIR/$name")  $name" > "$DIR/$name.sha256"
      echo "moved the cached Gloo-only wheel to $DIR/$name (digest recorded)"
    else
      rm -f "$legacy"
    fi
  done
fi

wheel=""
for candidate in "$DIR"/horovod-"$HOROVOD_VERSION"-*.whl; do
  [ -f "$candidate" ] || continue
  record="$candidate.sha256"
  if [ -f "$record" ] && [ "$(cut -d' ' -f1 "$record")" = "$(sha256 "$candidate")" ]; then
    wheel=$candidate
    break
  fi
  echo "cached $candidate does not match its recorded sha256 (or has no record): discarding it" >&2
  rm -f "$candidate" "$record"
done

check_installed() { "$PY" -c "import horovod.mxnet as hvd, sys; sys.exit(0 if ($CHECK) else 1)"; }

if [ -n "$wheel" ]; then
  # --no-deps: Horovod's runtime deps (cloudpickle, psutil, pyyaml) are already in the lock.
  # --reinstall: replaces a Horovod of the other flavour if one is installed.
  uv pip install --python "$PY" -q --no-deps --reinstall "$wheel"
  if check_installed; then echo "horovod $HOROVOD_VERSION ($FLAVOUR) installed from $wheel"; exit 0; fi
  echo "cached $wheel lacks $WHAT: discarding it and building" >&2
  rm -f "$wheel" "$wheel.sha256"
fi

echo "building horovod $HOROVOD_VERSION against MXNet + $WHAT (about 3 minutes on 2 cores; cached in $DIR)"
# A build needs cmake and a C++ compiler; cmake comes from PyPI when the system has none.
command -v cmake >/dev/null || uv pip install --python "$PY" -q --require-hashes --no-deps -r "$REQ/cmake.txt"
uv pip install --python "$PY" -q --require-hashes --no-deps -r "$REQ/build-tools.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
build_env=(-u HOROVOD_GPU_OPERATIONS -u HOROVOD_GPU_ALLREDUCE HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 MAKEFLAGS=-j"$(nproc)")
if [ "$FLAVOUR" = cpu ]; then
  build_env+=(HOROVOD_WITHOUT_MPI=1)
else
  build_env+=(HOROVOD_GPU_OPERATIONS=NCCL)
  if command -v mpicxx >/dev/null 2>&1; then build_env+=(HOROVOD_WITH_MPI=1); else build_env+=(HOROVOD_WITHOUT_MPI=1); fi
fi
# --no-cache-dir: pip's own wheel cache is keyed by the sdist, not by these variables; it would hand
# back a Gloo-only build for a GPU install.
env "${build_env[@]}" "$PY" -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps --require-hashes \
    -w "$tmp" -r "$REQ/horovod.txt"
built=$(ls "$tmp"/horovod-*.whl | head -1)
uv pip install --python "$PY" -q --no-deps --reinstall "$built"
if ! check_installed; then
  echo "horovod built for MXNET_BUILD=$MXNET_BUILD lacks $WHAT (is NCCL installed? set HOROVOD_NCCL_HOME); not cached" >&2
  exit 1
fi
# Only a wheel that passed the check is cached, and its digest record lands last.
name=$(basename "$built")
echo "$(sha256 "$built")  $name" > "$tmp/$name.sha256"
mv "$built" "$DIR/$name"
mv "$tmp/$name.sha256" "$DIR/$name.sha256"
echo "horovod $HOROVOD_VERSION ($FLAVOUR) built, cached in $DIR and installed"
