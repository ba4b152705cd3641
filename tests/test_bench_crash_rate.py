"""bench/crash_rate.py's own parts that decide what it measures: the cut train set is a valid RecordIO that
MXNet's reader reads record for record, and the record's totals are kept per Horovod build (the measurement
of issue 23 adds up across sessions only on one build)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import crash_rate  # noqa: E402


def test_keep_first_leaves_a_recordio_mxnet_reads_to_its_end(tmp_path):
    import mxnet as mx

    rec = tmp_path / "recordio"
    rec.mkdir()
    writer = mx.recordio.MXIndexedRecordIO(str(rec / "train.idx"), str(rec / "train.rec"), "w")
    payloads = {}
    for i, key in enumerate([7, 3, 11, 0, 5, 9]):  # im2rec's keys are the shuffled list's indices
        payloads[key] = mx.recordio.pack(mx.recordio.IRHeader(0, float(i % 3), key, 0), bytes([i]) * (50 + 13 * i))
        writer.write_idx(key, payloads[key])
    writer.close()

    crash_rate.keep_first(rec, "train", 4)
    reader = mx.recordio.MXIndexedRecordIO(str(rec / "train.idx"), str(rec / "train.rec"), "r")
    assert reader.keys == [7, 3, 11, 0]
    assert [reader.read_idx(k) for k in reader.keys] == [payloads[k] for k in (7, 3, 11, 0)]
    reader.close()
    seq = mx.recordio.MXRecordIO(str(rec / "train.rec"), "r")  # sequential read: nothing after record 4
    assert [seq.read() for _ in range(5)] == [payloads[k] for k in (7, 3, 11, 0)] + [None]
    seq.close()

    before = (rec / "train.rec").read_bytes()
    crash_rate.keep_first(rec, "train", 10)  # more than it holds: unchanged
    assert (rec / "train.rec").read_bytes() == before and len((rec / "train.idx").read_text().splitlines()) == 4


def test_summary_totals_per_build_and_the_cli_refuses_without_a_work_dir(tmp_path):
    record = tmp_path / "crash_rate.jsonl"
    entries = [("cpu-pold", "crashed"), ("cpu-pnew", "success"), ("cpu-pold", "success"), ("cpu-pnew", "success"),
               ("cpu-pnew", "transient")]
    record.write_text("".join(json.dumps({"at": f"2026-12-06T0{i}:00:00Z", "outcome": o, "horovod_build": b}) + "\n"
                              for i, (b, o) in enumerate(entries)))
    assert crash_rate.summary(record).splitlines() == [
        "cpu-pold (since 2026-12-06T00:00:00Z): 2 launches: crashed 1, success 1",
        "cpu-pnew (since 2026-12-06T01:00:00Z): 3 launches: success 2, transient 1"]

    script = str(ROOT / "bench" / "crash_rate.py")
    shown = subprocess.run([sys.executable, script, "--summary", "--record", str(record)], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout == crash_rate.summary(record) + "\n"
    for argv, says in ((["--summary", "--record", str(tmp_path / "none.jsonl")], "no record at"),
                       ([], "--workdir is required"),
                       (["--workdir", str(tmp_path)], "has no packed train/val")):
        bad = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
        assert bad.returncode == 2 and says in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
