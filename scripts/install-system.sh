#!/usr/bin/env bash
# Debian packages the tests drive for real: a Docker engine, sshd for the two-host launch, debootstrap for a
# local base image (no registry is reachable), iproute2 for network namespaces, Chromium for the UI test,
# slurm-wlm + munge for the Slurm launcher tests (tests/slurm_cluster.py starts private daemons; no service is enabled),
# redis-server for the team lock test (tests/test_team_redis.py starts a private one; the PyPI wheel does not install here),
# gdb for the Horovod native test (tests/test_horovod_native.py holds a rank's thread at one instruction).
# Installs only what is missing; needs root (it is, on CI and the dev machines).
set -euo pipefail
pkgs=(docker.io docker-compose openssh-server openssh-client debootstrap iproute2 util-linux chromium chromium-driver procps psmisc slurm-wlm munge postgresql redis-server gdb)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "need root to apt-get install: ${missing[*]}" >&2; exit 1; fi
  echo "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
