#!/bin/sh
# The compose `redis` service's entrypoint: the password goes into a config file only this user can read
# (never onto a command line, where `ps` would show it), then redis-server runs with the service's arguments.
set -eu
: "${REDIS_PASSWORD:?REDIS_PASSWORD is not set (see infra/compose/env.example)}"
umask 077
conf="${RN50_REDIS_CONF:-/tmp/rn50-redis.conf}"
printf 'requirepass %s\n' "$REDIS_PASSWORD" > "$conf"
exec redis-server "$conf" "$@"
