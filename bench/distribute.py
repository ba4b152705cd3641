"""Throughput of `rn50 distribute` to one host against a plain `ssh host cat > file` of the same bytes.

One run, the same link: a second host made like the tests' (tests/sshd_hosts.py: a network namespace behind a
veth pair, a real sshd, its own empty tmpfs as the data dir), the same ssh_config and pinned key for both, the
same four recordio files of random (incompressible) bytes. Rounds alternate plain / ours; each starts from an
empty data dir. Ours is the whole stage as a user runs it (the state check, the stream into .part, the full md5
on the host, the rename and stamp); the source's md5s are computed once before (cached beside the source, as in
a real rerun) and timed separately. Needs root (ip netns). Run from the repo root:

    .venv/bin/python bench/distribute.py --mib 1024 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

FILES = ("train.rec", "train.idx", "val.rec", "val.idx")


def make_source(recordio: Path, mib: int) -> int:
    recordio.mkdir(parents=True)
    sizes = {"train.rec": mib << 20, "val.rec": max(1, mib // 20) << 20, "train.idx": 4 << 20, "val.idx": 1 << 20}
    for name, size in sizes.items():
        with open(recordio / name, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
    return sum(sizes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="size of train.rec in MiB (val.rec: 1/20 of it)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from sshd_hosts import netns_host

    from tasks import launch
    from tasks.distribute import distribute
    from tasks.inventory import parse_inventory
    from tasks.ssh import prepare_known_hosts, setup

    with tempfile.TemporaryDirectory(prefix="rn50-bench-dist-") as tmp:
        tmp = Path(tmp)
        wd, nodes = tmp / "wd", tmp / "nodes"
        nodes.mkdir()
        total = make_source(wd / "recordio", args.mib)
        t0 = time.monotonic()
        launch.source_digests(wd / "recordio")
        md5_s = time.monotonic() - t0
        with netns_host(tmp / "hostb", hide=[nodes]) as h:
            doc = {"data_dir": str(nodes / "ours"), "data_local": True, "known_hosts": str(tmp / "known_hosts"),
                   "hosts": [h.inventory_entry()]}
            inv = parse_inventory(doc)
            trust = setup(tmp / "trust", inv.hosts, prepare_known_hosts(tmp / "known_hosts"))
            ssh = ["ssh", "-F", str(trust.config), "-o", "StrictHostKeyChecking=accept-new", "--", h.addr]

            def plain() -> float:
                t = time.monotonic()
                for name in FILES:
                    with open(wd / "recordio" / name, "rb") as f:
                        subprocess.run(ssh + [f"mkdir -p {nodes}/plain && cat > {nodes}/plain/{name}"], stdin=f,
                                       check=True)
                return time.monotonic() - t

            def ours() -> float:
                t = time.monotonic()
                res = distribute(wd, doc)
                assert res.bytes_sent == total, res
                return time.monotonic() - t

            subprocess.run(ssh + ["true"], check=True)  # pins the host key outside the timings
            times: dict[str, list[float]] = {"plain": [], "ours": []}
            for _ in range(args.rounds):
                for name, fn in (("plain", plain), ("ours", ours)):
                    subprocess.run(ssh + [f"rm -rf {nodes}/plain {nodes}/ours"], check=True)
                    times[name].append(fn())
            skip_t = time.monotonic()
            again = distribute(wd, doc)  # everything is there: the stamped copies are only checked
            skip_s = time.monotonic() - skip_t
            assert again.bytes_sent == 0
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"bytes": total, "rounds": args.rounds, "plain_s": times["plain"], "ours_s": times["ours"],
           "plain_MBps": round(total / med["plain"] / 1e6, 1), "ours_MBps": round(total / med["ours"] / 1e6, 1),
           "ratio": round(med["plain"] / med["ours"], 3), "source_md5_s": round(md5_s, 2),
           "second_run_s": round(skip_s, 2), "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    print(json.dumps(out))
    print(f"{total / 2**20:.0f} MiB to one ssh host: plain cat {out['plain_MBps']} MB/s, rn50 distribute "
          f"{out['ours_MBps']} MB/s (md5-verified) = {out['ratio']}x; source md5 once {md5_s:.1f} s; "
          f"a second run (all stamped) {skip_s:.2f} s")


if __name__ == "__main__":
    main()
