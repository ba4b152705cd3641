#!/bin/sh
# The compose `deploy` service (one-shot): the `rn50` process pool, kept if it exists so settings made in
# the UI survive, and every deployment in prefect.yaml with its `pipeline` parameter set to $RN50_PIPELINE
# (the team's config instead of the embedded demo); each deployment's other parameters (rerun, nightly)
# and schedules stay as prefect.yaml has them. Needs PREFECT_API_URL (+ auth) and RN50_PROJECT_DIR.
set -eu
cd "${RN50_PROJECT_DIR:?}"
: "${RN50_PIPELINE:?set RN50_PIPELINE to a pipeline config name or path}"
prefect work-pool inspect rn50 >/dev/null 2>&1 || prefect work-pool create rn50 --type process
# One timed run per cluster at a time (the train stage holds a slot while it launches); kept if it exists.
prefect global-concurrency-limit inspect rn50-cluster >/dev/null 2>&1 \
  || prefect global-concurrency-limit create rn50-cluster --limit 1
# `prefect deploy --all` ignores --param, so deploy them one by one.
names=$(python -c 'import yaml; print(" ".join(d["name"] for d in yaml.safe_load(open("prefect.yaml"))["deployments"]))')
for name in $names; do
  prefect deploy --name "$name" --param "pipeline=$RN50_PIPELINE" --no-prompt
done
echo "deployed: $names (pipeline=$RN50_PIPELINE)"
# The automation that alerts when rn50/nightly ends Failed or Crashed; updated in place on every deploy.
# Channel: RN50_ALERT_SLACK_URL / RN50_ALERT_TEAMS_URL / RN50_ALERT_WEBHOOK_URL, or a block named rn50-alerts.
python -m flows.alerts setup
