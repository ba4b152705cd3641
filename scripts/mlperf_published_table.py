"""Build tasks/data/mlperf_resnet_published.csv, the published MLPerf ResNet results the health report
places a run beside, from the public result logs and system descriptions.

    .venv/bin/python scripts/mlperf_published_table.py V4_DIR [--v07-inspur DIR] [--out CSV]

V4_DIR: an extract of mlcommons/training_results_v4.0 (<submitter>/results/<system>/resnet/result_*.txt and
<submitter>/systems/<system>.json); DIR: the five MLPerf Training v0.7 Inspur NF5488 (8 x A100) result logs.
Per system (one row):
  img_per_s_per_accelerator  median over runs of each run's steady-state img/s (the median over its epochs
                             after the first of `tracked_stats` throughput; without it, train_samples over
                             epoch_start->epoch_stop, or over epoch_stop->epoch_stop), / (nodes x per node)
  time_to_train_min          olympic mean of run_start->run_stop over the runs, as MLPerf scores ResNet
                             (tasks.compliance.olympic_mean: a run whose run_stop is not "success" counts as
                             failed and is the one dropped; none when more than one failed)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks import mlperf_logs  # noqa: E402
from tasks.compliance import olympic_mean  # noqa: E402
from tasks.health import PUBLISHED_TABLE, epoch_throughput, steady  # noqa: E402

COLUMNS = ("round", "submitter", "system", "accelerator", "accelerators_per_node", "nodes", "accelerators",
           "img_per_s_per_accelerator", "throughput_source", "time_to_train_min", "runs", "converged", "source")
# The v0.7 logs come without a system description: what MLPerf v0.7 published for Inspur's NF5488 entry.
INSPUR_V07 = {"submitter": "Inspur", "system": "NF5488", "accelerator": "NVIDIA A100", "accelerators_per_node": 8,
              "nodes": 1}


def system_row(logs: list[Path], accelerator: str, per_node: int, nodes: int) -> dict:
    """The table's figures for one system's result logs."""
    per_run, scores, failed, sources = [], [], 0, set()
    for log in logs:
        lines = mlperf_logs.load(log)
        s = mlperf_logs.summarize(lines)
        per_epoch, source = epoch_throughput(lines, s.values.get("train_samples"))
        sources.add(source)
        if steady(per_epoch):
            per_run.append(steady(per_epoch))
        if s.status == "success" and s.run_start is not None and s.run_stop is not None:
            scores.append((s.run_stop - s.run_start) / 60000)
        else:
            failed += 1
    ttt = olympic_mean(scores, failed) if len(logs) >= 5 else None
    total = per_node * nodes
    return {"accelerator": accelerator, "accelerators_per_node": per_node, "nodes": nodes, "accelerators": total,
            "img_per_s_per_accelerator": round(statistics.median(per_run) / total, 1) if per_run else "",
            "throughput_source": "+".join(sorted(sources)), "time_to_train_min": round(ttt, 3) if ttt else "",
            "runs": len(logs), "converged": len(scores)}


def build(v4: Path, inspur: Path | None) -> list[dict]:
    rows = []
    for desc in sorted(v4.glob("*/systems/*.json")):
        submitter, system = desc.parent.parent.name, desc.stem
        logs = mlperf_logs.result_files(v4 / submitter / "results" / system / "resnet")
        if not logs:
            continue
        d = json.loads(desc.read_text())
        rows.append({"round": "v4.0", "submitter": submitter, "system": system,
                     **system_row(logs, d["accelerator_model_name"], int(d["accelerators_per_node"]),
                                  int(d["number_of_nodes"])),
                     "source": f"mlcommons/training_results_v4.0 {submitter}/results/{system}/resnet"})
    if inspur is not None:
        i = INSPUR_V07
        rows.append({"round": "v0.7", "submitter": i["submitter"], "system": i["system"],
                     **system_row(mlperf_logs.result_files(inspur), i["accelerator"], i["accelerators_per_node"], i["nodes"]),
                     "source": "mlcommons/training_results_v0.7 Inspur/results/nf5488_mxnet/resnet"})
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    buf.write("# Published MLPerf Training ResNet-50 results, built by scripts/mlperf_published_table.py "
              "(see its docstring for the definitions). Do not edit by hand.\n")
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("v4", type=Path, help="the MLPerf Training v4.0 ResNet extract")
    ap.add_argument("--v07-inspur", type=Path, default=None, help="the five v0.7 Inspur NF5488 result logs")
    ap.add_argument("--out", type=Path, default=PUBLISHED_TABLE)
    a = ap.parse_args(argv)
    rows = build(a.v4, a.v07_inspur)
    if not rows:
        print(f"mlperf_published_table: error: no <submitter>/systems/*.json with resnet results under {a.v4}",
              file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(to_csv(rows))
    print(f"{len(rows)} systems -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
