"""`rn50 run`: the whole flow in-process, against PREFECT_API_URL or a Prefect server started for the run."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tasks.common import StageError

STAGES = ("fetch", "verify", "pack", "container", "distribute", "train", "compliance", "archive")
NIGHTLY_STAGES = ("train-nightly", "nightly")


def task_runs(flow_run_id) -> list:
    """The task runs of one flow run, in start order, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)


def stage_states(flow_run_id) -> dict[str, str]:
    """Final state name of each stage's task run in one flow run; stages that never started are NotRun."""
    states = {}
    for tr in task_runs(flow_run_id):
        name = tr.name.rsplit("-", 1)[0]
        if name in STAGES + NIGHTLY_STAGES and tr.state is not None:
            states[name] = tr.state.name
    out = {s: states.get(s, "NotRun") for s in STAGES}
    out.update({s: states[s] for s in NIGHTLY_STAGES if s in states})
    return out


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole rn50 flow (cached stages are skipped)",
                       description="Run the whole rn50 Prefect flow, fetch to archive, as one flow run: against "
                                   "PREFECT_API_URL, or a Prefect server started for this run. A stage whose inputs "
                                   "did not change is taken from the cache; the last line gives the result.")
    p.add_argument("source", nargs="?", help="archives: a directory, http(s):// or s3:// (default: the pipeline's)")
    p.add_argument("workdir", nargs="?", help="work directory (default: the pipeline's)")
    p.add_argument("--pipeline", default="demo", help="pipeline config name in configs/pipeline/ (default: demo)")
    p.add_argument("--rerun", nargs="+", default=[], choices=STAGES, metavar="STAGE",
                   help="run these stages even if cached (what depends on them follows by its keys)")
    p.add_argument("--nightly", action="store_true",
                   help="convergence regression: train fresh with fixed seeds, compare with the last accepted night")
    p.add_argument("--force-accept", action="store_true",
                   help="with --nightly: make tonight the baseline even without a comparable one (needs --reason)")
    p.add_argument("--reason", default=None, help="why tonight is accepted (recorded with user@host and time)")
    p.add_argument("--json", action="store_true", help="print one JSON object: flow_run_id, state, stages")
    p.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    import os

    from flows.config import check_pipeline
    from tasks.tether import TAG, Tether

    if args.force_accept and not (args.nightly and args.reason):
        raise StageError("--force-accept needs --nightly and --reason \"why\" (it is recorded in the nightly history)")
    # A typo in the pipeline config is a one-line error before any Prefect server or flow run starts.
    check_pipeline(args.pipeline, args.source, args.workdir)
    # Prefect's temporary server would try to send telemetry (and say it failed, offline): as `make` does.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    # Whatever this run starts (its Prefect server when PREFECT_API_URL is unset, horovodrun and its ranks)
    # inherits the tether's token and is stopped if this process is killed, even by SIGKILL.
    with Tether() as tether:
        os.environ[TAG] = tether.token
        server = None
        try:
            if not os.environ.get("PREFECT_API_URL"):
                server = _run_server()
            return _run_flow(args)
        finally:
            if server is not None:
                _send_queued_logs_and_events()
                server.terminate()
                try:
                    server.wait(20)
                except subprocess.TimeoutExpired:
                    server.kill()
                (Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "pids"
                 / f"run-server-{os.getpid()}").unlink(missing_ok=True)
            os.environ.pop(TAG, None)


def _send_queued_logs_and_events() -> None:
    """Send what Prefect still queues in this process while the run's server is up. Left to Prefect's exit
    hook, the logs went to a server already stopped, and `rn50 run` retried for over a minute before it
    exited with "Error logging to API"."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=30)


def _run_server():
    """A Prefect server on PREFECT_HOME's database for this run only, on a free loopback port.

    Not Prefect's own temporary server: that one keeps concurrency leases in memory and runs no repossessor,
    so the rn50-cluster slot of a run killed with SIGKILL would stay taken in the database for good. This
    server keeps leases on disk (see flows/local.py) and frees a dead run's slot once its lease expires."""
    import os
    import socket

    from flows.local import LocalPrefect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    local = LocalPrefect(home, port)
    print(f"rn50 run: starting a Prefect server for this run on {local.ui_url} (database in {home})", file=sys.stderr)
    proc = local.start_server(name=f"run-server-{os.getpid()}", timeout_s=180,
                              PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
    os.environ["PREFECT_API_URL"] = local.api_url
    return proc


def _run_flow(args: argparse.Namespace) -> int:
    from flows.pipeline import rn50

    state = rn50(args.source, args.workdir, args.pipeline, args.rerun, args.nightly,
                 force_accept=args.force_accept, accept_reason=args.reason, return_state=True)
    flow_run_id = state.state_details.flow_run_id
    stages = stage_states(flow_run_id)
    if args.json:
        print(json.dumps({"flow_run_id": str(flow_run_id), "state": state.name, "stages": stages}))
    else:
        print("  ".join(f"{s}: {v}" for s, v in stages.items()))
        if state.is_completed():
            r = state.result()
            print(f"time to train: {r['time_to_train']}; run: {r['run_dir']}\n"
                  f"compliance: {r['compliance_report']}\narchive: {r['archive']}")
    if not state.is_completed():
        msg = (state.message or state.name).splitlines()[0]
        if not args.json:
            raise StageError(f"flow run {state.state_details.flow_run_id} {state.name.lower()}: {msg}")
        return 1
    return 0


