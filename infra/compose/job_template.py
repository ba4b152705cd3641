"""Print the base job template of the team's `rn50` process pool (infra/compose/deploy.sh applies it).

Prefect's default process template lets whoever starts a run set the job variables `command` (the command the
worker executes), `env` (e.g. PREFECT_API_URL pointing at a server of their own, which then hands the worker
pull steps to run) and `working_dir`. Anyone holding PREFECT_AUTH_STRING could thus run any command as the
worker, which holds the node SSH key and S3 credentials. This template is Prefect's default with those three
removed from both the variables and the job configuration: a run's `command`/`env`/`working_dir` job
variables are then ignored, and the worker always runs `python -m prefect.engine` for the deployment's flow
in its own environment. Only `name`, `labels` and `stream_output` remain settable per run.
"""
from __future__ import annotations

import json
import sys

REMOVED = ("command", "env", "working_dir")


def template() -> dict:
    from prefect.workers.process import ProcessWorker

    t = ProcessWorker.get_default_base_job_template()
    for key in REMOVED:
        t["job_configuration"].pop(key, None)
        t["variables"]["properties"].pop(key, None)
        if key in t["variables"].get("required", []):
            t["variables"]["required"].remove(key)
    return t


if __name__ == "__main__":
    json.dump(template(), sys.stdout, indent=2)
    sys.stdout.write("\n")
