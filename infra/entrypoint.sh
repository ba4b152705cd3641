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
    # sshd starts sessions with a bare environment: without this the image's ENV (PYTHONPATH=/opt/rn50,
    # the base image's PATH/LD_LIBRARY_PATH, e.g. NGC's mpirun and CUDA libs) and the profile above
    # would not reach horovodrun and the ranks it starts over ssh (sshd_config: PermitUserEnvironment).
    { env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' | grep -vE '^(HOME|PWD|OLDPWD|SHLVL|_|HOSTNAME|TERM)=' \
        > /root/.ssh/environment; } 2>/dev/null \
        || echo "rn50-entrypoint: cannot write /root/.ssh/environment; ssh sessions get a bare environment" >&2
    # RN50_SSH_LISTEN (docker run -e): listen on that address only (e.g. the cluster NIC's, or loopback).
    exec /usr/sbin/sshd -D -e -f /etc/rn50/sshd_config -p "$port" ${RN50_SSH_LISTEN:+-o ListenAddress=$RN50_SSH_LISTEN}
fi
exec "$@"
