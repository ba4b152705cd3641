#!/usr/bin/env bash
# `make demo`: a local Prefect server + worker, the deployments, and one `rn50/full` run on a synthetic
# ILSVRC2012, to a compliant, archived result. `make demo-stop` stops the server and worker.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PORT=${RN50_PREFECT_PORT:-4200}
HOME_DIR="$PWD/.demo/prefect"
export PREFECT_HOME="$HOME_DIR" PREFECT_API_URL="http://127.0.0.1:$PORT/api" RN50_PROJECT_DIR="$PWD"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=false

if [ "${1:-}" = stop ]; then
  python -m flows.local down --home "$HOME_DIR" --port "$PORT"
  echo "stopped the demo's Prefect server and worker"
  exit 0
fi

start=$(date +%s)
[ -f .demo/synthetic/MD5SUMS ] || rn50 synth .demo/synthetic
python -m flows.local up --home "$HOME_DIR" --port "$PORT"
echo "running rn50/full (watch it at http://127.0.0.1:$PORT/runs)"
prefect deployment run rn50/full --watch --watch-timeout 1800 > .demo/last-run.log 2>&1 || {
  tail -40 .demo/last-run.log; echo "rn50/full failed; worker log: $HOME_DIR/worker.log" >&2; exit 1; }
python - <<'PY'
import json, glob, os
from tasks.common import Workdir, read_stamp
wd = Workdir(".demo/work")
stamps = {s: read_stamp(wd, f"flow-{s}") for s in ("train", "compliance", "archive")}
c = stamps["compliance"]["result"]
log = c["logs"][0]
print(f"time to train: {log['time_to_train_min']:.2f} min, {log['epochs']} epochs, "
      f"top-1 {log['accuracy']:.3f}, {log['status']}; ruleset {c['ruleset']}: {'PASS' if c['logs_passed'] else 'FAIL'}")
print(f"run:        {stamps['train']['result']['run_dir']}")
print(f"compliance: {c['report_md']}")
print(f"archive:    {stamps['archive']['result']['uri']}")
PY
echo "Prefect UI: http://127.0.0.1:$PORT  (make demo-stop to stop the server and worker)"
echo "demo took $(( $(date +%s) - start )) s"
