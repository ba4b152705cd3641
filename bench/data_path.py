"""The data path (fetch, verify, pack) at ImageNet-like bytes, each stage against its floor in the same run.

    .venv/bin/python -m bench.data_path [--classes 100] [--small 40] [--large 200] [--val-per-class 10]
                                        [--rounds 2] [--pack-only | --no-pack] [--settle 4] [--json]
    .venv/bin/python -m bench.data_path --verify-memory 100000,400000    (verify's memory per image, alone)

Two `rn50 synth --profile imagenet` sets (ILSVRC2012's image sizes, ~110 KB JPEGs) that differ only in
images per class (--small and --large train images, val scaled alike) are synthesized once and kept in
bench/out/data_path/. On each set, in interleaved rounds (floor, ours, floor, ours, ...; best of --rounds):
- fetch  vs `md5sum` of the three archives (fetch reads, hashes, writes and fsyncs them);
- verify vs `tar -x` of the archives (train: `tar -xOf train.tar | tar -xi`, which writes every image of
             every inner class tar, plus `tar -xf val.tar`); ours is verify's extraction phase (stream the
             tars with every safety check, write the images, MD5 each); verify's whole run is also shown;
             earlier trees are moved aside, not deleted, before each run (see discard);
- pack   vs `cat` of the same image files into one file; ours is pack's write + verification phases;
             each of the two starts with the other's output deleted and --settle seconds of quiet (see
             bench_pack: on this VM freed memory goes back to the host and is dear to write into again).
Each stage runs as its own process (`python -m tasks.cli ...`), its peak RSS from wait4 (the largest
of the process and the workers it waited for). Rates are marginal: (large - small) / (images or bytes),
so start-up costs cancel. The projection for 1,281,167 + 50,000 images is the small set's time plus the
marginal cost per image for the rest, on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(REPO))

FULL_IMAGES = 1_281_167 + 50_000
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    import platform

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "mem_mib": mem, "kernel": platform.release(),
            "python": platform.python_version(), "load_1m_start": round(os.getloadavg()[0], 2)}


# A fresh, small process forks and execs the command and reports the peak RSS wait4 gives for it: the
# peak then reflects the command (and the workers it waited for), not this benchmark's own memory, which
# a child forked straight from here would carry as its high-water mark until exec.
_WRAP = ("import os, sys\nfd = int(sys.argv[1])\npid = os.fork()\nif pid == 0:\n    os.close(fd)\n"
         "    os.execvp(sys.argv[2], sys.argv[2:])\n_, status, usage = os.wait4(pid, 0)\n"
         "os.write(fd, str(usage.ru_maxrss).encode())\nsys.exit(os.waitstatus_to_exitcode(status))\n")


def run(cmd: list[str], stdin=None, stdout=subprocess.DEVNULL, cwd=None) -> tuple[float, int]:
    """Run cmd (no shell); (wall seconds, peak RSS in bytes of it or any child it waited for)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "rn50-bench-pycache")
    r, w = os.pipe()
    t = time.perf_counter()
    try:
        p = subprocess.run([PY, "-S", "-c", _WRAP, str(w), *map(str, cmd)], stdin=stdin, stdout=stdout,
                           stderr=subprocess.PIPE, cwd=cwd, env=env, pass_fds=(w,))
    finally:
        os.close(w)
    wall = time.perf_counter() - t
    with os.fdopen(r, "rb") as f:
        peak = int(f.read() or 0) * 1024
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()[-500:]}")
    return wall, peak


def rn50(*args) -> list[str]:
    return [PY, "-m", "tasks.cli", *map(str, args)]


TRASH: Path | None = None  # set by main: where discard() moves earlier outputs; deleted at the end of the run


def discard(path: Path) -> None:
    """Move `path` aside into TRASH (deleted once every round is done) rather than delete it: on ext4
    without a journal (this machine's), creating files within ~30 s of deleting many others costs up to
    ~2x (the inode allocator reads and skips each recently deleted inode), which fell on verify's
    extraction, run right after the earlier trees were deleted, and not on `tar -x`."""
    if TRASH is None:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    elif path.exists():
        TRASH.mkdir(exist_ok=True)
        os.rename(path, TRASH / f"{len(os.listdir(TRASH))}-{path.name}")


def tar_x(raw: Path, dest: Path, settle: float = 0.0) -> float:
    """The extraction floor: every image of the train tar's inner tars and of the val tar written out."""
    discard(dest)
    time.sleep(settle)
    (dest / "train").mkdir(parents=True)
    (dest / "val").mkdir()
    t = time.perf_counter()
    outer = subprocess.Popen(["tar", "-xOf", str(raw / ARCHIVES[0])], stdout=subprocess.PIPE)
    inner = subprocess.Popen(["tar", "-xif", "-", "-C", str(dest / "train")], stdin=outer.stdout)
    outer.stdout.close()
    val = subprocess.Popen(["tar", "-xf", str(raw / ARCHIVES[1]), "-C", str(dest / "val")])
    codes = [inner.wait(), outer.wait(), val.wait()]
    wall = time.perf_counter() - t
    if any(codes):
        raise SystemExit(f"tar -x failed: {codes}")
    return wall


def bench_set(src: Path, wd: Path, rounds: int, log, pack: bool = True, settle: float = 0.0) -> dict:
    scratch = wd.parent / f"{wd.name}-scratch"
    res: dict = {}

    # fetch vs md5sum
    md5s, fetches, rss = [], [], 0
    for _ in range(rounds):
        md5s.append(run(["md5sum", *[str(src / a) for a in ARCHIVES]])[0])
        # Deleted right before, not moved aside: fetch then writes into page cache just freed, as a real
        # download (far larger than memory) does once the cache is full. Memory this VM handed back to
        # the host costs ~5x to write into again (dd of 370 MiB: 0.17-0.66 s just after a delete,
        # 0.93 s 10 s after), which md5sum, writing nothing, never pays.
        shutil.rmtree(wd, ignore_errors=True)
        t, r = run(rn50("fetch", src, wd, "--md5", src / "MD5SUMS"), cwd=REPO)
        fetches.append(t)
        rss = max(rss, r)
    res["fetch"] = {"floor": md5s, "ours": fetches, "rss": rss}
    log(f"  fetch  {min(fetches):6.2f} s   md5sum {min(md5s):6.2f} s")

    # verify's extraction vs tar -x
    floors, extracts, walls, phases, rss = [], [], [], [], 0
    for _ in range(rounds):
        floors.append(tar_x(wd / "raw", scratch, settle))
        for p in (scratch, wd / "extracted", wd / "manifest.parquet", wd / ".stamps" / "verify.json"):
            discard(p)
        time.sleep(settle)
        t, r = run(rn50("verify", wd), cwd=REPO)
        ph = json.loads((wd / ".stamps" / "verify.json").read_text())["result"]["phases"]
        walls.append(t)
        extracts.append(ph["extract"])
        phases.append(ph)
        rss = max(rss, r)
    res["verify"] = {"floor": floors, "ours": extracts, "wall": walls, "phases": phases, "rss": rss}
    log(f"  verify extract {min(extracts):6.2f} s (whole {min(walls):6.2f} s)   tar -x {min(floors):6.2f} s")

    if pack:
        res.update(bench_pack(wd, scratch, rounds, log, settle))
    else:
        import pandas as pd

        sizes = pd.read_parquet(wd / "manifest.parquet", columns=["bytes"])["bytes"]
        res["images"], res["image_bytes"] = len(sizes), int(sizes.sum())
    res["archive_bytes"] = sum((src / a).stat().st_size for a in ARCHIVES)
    return res


def drop_pack_outputs(wd: Path) -> None:
    for p in (wd / "recordio").glob("*.*"):
        p.unlink()


def bench_pack(wd: Path, scratch: Path, rounds: int, log, settle: float = 0.0) -> dict:
    """Pack (write + its verification) vs cat of the same image files, on a verified work dir.

    Each timed run starts with no output of an earlier run left and, with `settle`, after that many seconds
    of quiet: on a VM with free page reporting (this one: Firecracker, page_reporting_order=11) memory
    freed ~2 s ago has gone back to the host, and writing into it costs several times more than into memory
    freed just before (1.2 GB into the page cache: 0.25 s vs 1.2-2.0 s, measured). Without settling, a run
    that starts right after the other one's output was deleted writes into warm pages and the other not."""
    import pandas as pd

    res: dict = {}
    df = pd.read_parquet(wd / "manifest.parquet", columns=["path", "bytes"])
    res["images"], res["image_bytes"] = len(df), int(df["bytes"].sum())
    files = scratch.parent / f"{wd.name}-files.txt"
    files.write_text("".join(f"{wd / p}\n" for p in df.path))
    del df
    cats, packs, pwalls, pphases, rss = [], [], [], [], 0
    for _ in range(rounds):
        drop_pack_outputs(wd)
        time.sleep(settle)
        with open(files, "rb") as stdin, open(scratch.with_suffix(".cat"), "wb") as out:
            cats.append(run(["xargs", "cat"], stdin=stdin, stdout=out)[0])
        scratch.with_suffix(".cat").unlink()
        time.sleep(settle)
        t, r = run(rn50("pack", wd, "--force"), cwd=REPO)
        ph = json.loads((wd / "reports" / "pack.json").read_text())["seconds"]
        pwalls.append(t)
        packs.append(ph["write"] + ph["verify"])
        pphases.append(ph)
        rss = max(rss, r)
    files.unlink()
    res["pack"] = {"floor": cats, "ours": packs, "wall": pwalls, "phases": pphases, "rss": rss}
    log(f"  pack   write+verify {min(packs):6.2f} s (whole {min(pwalls):6.2f} s)   cat {min(cats):6.2f} s")
    return res


def bench_pack_only(src: Path, wd: Path, rounds: int, log, settle: float = 0.0) -> dict:
    """--pack-only: fetch and verify once, untimed (the work dir is kept for the next run), then pack's rounds."""
    if not (wd / ".stamps" / "verify.json").exists():
        shutil.rmtree(wd, ignore_errors=True)
        run(rn50("fetch", src, wd, "--md5", src / "MD5SUMS"), cwd=REPO)
        run(rn50("verify", wd), cwd=REPO)
    res = bench_pack(wd, wd.parent / f"{wd.name}-scratch", rounds, log, settle)
    res["archive_bytes"] = sum((src / a).stat().st_size for a in ARCHIVES)
    return res


def _synthetic_split(n: int) -> tuple[int, int]:
    """Train images per class (of 1,000) and val images of verify_memory_child's n-image index."""
    return max(1, n // 1000), max(1, n // 20)


def verify_memory_child(n: int) -> None:
    """verify's work after extraction (manifest table, expectations, quirks, digest, parquet) on an
    index of n synthetic images (1,000 classes, val 1/20 of train; no image files): its peak RSS grows
    only with n, without the few MiB of allocator noise that swamp the slope between two small sets."""
    import array

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    import tasks.verify as v
    from tasks.ilsvrc import manifest_digest

    classes, per_class, n_val = 1000, *_synthetic_split(n)
    wnids = [f"n{10_000_000 + 37 * i:08d}" for i in range(classes)]
    devkit = v.Devkit(sorted(wnids), {w: per_class for w in wnids}, [wnids[i % classes] for i in range(n_val)])
    root = Path(tempfile.mkdtemp()) / "extracted.partial"
    index = v._Index(root, root.parent)
    index.finish()
    n_train = per_class * classes
    index.splits, index.wnids = ["train", "val"], wnids
    index.split = bytearray(n_train) + bytearray(b"\1" * n_val)
    index.wnid = array.array("I", np.concatenate([np.arange(n_train) // per_class, np.arange(n_val) % classes]))
    names = (f"{wnids[i // per_class]}_{i}.JPEG" if i < n_train else f"ILSVRC2012_val_{i - n_train + 1:08d}.JPEG"
             for i in range(n_train + n_val))
    for name in names:
        index.names += name.encode()
        index.name_ends.append(len(index.names))
    total = n_train + n_val
    index.bytes = array.array("q", bytes(8 * total))
    index.bytes[:] = array.array("q", [110_000]) * total
    index.md5 = bytearray(np.random.default_rng(0).integers(0, 256, 16 * total, np.uint8).tobytes())
    facts = {"width": np.full(total, 500, np.int64), "height": np.full(total, 375, np.int64),
             "mode": np.zeros(total, np.uint16), "format": np.zeros(total, np.uint16),
             "decodable": np.ones(total, bool), "modes": ["RGB"], "formats": ["JPEG"]}
    table = v._table(index, {w: i for i, w in enumerate(devkit.wnids)}, facts)
    del index, facts
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    assert all(e["success"] for e in v._validate(df, devkit))
    _ = [df.path[df.format == "PNG"].tolist(), df.path[~df.decodable].tolist(), int(df.bytes.sum())]
    manifest_digest(df)
    pq.write_table(table, root.parent / "manifest.parquet")
    shutil.rmtree(root.parent)


def verify_memory(sizes: list[int], log) -> dict:
    peaks = {}
    for n in sizes:
        peaks[n] = run([PY, "-m", "bench.data_path", "--verify-memory-child", n], cwd=REPO)[1]
        log(f"  verify after extraction, {n:,} synthetic images: peak RSS {peaks[n] / 2**20:.0f} MiB")
    lo, hi = min(sizes), max(sizes)
    images = {k: 1000 * _synthetic_split(k)[0] + _synthetic_split(k)[1] for k in (lo, hi)}
    slope = (peaks[hi] - peaks[lo]) / (images[hi] - images[lo])
    log(f"  peak RSS per image: {slope:.0f} B")
    return {"peak_rss": peaks, "bytes_per_image": round(slope)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "data_path")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--small", type=int, default=40, help="train images per class of the small set")
    ap.add_argument("--large", type=int, default=200, help="train images per class of the large set")
    ap.add_argument("--val-per-class", type=int, default=10, help="val images per class of the large set")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=4.0,
                    help="seconds of quiet before each timed cat and pack run, their earlier outputs deleted "
                         "(freed memory goes back to the host on this VM: see bench_pack)")
    ap.add_argument("--pack-only", action="store_true",
                    help="only pack vs cat (fetch and verify run once, untimed; their work dirs are kept)")
    ap.add_argument("--no-pack", action="store_true", help="only fetch vs md5sum and verify vs tar -x")
    ap.add_argument("--verify-memory", metavar="N1,N2",
                    help="only: peak RSS of verify's work after extraction on N1 and N2 synthetic images, and "
                         "its growth per image (e.g. 100000,400000)")
    ap.add_argument("--verify-memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.verify_memory_child:
        verify_memory_child(a.verify_memory_child)
        return 0
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *x: print(*x, file=sys.stderr, flush=True)) if a.json else (lambda *x: print(*x, flush=True))
    if a.verify_memory:
        result = verify_memory([int(x) for x in a.verify_memory.split(",")], log)
        if a.json:
            print(json.dumps(result, indent=2))
        return 0
    from tasks.synth import synthesize

    global TRASH
    TRASH = out / "trash"
    if TRASH.exists():  # left by an interrupted run: deleted, then ~30 s for ext4 to forget the inodes
        shutil.rmtree(TRASH)
        time.sleep(35)
    m = machine()
    loads = [os.getloadavg()[0]]
    sets = {}
    for name, per_class in (("small", a.small), ("large", a.large)):
        val = max(1, round(a.val_per_class * per_class / a.large))
        src = out / f"src-imagenet-{a.classes}x{per_class}+{val}"
        if not (src / "MD5SUMS").exists():
            t = time.perf_counter()
            shutil.rmtree(src, ignore_errors=True)
            synthesize(src, a.classes, per_class, val, seed=0, profile="imagenet")
            log(f"synthesized {src.name} in {time.perf_counter() - t:.0f} s")
        log(f"{name} set: {a.classes} classes x {per_class} train + {val} val per class")
        wd = out / f"wd-{name}"
        if a.pack_only:
            sets[name] = bench_pack_only(src, wd, a.rounds, log, a.settle)
        else:
            sets[name] = bench_set(src, wd, a.rounds, log, pack=not a.no_pack, settle=a.settle)
            discard(wd)
        loads.append(os.getloadavg()[0])
    m["load_1m_during"] = [round(x, 2) for x in loads]
    shutil.rmtree(TRASH, ignore_errors=True)

    s, l = sets["small"], sets["large"]
    dn, db = l["images"] - s["images"], l["image_bytes"] - s["image_bytes"]
    rows = {}
    for stage, floor_name in (("fetch", "md5sum"), ("verify", "tar -x"), ("pack", "cat")):
        if stage not in l:
            continue
        fs, fl = min(s[stage]["floor"]), min(l[stage]["floor"])
        os_, ol = min(s[stage]["ours"]), min(l[stage]["ours"])
        marg_ours, marg_floor = (ol - os_) / dn, (fl - fs) / dn
        row = {
            "floor": floor_name, "small_s": [round(fs, 3), round(os_, 3)], "large_s": [round(fl, 3), round(ol, 3)],
            "ours_us_per_image": round(marg_ours * 1e6, 1), "floor_us_per_image": round(marg_floor * 1e6, 1),
            "ours_mib_s": round(db / (1 << 20) / (ol - os_), 1) if ol > os_ else None,
            "floor_mib_s": round(db / (1 << 20) / (fl - fs), 1) if fl > fs else None,
            "ratio": round(marg_floor / marg_ours, 2) if marg_ours > 0 else None,
            "rss_mib": [round(s[stage]["rss"] / 2**20), round(l[stage]["rss"] / 2**20)],
            "rss_bytes_per_image": round((l[stage]["rss"] - s[stage]["rss"]) / dn),
        }
        wall_key = "wall" if "wall" in l[stage] else "ours"
        ws, wl = min(s[stage][wall_key]), min(l[stage][wall_key])
        row["whole_us_per_image"] = round((wl - ws) / dn * 1e6, 1)
        row["projection_s"] = round(ws + (wl - ws) / dn * (FULL_IMAGES - s["images"]))
        row["projection_rss_gib"] = round((s[stage]["rss"] + max(0, row["rss_bytes_per_image"]) *
                                           (FULL_IMAGES - s["images"])) / 2**30, 2)
        rows[stage] = row
    vph = [min(x[k] for x in l["verify"]["phases"]) - min(x[k] for x in s["verify"]["phases"])
           if "verify" in l else float("nan") for k in ("decode_check", "validate")]
    result = {"machine": m, "images": [s["images"], l["images"]], "image_bytes": [s["image_bytes"], l["image_bytes"]],
              "archive_bytes": [s["archive_bytes"], l["archive_bytes"]], "rounds": a.rounds, "stages": rows,
              "verify_decode_check_us_per_image": round(vph[0] / dn * 1e6, 1),
              "verify_validate_us_per_image": round(vph[1] / dn * 1e6, 1), "raw": sets}
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['mem_mib']} MiB, Linux {m['kernel']}, Python {m['python']}, "
          f"load {m['load_1m_during']}")
    print(f"sets: {s['images']:,} and {l['images']:,} images ({s['image_bytes'] / 2**30:.2f} and "
          f"{l['image_bytes'] / 2**30:.2f} GiB of JPEGs, mean {l['image_bytes'] / l['images'] / 1000:.0f} KB); "
          f"marginal over {dn:,} images, best of {a.rounds}")
    print("| stage | floor | floor µs/img (MiB/s) | ours µs/img (MiB/s) | ratio | goal | peak RSS small/large (MiB) "
          "| RSS B/img | whole stage µs/img | projected 1.33 M images |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    goals = {"fetch": 0.9, "verify": 0.8, "pack": 0.8}
    what = {"fetch": "fetch", "verify": "verify: extraction", "pack": "pack: write + verification"}
    for stage, r in rows.items():
        print(f"| {what[stage]} | {r['floor']} | {r['floor_us_per_image']} ({r['floor_mib_s']}) "
              f"| {r['ours_us_per_image']} ({r['ours_mib_s']}) | {r['ratio']}x | >= {goals[stage]} "
              f"| {r['rss_mib'][0]} / {r['rss_mib'][1]} | {r['rss_bytes_per_image']} | {r['whole_us_per_image']} "
              f"| {r['projection_s'] / 60:.0f} min, {r['projection_rss_gib']} GiB |")
    print(f"verify's other phases, marginal: decode check {result['verify_decode_check_us_per_image']} µs/img, "
          f"expectations {result['verify_validate_us_per_image']} µs/img")
    total = sum(r["projection_s"] for r in rows.values())
    print(f"projection for {FULL_IMAGES:,} images on this machine: fetch + verify + pack ≈ {total / 3600:.1f} h "
          f"(from a local directory, page cache and disk as in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
