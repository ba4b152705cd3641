#!/bin/sh
# Container entrypoint: export the runtime profile baked in at build time, then either start the
# node's sshd (`rn50-entrypoint sshd [PORT]`, what infra/start-node.sh runs on every host) or exec
# the given command. Ranks started over ssh get the same variables from horovodrun (tasks/train.py).
#
# sshd mode:
#   RN50_SSH_LISTEN  (required) the node's cluster address(es), space-separated: sshd listens there only
#   host key         $RN50_ETC/hostkeys/ssh_host_ed25519_key, made on first start (start-node.sh keeps
#                    it on the host, so the launcher's pinned key stays valid across restarts)
#   environment      the image's environment (PATH, PYTHONPATH=/opt/rn50, LD_LIBRARY_PATH, the profile)
#                    reaches every session through one `SetEnv` line in the generated sshd config
#                    (root-owned, read at start), not through ~/.ssh/environment.
#   RN50_ETC / RN50_STATE_DIR  where the image's files / the generated config live (default
#                    /etc/rn50, /run/rn50; tests point them elsewhere).
set -e
etc=${RN50_ETC:-/etc/rn50}
if [ -f "$etc/runtime.env" ]; then
    set -a
    . "$etc/runtime.env"
    set +a
fi
if [ "$1" = "sshd" ]; then
    port=${2:-${RN50_SSH_PORT:-12345}}
    case $port in '' | *[!0-9]*) echo "rn50-entrypoint: port '$port' is not a number" >&2; exit 2 ;; esac
    listen=$(printf '%s' "${RN50_SSH_LISTEN:-}" | tr ',' ' ')
    if [ -z "$listen" ]; then
        echo "rn50-entrypoint: set RN50_SSH_LISTEN to this node's cluster address (the inventory's host:)" \
             "so sshd does not listen on every interface" >&2
        exit 2
    fi
    for a in $listen; do
        case $a in *[!0-9A-Za-z.:_%-]*) echo "rn50-entrypoint: RN50_SSH_LISTEN: '$a' is not an address" >&2; exit 2 ;; esac
    done
    state=${RN50_STATE_DIR:-/run/rn50}
    mkdir -p "$state" "$etc/hostkeys" /run/sshd
    chmod 700 "$state" "$etc/hostkeys"
    key="$etc/hostkeys/ssh_host_ed25519_key"
    [ -f "$key" ] || ssh-keygen -q -t ed25519 -N '' -C "rn50-node" -f "$key"
    # One quoted NAME=value per variable of this environment; values sshd's config syntax cannot
    # carry (a quote, a backslash) are left out, with a warning.
    setenv=""
    for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' | sort -u); do
        case $name in HOME | PWD | OLDPWD | SHLVL | _ | HOSTNAME | TERM | RN50_SSH_LISTEN | RN50_SSH_PORT) continue ;; esac
        eval "isset=\${$name+x} value=\${$name}"
        [ -n "$isset" ] || continue
        case $value in
            *'"'* | *'\'* | *'
'*) echo "rn50-entrypoint: $name not passed to ssh sessions (its value holds a quote, backslash or newline)" >&2; continue ;;
        esac
        setenv="$setenv \"$name=$value\""
    done
    cfg="$state/sshd_config"
    {
        echo "Port $port"
        for a in $listen; do echo "ListenAddress $a"; done
        echo "HostKey $key"
        [ -z "$setenv" ] || echo "SetEnv$setenv"
        cat "$etc/sshd_config"
    } > "$cfg"
    chmod 600 "$cfg"
    exec /usr/sbin/sshd -D -e -f "$cfg"
fi
exec "$@"
