"""Benchmark of `rn50 pack` against the floor (cat) and the reference (im2rec.py --pass-through --num-thread 2).

    .venv/bin/python -m bench.pack [--classes 100] [--train-per-class 190] [--val-per-class 20] [--repeat 3]

Builds (once, cached in bench/out/pack/) a synthetic ILSVRC2012 of ~20k images with `rn50 synth`, fetches
and verifies it, then, with the page cache warm and best of --repeat runs each:
- floor:     `xargs cat` of every image of both splits into one file on the same file system;
- reference: `im2rec.py --pass-through --num-thread 2` on each split, from the same .lst files;
- ours:      `rn50 pack WORKDIR --force` (lists, writes, verifies, commits; all in one process).
It checks that ours and the reference wrote identical bytes, then prints the figures and the two ratios:
the copy-rate ratio (image bytes per second while writing records, over cat's) and the speed-up over
the reference, both for the write phase alone and end to end (process start to exit).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(REPO))


def build(out: Path, classes: int, train: int, val: int) -> Path:
    from tasks.fetch import fetch
    from tasks.synth import synthesize
    from tasks.verify import verify

    wd = out / f"wd-{classes}x{train}+{val}"
    if (wd / "manifest.parquet").exists():
        return wd
    src = out / f"src-{classes}x{train}+{val}"
    t = time.perf_counter()
    synthesize(src, classes=classes, train_per_class=train, val_per_class=val, seed=0)
    fetch(str(src), wd, md5_file=src / "MD5SUMS")
    verify(wd)
    shutil.rmtree(src)
    print(f"built {wd} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return wd


def timed(cmd: list[str], **kw) -> float:
    # Byte-compiled imports, as in a normal install (this sandbox sets PYTHONDONTWRITEBYTECODE; the cache
    # goes to a private prefix, not into the shared venv). Both Python commands get the same treatment.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "rn50-bench-pycache")
    kw.setdefault("stdout", subprocess.DEVNULL)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, **kw)
    return time.perf_counter() - t


def timed_cat(files_txt: Path, out: Path) -> float:
    """`xargs cat < files.txt > out`, without a shell."""
    with open(files_txt, "rb") as stdin, open(out, "wb") as stdout:
        return timed(["xargs", "cat"], stdin=stdin, stdout=stdout)


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    fs = (subprocess.run(["df", "--output=fstype", "."], capture_output=True, text=True).stdout.split() or ["?"])[-1]
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "mem_mib": mem, "kernel": platform.release(),
            "python": platform.python_version(), "fs": fs, "load_1m": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pack")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--train-per-class", type=int, default=190)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.chdir(a.out)
    wd = build(a.out.resolve(), a.classes, a.train_per_class, a.val_per_class)
    from tasks.pack import pack
    from tasks.recordio import im2rec_path, read_lst

    pack(wd, force=True)  # warms the page cache and gives the .lst files the reference packs from
    splits = [s for s in ("train", "val") if (wd / "recordio" / f"{s}.lst").exists()]
    files = [str(wd / "extracted" / s / rel) for s in splits for _, _, rel in read_lst(wd / "recordio" / f"{s}.lst")]
    image_bytes = sum(os.path.getsize(f) for f in files)
    scratch = wd / "bench-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    (scratch / "files.txt").write_text("\n".join(files) + "\n")
    ref = scratch / "ref"
    ref.mkdir()
    for s in splits:
        shutil.copy(wd / "recordio" / f"{s}.lst", ref / f"{s}.lst")

    floor, reference, ours, phases = [], [], [], []
    for i in range(a.repeat + 1):  # round 0 warms up (bytecode cache, page cache) and is not counted
        (scratch / "cat.out").unlink(missing_ok=True)
        floor.append(timed_cat(scratch / "files.txt", scratch / "cat.out"))
        for s in splits:
            for ext in ("rec", "idx"):
                (ref / f"{s}.{ext}").unlink(missing_ok=True)
        reference.append(sum(timed([PY, str(im2rec_path()), "--pass-through", "--num-thread", "2",
                                    str(ref / s), str(wd / "extracted" / s)]) for s in splits))
        ours.append(timed([PY, "-m", "tasks.cli", "pack", str(wd), "--force"], cwd=REPO))
        phases.append(json.loads((wd / "reports" / "pack.json").read_text())["seconds"])
        if i == 0:
            floor, reference, ours, phases = [], [], [], []

    identical = all(filecmp.cmp(ref / f"{s}.{e}", wd / "recordio" / f"{s}.{e}", shallow=False)
                    for s in splits for e in ("rec", "idx"))
    best = min(range(a.repeat), key=lambda i: ours[i])
    write = min(p["write"] for p in phases)
    t_floor, t_ref, t_ours = min(floor), min(reference), ours[best]
    mib = image_bytes / (1 << 20)
    result = {
        "machine": machine(), "images": len(files), "image_bytes": image_bytes, "repeat": a.repeat,
        "floor_cat_s": round(t_floor, 3), "reference_im2rec_s": round(t_ref, 3),
        "ours_wall_s": round(t_ours, 3), "ours_phases_s": phases[best], "ours_best_write_s": round(write, 3),
        "floor_mib_s": round(mib / t_floor, 1), "reference_mib_s": round(mib / t_ref, 1),
        "ours_write_mib_s": round(mib / write, 1), "ours_wall_mib_s": round(mib / t_ours, 1),
        "copy_rate_ratio_write": round(t_floor / write, 2), "copy_rate_ratio_wall": round(t_floor / t_ours, 2),
        "speedup_vs_reference_wall": round(t_ref / t_ours, 2),
        "speedup_vs_reference_write": round(t_ref / write, 2),
        "byte_identical_to_reference": identical,
    }
    shutil.rmtree(scratch, ignore_errors=True)
    if a.json:
        print(json.dumps(result, indent=2))
        return 0 if identical else 1
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['mem_mib']} MiB, {m['fs']}, Linux {m['kernel']}, "
          f"Python {m['python']}, load {m['load_1m']}")
    print(f"data: {len(files):,} images, {mib:,.1f} MiB (page cache warm), best of {a.repeat}")
    print(f"floor      cat of the same bytes         {t_floor:7.3f} s  {result['floor_mib_s']:8.1f} MiB/s")
    print(f"reference  im2rec.py --pass-through -2   {t_ref:7.3f} s  {result['reference_mib_s']:8.1f} MiB/s")
    print(f"ours       rn50 pack (process, all)      {t_ours:7.3f} s  {result['ours_wall_mib_s']:8.1f} MiB/s  "
          f"phases: " + ", ".join(f"{k} {v:.3f}" for k, v in phases[best].items()))
    print(f"ours       record-writing phase          {write:7.3f} s  {result['ours_write_mib_s']:8.1f} MiB/s")
    print(f"ratio 1 (ours / copy rate): write phase {result['copy_rate_ratio_write']:.2f}x, "
          f"whole process {result['copy_rate_ratio_wall']:.2f}x   (goal >= 0.8)")
    print(f"ratio 2 (ours vs reference): whole process {result['speedup_vs_reference_wall']:.2f}x faster, "
          f"write phase {result['speedup_vs_reference_write']:.2f}x   (goal >= 1.5)")
    print(f"ours byte-identical to the reference: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
