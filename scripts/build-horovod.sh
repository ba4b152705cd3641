#!/usr/bin/env bash
# Build (once per flavour) and install Horovod 0.28.1 against the venv's MXNet.
#   MXNET_BUILD=cpu (default): Gloo only, no MPI, no GPU operations.
#   MXNET_BUILD=gpu: allreduce/broadcast/allgather on the GPU through NCCL (HOROVOD_GPU_OPERATIONS=NCCL),
#                    Gloo for the control plane, MPI too when an MPI compiler (mpicxx) is on PATH.
#                    Needs the CUDA toolkit (nvcc) and NCCL (HOROVOD_NCCL_HOME, or in the CUDA paths).
# Horovod must see MXNet at build time, so it is built without build isolation after `uv sync`.
# The sdist is patched before the build with scripts/patches/horovod-$HOROVOD_VERSION-*.patch (upstream
# bugs that crash our ranks; each patch says which).
# The wheel is relocatable and is cached outside the work tree, keyed by flavour (and CUDA version) and
# by the digest of the patches, so a wheel built without a patch (or with an older one) is never reused:
#   $CACHE/horovod-0.28.1/cpu-p<digest>/horovod-0.28.1-*.whl
#   $CACHE/horovod-0.28.1/gpu-cuda<X.Y>-p<digest>/horovod-0.28.1-*.whl
# each beside a <wheel>.sha256 record written when it was built; a wheel whose digest no longer matches
# its record is thrown away and rebuilt, never installed. A CPU wheel is never reused for a GPU install.
# The same key is stamped into the venv ($VENV/.horovod-build): an installed Horovod counts only with it.
# Supply chain: the Horovod sdist, the build tools and (when the system has none) cmake are installed only
# with --require-hashes from scripts/requirements/{horovod,build-tools,cmake}.txt.
# Wheels cached by older versions of this script (directly in $CACHE, or in the unpatched cpu/ and
# gpu-cuda<X.Y>/ directories) lack the patches: they are deleted, not reused.
set -euo pipefail
HOROVOD_VERSION=0.28.1
VENV=${VENV:-.venv}
MXNET_BUILD=${MXNET_BUILD:-cpu}
CACHE=${RN50_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rn50-pipeline/wheels}
PY="$VENV/bin/python"
REQ="$(cd "$(dirname "$0")" && pwd)/requirements"
PATCHES=("$(cd "$(dirname "$0")" && pwd)/patches/horovod-$HOROVOD_VERSION-"*.patch)
STAMP="$VENV/.horovod-build"

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

sha256() { "$PY" -c 'import hashlib, sys; h = hashlib.sha256(); f = open(sys.argv[1], "rb"); [h.update(b) for b in iter(lambda: f.read(1 << 20), b"")]; print(h.hexdigest())' "$1"; }

[ -f "${PATCHES[0]}" ] || { echo "no scripts/patches/horovod-$HOROVOD_VERSION-*.patch next to $0" >&2; exit 2; }
PATCH_DIGEST=$(for p in "${PATCHES[@]}"; do sha256 "$p"; done | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')
KEY="$FLAVOUR-p$PATCH_DIGEST"

# Already installed, from this build key, with the right operations: nothing to do.
if [ "$(cat "$STAMP" 2>/dev/null)" = "$KEY" ] \
   && "$PY" -c "import horovod.mxnet as hvd, sys; sys.exit(0 if ($CHECK) else 1)" 2>/dev/null; then exit 0; fi

DIR="$CACHE/horovod-$HOROVOD_VERSION/$KEY"
mkdir -p "$DIR"
# Unpatched wheels of older versions of this script: never installed again.
rm -f "$CACHE"/horovod-"$HOROVOD_VERSION"-*.whl
rm -rf "${CACHE:?}/horovod-$HOROVOD_VERSION/$FLAVOUR"

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
stamp() { echo "$KEY" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"; }

if [ -n "$wheel" ]; then
  # --no-deps: Horovod's runtime deps (cloudpickle, psutil, pyyaml) are already in the lock.
  # --reinstall: replaces a Horovod of the other flavour if one is installed.
  rm -f "$STAMP"
  uv pip install --python "$PY" -q --no-deps --reinstall "$wheel"
  if check_installed; then stamp; echo "horovod $HOROVOD_VERSION ($KEY) installed from $wheel"; exit 0; fi
  echo "cached $wheel lacks $WHAT: discarding it and building" >&2
  rm -f "$wheel" "$wheel.sha256"
fi

echo "building horovod $HOROVOD_VERSION ($KEY: ${#PATCHES[@]} patch(es)) against MXNet + $WHAT (about 3 minutes on 2 cores; cached in $DIR)"
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
# The hash-checked sdist, unpacked and patched; a patch that does not apply stops the build.
"$PY" -m pip download -q --no-cache-dir --no-deps --no-binary :all: --require-hashes -d "$tmp/sdist" \
    -r "$REQ/horovod.txt"
tar -xzf "$tmp"/sdist/horovod-"$HOROVOD_VERSION".tar.gz -C "$tmp"
src="$tmp/horovod-$HOROVOD_VERSION"
for p in "${PATCHES[@]}"; do patch -p1 --batch --forward --quiet -d "$src" < "$p"; done
# --no-cache-dir: pip's own wheel cache is keyed by the sdist, not by these variables or the patches; it
# would hand back a Gloo-only or unpatched build.
env "${build_env[@]}" "$PY" -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps -w "$tmp" "$src"
built=$(ls "$tmp"/horovod-*.whl | head -1)
rm -f "$STAMP"
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
stamp
echo "horovod $HOROVOD_VERSION ($KEY) built, cached in $DIR and installed"
