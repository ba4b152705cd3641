#!/bin/sh
# The compose `deploy` service (one-shot): the `rn50` process pool (kept if it exists; its base job template is
# reset to ours, see below), and every deployment in prefect.yaml with its `pipeline` parameter set to $RN50_PIPELINE
# (the team's config instead of the embedded demo); each deployment's other parameters (rerun, nightly)
# and schedules stay as prefect.yaml has them. Needs PREFECT_API_URL (+ auth) and RN50_PROJECT_DIR.
set -eu
cd "${RN50_PROJECT_DIR:?}"
: "${RN50_PIPELINE:?set RN50_PIPELINE to a pipeline config name or path}"
# The pool's base job template without the `command`, `env` and `working_dir` job variables
# (infra/compose/job_template.py): a run cannot make the worker execute a command of its choosing. Applied on
# every deploy, also to a pool that already exists (an older deploy created it with Prefect's default).
template=$(mktemp)
trap 'rm -f "$template"' EXIT
python infra/compose/job_template.py > "$template"
if prefect work-pool inspect rn50 >/dev/null 2>&1; then
  prefect work-pool update rn50 --base-job-template "$template"
else
  prefect work-pool create rn50 --type process --base-job-template "$template"
fi
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
