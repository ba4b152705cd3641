"""The `rn50` flow: raw ILSVRC2012 to a verified MLPerf ResNet-50 result, one cached stage after another.

(Not flows/rn50.py: a worker loads this file as a script, and that name would shadow the rn50 package.)
"""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from prefect import flow, runtime
from prefect.states import Failed

import tasks.archive
import tasks.compliance
import tasks.distribute
import tasks.pack
import tasks.verify
from flows import cache, stages, team
from flows.cache import code_version as code
from flows.cli import STAGES
from flows.config import known_pipelines, load_pipeline
from rn50.config import load_config
from tasks import paths
from tasks.common import Workdir, file_digest
from tasks.container import content_hash
from tasks.ilsvrc import OFFICIAL_MD5, read_md5sums
from tasks.nightly import baseline_location

RN50_PACKAGE = paths.REPO / "rn50"

# Typed parameters: the UI's run form offers the known pipeline names (a path to another config, e.g. the
# team's, is still accepted as text) and the stage names for `rerun`; a deployment run with a stage name
# that does not exist is rejected by the server before a worker picks it up.
PipelineName = Literal[tuple(known_pipelines())]  # type: ignore[valid-type]
Stage = Literal[STAGES]  # type: ignore[valid-type]


@flow(name="rn50", log_prints=True)
def rn50(source: Optional[str] = None, workdir: Optional[str] = None, pipeline: Union[PipelineName, str] = "demo",
         rerun: Optional[List[Stage]] = None, nightly: bool = False, force_accept: bool = False,
         accept_reason: Optional[str] = None) -> dict:
    """Raw ILSVRC2012 to a verified MLPerf ResNet-50 result.

    Args:
        source: the three archives: a directory, http(s):// or s3:// (default: the pipeline config's).
        workdir: work directory (default: the pipeline config's).
        pipeline: a pipeline config name in configs/pipeline/, or a path to one (e.g. the team's).
        rerun: stages to run even if cached (what depends on them follows by its keys).
        nightly: train fresh with the pipeline's fixed seeds and fail if convergence regressed against the
            last accepted nightly (kept next to the archive), or if there is no comparable baseline.
        force_accept: with `nightly`: make this night the baseline whatever the verdict (a person's
            decision, recorded in the history with who, when and `accept_reason`).
        accept_reason: why this night is forced to be the baseline (required with `force_accept`).

    Cached results name this run's work dir whichever work dir they were computed in (flows/stages.py),
    and no key holds a path (flows/cache.py): a moved work dir or a copied source stays all Cached.
    """
    cfg = load_pipeline(pipeline, source=source, workdir=workdir)
    wd = Workdir(cfg["workdir"])
    team.check_team(wd.root)  # a worker of a team: the work dir and cache records are the shared ones
    run = stages.Runner(wd, rerun or ())
    f, p, c, t, q, a = (cfg[s] for s in ("fetch", "pack", "container", "train", "compliance", "archive"))

    expected = read_md5sums(f["md5_file"]) if f["md5_file"] else OFFICIAL_MD5
    fetched = run(stages.fetch, cache.fetch_key(expected), source=cfg["source"], md5_file=f["md5_file"])
    verified = run(stages.verify, cache.verify_key(fetched, code(tasks.verify)))
    packed = run(stages.pack, cache.pack_key(verified, code(tasks.pack)), threads=p["threads"],
                 full_check=p["full_check"])
    image = None
    if c["runtime"] == "docker":
        chash = content_hash(from_image=c["from_image"], build_args=c["build_args"])
        image = run(stages.container, cache.container_key(chash, c), from_image=c["from_image"],
                    registry=c["registry"], push=c["push"], build_args=c["build_args"], network=c["network"])
    else:
        stages.skip.with_options(name="container")("no container runtime requested")
    why_not = tasks.distribute.skip_reason(wd.root, t["hosts"])
    if why_not:
        stages.skip.with_options(name="distribute")(why_not)
    else:
        run(stages.distribute, cache.distribute_key(packed, file_digest(t["hosts"]), code(tasks.distribute)),
            hosts=t["hosts"])

    launch = dict(config=t["config"], hosts=t["hosts"], image=image and image["tag"], timeout_s=60 * t["timeout_minutes"],
                  cluster_limit=t.get("cluster_limit", stages.CLUSTER_LIMIT))
    if nightly:
        n, key = cfg["nightly"], cache.nightly_key(runtime.flow_run.id)
        trained = run(stages.nightly_train, key, runs=n["runs"], seed=n["seed"], **launch)
        night = run(stages.nightly, key, logs=trained["results"], baseline=baseline_location(a["uri"]),
                    tolerance_epochs=n["tolerance_epochs"], tolerance_accuracy=n["tolerance_accuracy"],
                    target=load_config(t["config"])["target_accuracy"],
                    context={"config": t["config"], "manifest_digest": verified["manifest_digest"]},
                    force_accept=force_accept, reason=accept_reason)
        print(f"nightly: {night['verdict']}: {night['reason']}")
        if night["failed"]:
            return Failed(message=night["reason"])
    else:
        settings = cache.train_settings(t["runs"], file_digest(t["hosts"]) if t["hosts"] else None,
                                        file_digest(paths.resolve("training", t["config"])))
        trained = run(stages.train, cache.train_key(packed, image, settings, cache.tree_digest(RN50_PACKAGE)),
                      runs=t["runs"], **launch)

    logs_digest = [file_digest(r, "sha256") for r in trained["results"]]
    checked = run(stages.compliance, cache.compliance_key(logs_digest, q, code(tasks.compliance)),
                  logdir=trained["run_dir"], ruleset=q["ruleset"], dataset=q["dataset"])
    archived = run(stages.archive, cache.archive_key([verified["manifest_digest"], packed["content_digest"],
                                                      trained["run_id"], checked["key"]], a, code(tasks.archive),
                                                     cfg["workdir"], cache.archive_contents(wd.root, a["include_checkpoints"])),
                   uri=a["uri"], include_checkpoints=a["include_checkpoints"])
    ttt, scored = result_figure(checked)
    print(f"time to train: {scored} ({trained['run_dir']}); archived to {archived['uri']}")
    return {"workdir": cfg["workdir"], "run_dir": trained["run_dir"], "runs": len(checked["logs"]),
            "time_to_train_min": ttt, "time_to_train": scored, "compliance_report": checked["report_md"],
            "archive": archived["uri"]}


def result_figure(checked: dict) -> tuple[float | None, str]:
    """The time-to-train a person reads as the result, and how it was scored, from the compliance stage's
    result: the set's olympic mean (as MLPerf scores it; None when the runs are no set it can score, with
    the reason), or the run's own time when there is one run."""
    logs = checked["logs"]
    if len(logs) == 1:
        ttt = logs[0]["time_to_train_min"]
        return ttt, ("no time (the run did not converge)" if ttt is None else f"{ttt:.2f} min (1 run)")
    ttt = checked["set_time_to_train_min"]
    if ttt is None:
        return None, f"no set figure ({len(logs)} runs: {checked['set_reason']})"
    why = "" if checked["set_passed"] else f"; {checked['set_reason']}"
    return ttt, f"{ttt:.2f} min (olympic mean of {len(logs)} runs, as MLPerf scores a set{why})"
