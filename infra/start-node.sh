#!/usr/bin/env bash
# Start the training container on THIS host with its sshd on PORT (what the seeds did by hand on
# every node: docker run --network=host ..., install sshd, PermitRootLogin, Port 12345).
# usage: RN50_SSH_LISTEN=<this host's cluster address> infra/start-node.sh IMAGE DATA_DIR [PORT] [AUTHORIZED_KEYS]
# Then list the host in the inventory with that address as `host:`, ssh_port: PORT and runtime: docker.
# RN50_SSH_LISTEN (required): the address sshd listens on (host network: never every NIC).
# RN50_HOSTKEY_DIR: where the node's sshd host key is kept across container restarts, so the key the
#   launcher pinned on first contact stays valid (default /var/lib/rn50-node/hostkeys).
# RN50_DOCKER_ARGS: extra `docker run` arguments, split on spaces (e.g. more -v mounts).
set -euo pipefail
image=${1:?image tag (from rn50 build)}; data=${2:?recordio dir on this host}; port=${3:-12345}
keys=${4:-$HOME/.ssh/authorized_keys}
listen=${RN50_SSH_LISTEN:?set RN50_SSH_LISTEN to this host\'s cluster address (the inventory\'s host:)}
hostkeys=${RN50_HOSTKEY_DIR:-/var/lib/rn50-node/hostkeys}
name=${RN50_CONTAINER:-rn50-node}
mkdir -p "$hostkeys" && chmod 700 "$hostkeys"
docker rm -f "$name" >/dev/null 2>&1 || true
gpus=()
# Unlimited locked memory is for NCCL/InfiniBand pinned buffers: GPU hosts only (a CPU host does not
# need it, and one whose hard limit is lower refuses it unless dockerd has CAP_SYS_RESOURCE).
if command -v nvidia-smi >/dev/null 2>&1; then gpus=(--gpus all --ulimit memlock=-1); fi
read -r -a extra <<<"${RN50_DOCKER_ARGS:-}"
docker run -d --name "$name" "${gpus[@]}" \
    --network=host --ipc=host --uts=host --shm-size=1g \
    --ulimit stack=67108864 --security-opt seccomp=unconfined \
    -e RN50_SSH_LISTEN="$listen" \
    -v "$data":"$data":ro -v "$keys":/root/.ssh/authorized_keys:ro -v "$hostkeys":/etc/rn50/hostkeys \
    -v "${RN50_RUNS_DIR:-/tmp/rn50-runs}":"${RN50_RUNS_DIR:-/tmp/rn50-runs}" \
    "${extra[@]}" "$image" sshd "$port"
echo "started $name from $image; sshd on $listen port $port; host key: $(cat "$hostkeys/ssh_host_ed25519_key.pub" 2>/dev/null || echo "made on first start in $hostkeys")"
