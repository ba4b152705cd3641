#!/bin/sh
# Container entrypoint: export the runtime profile baked in at build time, then either start the
# node's sshd (`rn50-entrypoint sshd [PORT]`, what infra/start-node.sh runs on every host) or exec
# the given command. Ranks started over ssh get the same variables from horovodrun (tasks/train.py).
set -e
if [ -f /etc/rn50/runtime.env ]; then
    set -a
    . /etc/rn50/runtime.env
    set +a
fi
if [ "$1" = "sshd" ]; then
    port=${2:-${RN50_SSH_PORT:-12345}}
    exec /usr/sbin/sshd -D -e -f /etc/rn50/sshd_config -p "$port"
fi
exec "$@"
