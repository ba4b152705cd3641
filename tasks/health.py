"""Cluster health of a run directory (one run or a set): per-rank timing, the slow host named, the
published MLPerf results beside it. Written next to the compliance report (compliance/<run-id>/health.*)
and published as a flow artifact.

Inputs (untrusted: a malformed file is a one-line StageError):
  RUN_DIR/result_<n>.txt           MLPerf logs: tracked_stats img/s per epoch, run_start/run_stop
  RUN_DIR/timing/run_<n>.jsonl     per-rank, per-epoch timing gathered by rank 0 (rn50/timing.py)
  tasks/data/mlperf_resnet_published.csv   published results (scripts/mlperf_published_table.py builds it)

Steady state leaves out epoch 1 (hybridization, memory pools, the data pipeline filling) when a run has
more. A host's speed is its ranks' own img/s (images over data wait + compute of the sampled steps, i.e.
without the time spent waiting for peers in the allreduce): in lock-step data parallelism every rank's
wall-clock img/s is the same, so that is what tells a slow node. The slowest host is named when it is more
than `threshold` (default 5 %) below the median of the hosts.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Iterable

from tasks import mlperf_logs
from tasks.common import Result, StageError, atomic_path, write_json_atomic, write_text_atomic

SLOW_HOST_THRESHOLD = 0.05
PUBLISHED_TABLE = Path(__file__).resolve().parent / "data" / "mlperf_resnet_published.csv"
TIMING_NUMBERS = ("seconds", "img_per_s", "own_img_per_s", "step_ms_p50", "step_ms_p95", "step_ms_max",
                  "data_wait_s", "compute_s", "allreduce_s", "data_wait_frac", "allreduce_frac")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")


# --- throughput from MLPerf logs (ours and the published ones) ------------------------------------


def epoch_throughput(lines: Iterable[Any], train_samples: float | None = None) -> tuple[dict[int, float], str]:
    """{epoch: img/s} of one parsed log and where it came from: `tracked_stats` (NVIDIA's and ours),
    else epoch_start -> epoch_stop durations, else epoch_stop -> epoch_stop intervals (both need
    train_samples). ({}, "none") when the log has neither."""
    tracked: dict[int, float] = {}
    starts: dict[int, float] = {}
    stops: dict[int, float] = {}
    for ll in lines:
        v = ll.value if isinstance(ll.value, dict) else {}
        md = v.get("metadata") or {}
        if ll.key == "tracked_stats" and isinstance(v.get("value"), dict):
            x, step = v["value"].get("throughput"), md.get("step", md.get("epoch_num"))
            if isinstance(x, (int, float)) and isinstance(step, int):
                tracked[step] = float(x)
        elif ll.key in ("epoch_start", "epoch_stop") and isinstance(md.get("epoch_num"), int):
            (starts if ll.key == "epoch_start" else stops).setdefault(md["epoch_num"], float(ll.timestamp))
    if tracked:
        return tracked, "tracked_stats"
    if not train_samples:
        return {}, "none"
    paired = {e: train_samples / ((stops[e] - starts[e]) / 1000) for e in stops if e in starts and stops[e] > starts[e]}
    if paired:
        return paired, "epoch_start/epoch_stop"
    es = sorted(stops)
    gaps = {b: train_samples / ((stops[b] - stops[a]) / 1000) for a, b in zip(es, es[1:])
            if b == a + 1 and stops[b] > stops[a]}
    return (gaps, "epoch_stop intervals") if gaps else ({}, "none")


def steady(per_epoch: dict[int, float]) -> float | None:
    """Median img/s over the epochs after the first (all of them when there is only one)."""
    if not per_epoch:
        return None
    later = [v for e, v in per_epoch.items() if e > min(per_epoch)]
    return statistics.median(later or list(per_epoch.values()))


# --- rank timing ------------------------------------------------------------------------------------


def _check_record(r: Any, where: str) -> dict[str, Any]:
    if not isinstance(r, dict):
        raise StageError(f"{where}: not a JSON object")
    for k in ("epoch", "rank"):
        if not isinstance(r.get(k), int) or isinstance(r.get(k), bool) or r[k] < 0:
            raise StageError(f"{where}: {k} must be a non-negative integer")
    host = r.get("host")
    if not isinstance(host, str) or not _HOST.fullmatch(host):
        raise StageError(f"{where}: host must be a host name (letters, digits, . _ : -)")
    for k in TIMING_NUMBERS:
        x = r.get(k)
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
            raise StageError(f"{where}: {k} must be a finite number >= 0")
    return r


def read_timing(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """{run index: records} from RUN_DIR/timing/run_<n>.jsonl ({} when the run has no timing)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for p in sorted(Path(run_dir, "timing").glob("run_*.jsonl")):
        m = re.fullmatch(r"run_(\d+)\.jsonl", p.name)
        if not m:
            continue
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise StageError(f"cannot read timing file {p}: {getattr(e, 'strerror', None) or e}") from None
        recs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise StageError(f"timing file {p} line {i}: not JSON") from None
            recs.append(_check_record(rec, f"timing file {p} line {i}"))
        out[int(m.group(1))] = recs
    return out


def host_epochs(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """{host: {epoch: figures}}: own img/s per GPU (median over the host's ranks), wall img/s (sum over
    them), data-wait and allreduce fractions (mean over them), step times (worst rank)."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["host"], r["epoch"]), []).append(r)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for (host, epoch), rs in sorted(by.items()):
        sampled = [r for r in rs if r.get("sampled_steps", 1) and r["own_img_per_s"] > 0]
        out.setdefault(host, {})[epoch] = {
            "ranks": len(rs),
            "own_img_per_s_per_gpu": statistics.median(r["own_img_per_s"] for r in sampled) if sampled else None,
            "img_per_s": sum(r["img_per_s"] for r in rs),
            "data_wait_frac": statistics.mean(r["data_wait_frac"] for r in rs),
            "allreduce_frac": statistics.mean(r["allreduce_frac"] for r in rs),
            "step_ms_p50": max(r["step_ms_p50"] for r in rs),
            "step_ms_p95": max(r["step_ms_p95"] for r in rs),
            "step_ms_max": max(r["step_ms_max"] for r in rs),
        }
    return out


def _steady_figures(epochs: dict[int, dict[str, float]]) -> dict[str, float | None]:
    later = {e: f for e, f in epochs.items() if e > min(epochs)} or epochs
    own = [f["own_img_per_s_per_gpu"] for f in later.values() if f["own_img_per_s_per_gpu"] is not None]
    med = lambda k: statistics.median(f[k] for f in later.values())  # noqa: E731
    return {"ranks": max(f["ranks"] for f in epochs.values()),
            "own_img_per_s_per_gpu": statistics.median(own) if own else None,
            "img_per_s": med("img_per_s"), "data_wait_frac": med("data_wait_frac"),
            "allreduce_frac": med("allreduce_frac"), "step_ms_p50": med("step_ms_p50"),
            "step_ms_p95": med("step_ms_p95"), "step_ms_max": max(f["step_ms_max"] for f in later.values())}


def slow_hosts(own_per_gpu: dict[str, float | None], threshold: float) -> list[dict[str, Any]]:
    """Hosts more than `threshold` below the hosts' median own img/s per GPU, slowest first."""
    known = {h: v for h, v in own_per_gpu.items() if v}
    if len(known) < 2:
        return []
    med = statistics.median(known.values())
    slow = [{"host": h, "own_img_per_s_per_gpu": round(v, 2), "median": round(med, 2),
             "below_median": round(1 - v / med, 4)} for h, v in known.items() if v < med * (1 - threshold)]
    return sorted(slow, key=lambda s: s["own_img_per_s_per_gpu"])


# --- published results ------------------------------------------------------------------------------


def load_published(path: str | Path = PUBLISHED_TABLE) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(row for row in f if not row.startswith("#")))
    for r in rows:
        for k in ("accelerators_per_node", "nodes", "accelerators", "runs", "converged"):
            r[k] = int(r[k])
        for k in ("img_per_s_per_accelerator", "time_to_train_min"):
            r[k] = float(r[k]) if r[k] else None
    return rows


def accelerator_key(name: str) -> tuple[str, str] | None:
    """(model, form factor) of an accelerator name: "NVIDIA H100-SXM5-80GB" -> ("h100", "sxm"),
    "NVIDIA GeForce RTX 4090" -> ("4090", ""); None for a CPU or an empty name."""
    s = (name or "").lower()
    m = re.search(r"\b([ahlvb]\d{2,3}s?|\d{4})\b", s.replace("-", " "))
    if not m:
        return None
    form = "sxm" if "sxm" in s else "pcie" if "pcie" in s else ""
    return m.group(1), form


def compare_published(system: dict[str, Any], per_gpu: float | None, table: list[dict[str, Any]],
                      n: int = 3) -> dict[str, Any]:
    """The run beside the published entries of the same accelerator (same form factor first, then the
    nearest accelerator count)."""
    accel = str(system.get("accelerator_model_name") or "")
    try:
        per_node = int(system.get("accelerators_per_node") or 0)
        nodes = int(system.get("number_of_nodes") or 1)
    except (TypeError, ValueError):
        per_node, nodes = 0, 1
    have = sorted({r["accelerator"] for r in table})
    key = accelerator_key(accel) if per_node > 0 else None
    matches = [r for r in table if key and accelerator_key(r["accelerator"]) and accelerator_key(r["accelerator"])[0] == key[0]]
    if not matches:
        what = "a CPU-only run" if per_node <= 0 else f"accelerator {accel!r}"
        return {"matched": False, "entries": [],
                "text": f"no published MLPerf ResNet result matches {what}; the table ({len(table)} systems) holds "
                        + ", ".join(have)}
    total = per_node * nodes
    matches.sort(key=lambda r: (accelerator_key(r["accelerator"])[1] != key[1], abs(r["accelerators"] - total),
                                r["submitter"], r["system"]))
    entries, lines = [], []
    for r in matches[:n]:
        pct = round(100 * per_gpu / r["img_per_s_per_accelerator"], 1) if per_gpu and r["img_per_s_per_accelerator"] else None
        entries.append({**r, "percent_of_published": pct})
        here = f"{per_gpu:.0f}" if per_gpu else "n/a"
        lines.append(f"{total}x {accel}: {here} img/s per GPU here, {r['img_per_s_per_accelerator']:.0f} in "
                     f"{r['submitter']}'s published run ({r['system']}, {r['nodes']}x{r['accelerators_per_node']}, "
                     f"{r['round']}), {pct if pct is not None else 'n/a'} %")
    return {"matched": True, "entries": entries, "text": "; ".join(lines)}


# --- the report -------------------------------------------------------------------------------------


@dataclasses.dataclass
class HealthResult(Result):
    run_dir: str
    threshold: float
    runs: list[dict[str, Any]]  # per run: index, time_to_train_min, img_per_s, per_gpu, ranks, hosts
    hosts: list[dict[str, Any]]  # the set: per host, median over runs of the steady figures
    slow_hosts: list[dict[str, Any]]
    slowest_host: str | None  # named only when it is more than `threshold` below the median
    verdict: str  # one line
    img_per_s: float | None  # the set: median over runs of the steady aggregate img/s
    img_per_s_per_gpu: float | None
    data_wait_frac: float | None
    allreduce_frac: float | None
    published: dict[str, Any]
    plot_png: str
    report_md: str
    report_json: str


def _median_or_none(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def read_preflight(log: Path) -> dict[str, float] | None:
    """RUN_DIR/timing/preflight_<n>.json of result_<n>.txt (rn50's bandwidth preflight), or None."""
    m = re.fullmatch(r"result_(\d+)\.txt", log.name)
    p = log.parent / "timing" / f"preflight_{m.group(1)}.json" if m else None
    if p is None or not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise StageError(f"preflight file {p}: not JSON") from None
    keys = ("bytes", "ranks", "seconds", "algbw_gbps", "busbw_gbps")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), (int, float)) and not isinstance(doc.get(k), bool)
                                            and math.isfinite(doc[k]) and doc[k] >= 0 for k in keys):
        raise StageError(f"preflight file {p}: want finite numbers >= 0 for {', '.join(keys)}")
    return {k: doc[k] for k in keys}


def _run_figures(log: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    s = mlperf_logs.summarize(lines := mlperf_logs.load(log))
    per_epoch, source = epoch_throughput(lines, s.values.get("train_samples"))
    ranks = len({r["rank"] for r in records}) or None
    agg = steady(per_epoch)
    ttt = (s.run_stop - s.run_start) / 60000 if s.run_start is not None and s.run_stop is not None else None
    hosts = host_epochs(records)
    return {"log": log.name, "time_to_train_min": ttt, "status": s.status, "throughput_source": source,
            "preflight": read_preflight(log),
            "img_per_s": agg, "img_per_s_per_gpu": agg / ranks if agg and ranks else None, "ranks": ranks,
            "epochs": {str(e): v for e, v in sorted(per_epoch.items())},
            "hosts": {h: {"steady": _steady_figures(ep), "epochs": {str(e): f for e, f in ep.items()}}
                      for h, ep in hosts.items()}}


def run_performance(log: str | Path) -> dict[str, Any]:
    """One run's time to train, steady aggregate img/s and each host's own img/s per rank (its MLPerf log
    and RUN_DIR/timing/run_<n>.jsonl beside it): what the nightly keeps in its history."""
    log = Path(log)
    m = re.fullmatch(r"result_(\d+)\.txt", log.name)
    records = read_timing(log.parent).get(int(m.group(1)), []) if m else []
    f = _run_figures(log, records)
    return {"time_to_train_min": f["time_to_train_min"], "img_per_s": f["img_per_s"], "ranks": f["ranks"],
            "hosts": {h: v["steady"]["own_img_per_s_per_gpu"] for h, v in f["hosts"].items()
                      if v["steady"]["own_img_per_s_per_gpu"]}}


def report(run_dir: str | Path, out_dir: str | Path, system: dict[str, Any] | None = None,
           threshold: float = SLOW_HOST_THRESHOLD, published: str | Path = PUBLISHED_TABLE) -> HealthResult:
    """Read RUN_DIR's logs and timing, write OUT_DIR/health.{json,md,png}; returns what it wrote."""
    if not (0 < threshold < 1):
        raise StageError(f"slow-host threshold must be in (0, 1), not {threshold}")
    run_dir, out = Path(run_dir), Path(out_dir)
    logs = mlperf_logs.result_files(run_dir)
    if not logs:
        raise StageError(f"no result_*.txt in {run_dir}")
    timing = read_timing(run_dir)
    runs = []
    for log in logs:
        m = re.fullmatch(r"result_(\d+)\.txt", log.name)
        idx = int(m.group(1)) if m else None
        runs.append({"index": idx, **_run_figures(log, timing.get(idx, []))})
    host_names = sorted({h for r in runs for h in r["hosts"]})
    hosts = []
    for h in host_names:
        steadies = [r["hosts"][h]["steady"] for r in runs if h in r["hosts"]]
        row = {"host": h, "ranks": max(s["ranks"] for s in steadies)}
        for k in ("own_img_per_s_per_gpu", "img_per_s", "data_wait_frac", "allreduce_frac", "step_ms_p50",
                  "step_ms_p95", "step_ms_max"):
            row[k] = _median_or_none([s[k] for s in steadies])
        hosts.append(row)
    slow = slow_hosts({h["host"]: h["own_img_per_s_per_gpu"] for h in hosts}, threshold)
    agg = _median_or_none([r["img_per_s"] for r in runs])
    per_gpu = _median_or_none([r["img_per_s_per_gpu"] for r in runs])
    dw = _median_or_none([h["data_wait_frac"] for h in hosts])
    ar = _median_or_none([h["allreduce_frac"] for h in hosts])
    table = load_published(published) if Path(published).exists() else []
    pub = compare_published(system or {}, per_gpu, table) if table else {
        "matched": False, "entries": [], "text": f"no published-results table at {published}"}
    if not hosts:
        verdict = "no per-rank timing in this run directory (trained before rn50/timing.py, or by another program)"
    elif slow:
        s = slow[0]
        verdict = (f"slow host: {s['host']} at {s['own_img_per_s_per_gpu']:g} img/s per rank, "
                   f"{100 * s['below_median']:.1f} % below the hosts' median {s['median']:g} "
                   f"(threshold {100 * threshold:g} %)")
    else:
        verdict = (f"no slow host: all {len(hosts)} host(s) within {100 * threshold:g} % of the median"
                   if len(hosts) > 1 else "one host: nothing to compare it with")
    out.mkdir(parents=True, exist_ok=True)
    result = HealthResult(
        run_dir=str(run_dir), threshold=threshold, runs=runs, hosts=hosts, slow_hosts=slow,
        slowest_host=slow[0]["host"] if slow else None, verdict=verdict, img_per_s=agg, img_per_s_per_gpu=per_gpu,
        data_wait_frac=dw, allreduce_frac=ar,
        published=pub, plot_png=str(out / "health.png"), report_md=str(out / "health.md"),
        report_json=str(out / "health.json"))
    plot(result, out / "health.png")
    write_json_atomic(out / "health.json", result.to_dict())
    write_text_atomic(out / "health.md", markdown(result.to_dict(), "health.png"))
    return result


def plot(r: HealthResult | dict[str, Any], out_png: str | Path) -> Path:
    """Own img/s per GPU of every host over the epochs (one line per host and run), slow hosts in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    r = r.to_dict() if isinstance(r, HealthResult) else r
    slow = {s["host"] for s in r["slow_hosts"]}
    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22", "#e377c2"]
    for i, host in enumerate(h["host"] for h in r["hosts"]):
        for j, run in enumerate(r["runs"]):
            ep = (run["hosts"].get(host) or {}).get("epochs") or {}
            pts = sorted((int(e), f["own_img_per_s_per_gpu"]) for e, f in ep.items() if f["own_img_per_s_per_gpu"])
            if pts:
                ax.plot(*zip(*pts), marker=".", lw=1.5, color="#c0392b" if host in slow else palette[i % len(palette)],
                        alpha=1 if j == 0 else 0.5, label=f"{host}{' (slow)' if host in slow else ''}" if j == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("own img/s per rank (GPU)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(("slow host: " + r["slowest_host"]) if r["slowest_host"] else "img/s per host", fontsize=10)
    if r["hosts"]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_png(fig, out_png)


def save_png(fig, out_png: str | Path) -> Path:
    """A matplotlib figure to a PNG, atomically (its directory created); a one-line error if it cannot be."""
    out_png = Path(out_png)
    try:
        with atomic_path(out_png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", pil_kwargs={"optimize": True})
    except OSError as e:
        raise StageError(f"cannot write plot {out_png}: {e.strerror}") from None
    return out_png


def _f(x: Any, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


def table_rows(r: HealthResult | dict[str, Any]) -> list[dict[str, Any]]:
    """One row per host, for a Prefect table artifact."""
    r = r.to_dict() if isinstance(r, HealthResult) else r
    slow = {s["host"] for s in r["slow_hosts"]}
    return [{"host": h["host"], "ranks": h["ranks"], "own img/s per rank": _f(h["own_img_per_s_per_gpu"]),
             "img/s": _f(h["img_per_s"]), "data wait %": _f(100 * h["data_wait_frac"]),
             "allreduce %": _f(100 * h["allreduce_frac"]), "step p50/p95/max ms":
             f"{_f(h['step_ms_p50'])}/{_f(h['step_ms_p95'])}/{_f(h['step_ms_max'])}",
             "slow": "SLOW" if h["host"] in slow else ""} for h in r["hosts"]]


def markdown(r: dict[str, Any], image: str) -> str:
    L = [f"# Cluster health: {r['verdict']}", "", f"![own img/s per host]({image})", "",
         f"- aggregate: {_f(r['img_per_s'])} img/s, {_f(r['img_per_s_per_gpu'])} img/s per rank (GPU) (steady state, "
         f"median over {len(r['runs'])} run(s))",
         f"- data wait {_f(100 * r['data_wait_frac'] if r['data_wait_frac'] is not None else None)} %, "
         f"allreduce {_f(100 * r['allreduce_frac'] if r['allreduce_frac'] is not None else None)} % of step time "
         "(median over hosts)"]
    for run in r["runs"]:
        if run.get("preflight"):
            pf = run["preflight"]
            L.append(f"- preflight ({run['log']}): allreduce of {pf['bytes'] / 2 ** 20:g} MiB across {pf['ranks']} "
                     f"ranks, bus bandwidth {pf['busbw_gbps']:g} GB/s")
    L += [f"- published MLPerf results: {r['published']['text']}", ""]
    rows = table_rows(r)
    if rows:
        L += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        L += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
        L.append("")
    L += ["| run | time to train (min) | img/s | img/s per rank | ranks | source |", "|---|---|---|---|---|---|"]
    for run in r["runs"]:
        L.append(f"| {run['log']} | {_f(run['time_to_train_min'], 2)} | {_f(run['img_per_s'])} | "
                 f"{_f(run['img_per_s_per_gpu'])} | {run['ranks'] or 'n/a'} | {run['throughput_source']} |")
    return "\n".join(L) + "\n"


def markdown_with_plot(r: HealthResult | dict[str, Any]) -> str:
    """The report with the plot inline as a data: URI (a Prefect markdown artifact)."""
    r = r.to_dict() if isinstance(r, HealthResult) else r
    png = base64.b64encode(Path(r["plot_png"]).read_bytes()).decode()
    return markdown(r, "data:image/png;base64," + png)
