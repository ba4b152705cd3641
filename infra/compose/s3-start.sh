#!/bin/sh
# Entrypoint of the compose `s3` service (SeaweedFS): writes its S3 identities file from the environment, then
# runs `weed "$@" -s3.config=<that file>`. Three identities, each with only what its holder needs:
#   admin    S3_ACCESS_KEY / S3_SECRET_KEY                  everything (people uploading ILSVRC2012, operators)
#   source   S3_SOURCE_ACCESS_KEY / S3_SOURCE_SECRET_KEY    read + list the data bucket (the fetch stage)
#   archive  S3_ARCHIVE_ACCESS_KEY / S3_ARCHIVE_SECRET_KEY  read, list, write (and delete) the archive bucket
# Buckets: RN50_S3_DATA_BUCKET / RN50_S3_ARCHIVE_BUCKET (default rn50-data / rn50-archive). There is no
# anonymous identity, so unsigned requests are refused. The file is written mode 600 to RN50_S3_CONFIG
# (default /tmp/rn50-s3/identities.json, inside the container only).
# Values are checked before anything is written: keys are letters, digits, '-' and '_'; secrets may add
# '.', '+', '/', '=' and '~' (no quote or backslash can reach the JSON); the three access keys differ.
set -eu
cfg=${RN50_S3_CONFIG:-/tmp/rn50-s3/identities.json}
data=${RN50_S3_DATA_BUCKET:-rn50-data}
archive=${RN50_S3_ARCHIVE_BUCKET:-rn50-archive}

fail() { echo "s3-start: $*" >&2; exit 2; }
check() {  # NAME PATTERN-CLASS: set, and only characters of the class
    eval "v=\${$1:-}"
    [ -n "$v" ] || fail "$1 is not set (see infra/compose/env.example)"
    case $v in *[!$2]*) fail "$1 has characters outside [$2]" ;; esac
}
for name in S3_ACCESS_KEY S3_SOURCE_ACCESS_KEY S3_ARCHIVE_ACCESS_KEY; do check "$name" 'A-Za-z0-9_-'; done
for name in S3_SECRET_KEY S3_SOURCE_SECRET_KEY S3_ARCHIVE_SECRET_KEY; do check "$name" 'A-Za-z0-9._~+/=-'; done
for name in data archive; do
    eval "b=\$$name"
    case $b in '' | *[!a-z0-9.-]*) fail "bucket name '$b' is not a valid S3 bucket name" ;; esac
done
if [ "$S3_ACCESS_KEY" = "$S3_SOURCE_ACCESS_KEY" ] || [ "$S3_ACCESS_KEY" = "$S3_ARCHIVE_ACCESS_KEY" ] \
   || [ "$S3_SOURCE_ACCESS_KEY" = "$S3_ARCHIVE_ACCESS_KEY" ]; then
    fail "S3_ACCESS_KEY, S3_SOURCE_ACCESS_KEY and S3_ARCHIVE_ACCESS_KEY must be three different keys"
fi

identity() {  # NAME ACCESS SECRET ACTIONS-JSON
    printf '    {"name": "%s", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": [%s]}' "$1" "$2" "$3" "$4"
}
umask 077
mkdir -p "$(dirname "$cfg")"
{
    printf '{\n  "identities": [\n'
    identity rn50-admin "$S3_ACCESS_KEY" "$S3_SECRET_KEY" '"Admin", "Read", "List", "Tagging", "Write"'
    printf ',\n'
    identity rn50-source "$S3_SOURCE_ACCESS_KEY" "$S3_SOURCE_SECRET_KEY" "\"Read:$data\", \"List:$data\""
    printf ',\n'
    identity rn50-archive "$S3_ARCHIVE_ACCESS_KEY" "$S3_ARCHIVE_SECRET_KEY" \
        "\"Read:$archive\", \"List:$archive\", \"Write:$archive\", \"Tagging:$archive\""
    printf '\n  ]\n}\n'
} > "$cfg.tmp"
mv "$cfg.tmp" "$cfg"
# The admin identity comes from the file only: never also as SeaweedFS's environment-variable admin.
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
exec weed "$@" "-s3.config=$cfg"
